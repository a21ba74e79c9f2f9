"""The detokeniser on a toy tokenizer: every token is a piece of UTF-8 bytes."""

from __future__ import annotations

from zmqchat.engine.detokenizer import LOGPROB_FLOOR, Detokenizer
from zmqchat.engine.sequence import Sequence, resolve
from zmqchat.protocol import Alternative, SamplingParams, TokenLogprob

EOS = 0


class Bytes:
    """Token 0 is end-of-sequence (special: decoded as nothing); the others are byte pieces.
    With `drop_first_space`, decoding drops the leading space of its first token, as
    SentencePiece's tokenizers do."""

    def __init__(self, drop_first_space: bool = False):
        self.pieces: list[bytes] = [b"</s>"]
        self.drop_first_space = drop_first_space

    def ids(self, *pieces: bytes) -> list[int]:
        for piece in pieces:
            if piece not in self.pieces:
                self.pieces.append(piece)
        return [self.pieces.index(p) for p in pieces]

    def decode(self, token_ids: list[int]) -> str:
        text = b"".join(self.pieces[t] for t in token_ids if t != EOS).decode("utf-8", errors="replace")
        return text[1:] if self.drop_first_space and text.startswith(" ") else text

    def token_bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id]


def run(pieces: list[bytes], prompt: list[bytes] = (b"hi",), max_tokens: int = 100, tokenizer=None,
        with_logprobs: bool = False, **params) -> tuple[Sequence, list[str], list[TokenLogprob]]:
    """Append `pieces` (EOS for None) one by one; the sequence, each step's text, and the
    logprob entries handed out with it."""
    tokenizer = tokenizer or Bytes()
    seq = Sequence("s", tokenizer.ids(*prompt), resolve(SamplingParams(**params), {}), max_tokens)
    detokenizer = Detokenizer(tokenizer, {EOS})
    sent, entries = [], []
    for piece in pieces:
        token = EOS if piece is None else tokenizer.ids(piece)[0]
        sent.append(detokenizer.append(seq, token, (-1.0, [(token, -1.0)]) if with_logprobs else None))
        entries += detokenizer.take_logprobs(seq)
        if seq.finish_reason:
            break
    return seq, sent, entries


def test_a_character_split_over_tokens_is_sent_whole():
    # "é" is C3 A9, "😀" is F0 9F 98 80: halves decode to U+FFFD, which is never sent.
    seq, sent, _ = run([b"caf\xc3", b"\xa9 ", b"\xf0\x9f", b"\x98", b"\x80!", None])
    assert sent == ["", "café ", "", "", "😀!", ""]
    assert "".join(sent) == "café 😀!" and seq.finish_reason == "stop"


def test_the_first_word_keeps_its_space_through_the_prompts_last_tokens():
    tokenizer = Bytes(drop_first_space=True)
    _, sent, _ = run([b" world", b" again", None], prompt=[b"Hello"], tokenizer=tokenizer)
    assert "".join(sent) == " world again"


def test_a_stop_string_split_over_tokens_is_never_sent():
    seq, sent, _ = run([b"one ", b"two", b" EN", b"D three"], stop=("two EN",))
    assert sent == ["one ", "", ""] and seq.text == "one " and seq.finish_reason == "stop"
    assert len(seq.output_ids) == 3  # the token completing the stop string counts in usage


def test_text_that_only_looks_like_a_stop_string_is_released():
    seq, sent, _ = run([b"tw", b"o", b"-", b" tw", None], stop=("two-x",))
    # Each tail that may start "two-x" waits, and goes once the text goes another way.
    assert sent == ["", "", "", "two- ", "tw"] and seq.finish_reason == "stop"


def test_held_text_goes_out_as_soon_as_it_cannot_be_a_stop_string():
    _, sent, _ = run([b"ab", b"c", b"x", None], stop=("abcd",))
    assert sent == ["", "", "abcx", ""]


def test_max_tokens_ends_with_length_and_sends_what_was_held():
    seq, sent, _ = run([b"a", b"b", b"c"], max_tokens=2, stop=("bc",))
    assert sent == ["a", "b"] and seq.finish_reason == "length" and len(seq.output_ids) == 2


def test_end_of_sequence_is_ignored_when_asked():
    seq, sent, _ = run([b"a", None, b"b"], max_tokens=3, ignore_eos=True)
    assert "".join(sent) == "ab" and seq.finish_reason == "length"


def test_logprobs_leave_with_their_text():
    _, sent, entries = run([b"ab", b"c", b"x", None], stop=("abcd",), with_logprobs=True)
    # Nothing leaves while "abc" may be a stop string's start; then all three with "abcx".
    assert sent == ["", "", "abcx", ""]
    assert [(e.token, e.offset) for e in entries] == [("ab", 0), ("c", 2), ("x", 3)]  # none for EOS
    assert entries[0] == TokenLogprob("ab", b"ab", -1.0, [Alternative("ab", b"ab", -1.0)], 0)


def test_no_logprobs_for_a_stop_strings_tokens_or_end_of_sequence():
    _, _, entries = run([b"one ", b"two", b" EN"], stop=("two EN",), with_logprobs=True)
    assert [e.token for e in entries] == ["one "]


def test_a_token_holding_part_of_a_character_is_named_by_its_bytes():
    _, _, entries = run([b"\xf0\x9f", b"\x98\x80", None], with_logprobs=True)
    assert [e.token for e in entries] == ["bytes:\\xf0\\x9f", "bytes:\\x98\\x80"]
    assert b"".join(e.raw for e in entries).decode() == "😀"
    assert [e.offset for e in entries] == [0, 0]


def test_echo_shifts_the_offsets_and_minus_infinity_is_floored():
    tokenizer = Bytes()
    seq = Sequence("s", tokenizer.ids(b"hi"), resolve(SamplingParams(), {}), 10)
    seq.echo_length = 2
    detokenizer = Detokenizer(tokenizer, {EOS})
    detokenizer.append(seq, tokenizer.ids(b"yo")[0], (float("-inf"), [(EOS, float("nan"))]))
    [entry] = detokenizer.take_logprobs(seq)
    assert entry.offset == 2 and entry.logprob == LOGPROB_FLOOR and entry.top[0].logprob == LOGPROB_FLOOR


def test_unset_parameters_take_the_models_defaults():
    defaults = {"temperature": 0.2, "top_p": 0.9}
    resolved = resolve(SamplingParams(max_tokens=5), defaults)
    assert (resolved.temperature, resolved.top_p, resolved.max_tokens) == (0.2, 0.9, 5)
    assert resolve(SamplingParams(temperature=0.0), defaults).temperature == 0.0  # the request wins
    assert resolve(SamplingParams(), {}).temperature == 1.0 and resolve(SamplingParams(), {}).top_p == 1.0


def test_prompt_tokens_are_named_and_placed_in_the_prompts_text():
    tokenizer = Bytes()
    ids = tokenizer.ids(b"caf", b"\xc3", b"\xa9 ") + [EOS] + tokenizer.ids(b"ok")
    seq = Sequence("s", ids, resolve(SamplingParams(), {}), 1)
    seq.prompt_logprobs = [(-1.0, 3, [(1, -0.5)]), (float("-inf"), 9, []), (-2.0, 1, []), (-0.25, 1, [])]
    prompt = Detokenizer(tokenizer, {EOS}).take_prompt_logprobs(seq)
    assert [t.token for t in prompt] == ["caf", "bytes:\\xc3", "bytes:\\xa9\\x20", "</s>", "ok"]
    # Text: "café ok"; a character's second half, and a special token (decoded as nothing), start where the text is.
    assert [t.offset for t in prompt] == [0, 3, 3, 5, 5]
    assert [t.logprob for t in prompt] == [None, -1.0, LOGPROB_FLOOR, -2.0, -0.25]  # the first has none
    assert [t.rank for t in prompt] == [0, 3, 9, 1, 1] and prompt[1].top == [Alternative("caf", b"caf", -0.5, 1)]
    assert seq.prompt_logprobs is None  # taken once: they leave with the first output
    assert Detokenizer(tokenizer, {EOS}).take_prompt_logprobs(seq) is None
