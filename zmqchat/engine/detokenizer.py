"""Tokens to text, one sampled token at a time, and when a sequence ends.

The engine hands `append()` each sequence's new token (and, where the job asked, its logprobs
from the sampler); it returns the text that may be sent now and sets `finish_reason` when the
token ends the sequence: an end-of-sequence token, a stop string (neither before the job's
min_tokens), the end of a constrained sequence's grammar (whatever min_tokens and ignore_eos
say), or max_tokens. Text stays correct across multi-byte characters split over tokens, and a
stop string is never sent, even split over tokens: a tail that may be its start is held back
until it is not. Each token's logprob entry leaves (`take_logprobs()`) with the text it made.
A prompt's tokens' logprobs, where the job asked, leave with the sequence's first output
(`take_prompt_logprobs()`), each named and placed in the prompt's text. Pure Python over a
tokenizer with decode(ids) -> str (without special tokens) and token_bytes(id) -> bytes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from zmqchat.protocol import Alternative, PromptToken, TokenLogprob

if TYPE_CHECKING:
    from zmqchat.engine.sequence import Sequence

# Prompt tokens the detokeniser starts from, as vLLM does: some tokenizers (SentencePiece's)
# drop the leading space of the first token decoded, which a completion's first word needs.
DETOKENIZER_CONTEXT = 5
LOGPROB_FLOOR = -9999.0  # stands for log(0), which JSON cannot carry; OpenAI sends the same

# A token's logprobs as a runner gives them: its own, and its likeliest alternatives'.
TokenLogprobs = tuple[float, list[tuple[int, float]]]
# Each prompt token's after the first, as a runner gives them: its logprob, its rank (1 + the
# tokens likelier than it) and the likeliest alternatives'.
PromptLogprobs = list[tuple[float, int, list[tuple[int, float]]]]


class Tokenizer(Protocol):
    def decode(self, token_ids: list[int]) -> str:
        """Text, without special tokens."""

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes, special tokens included: part of a character, maybe."""


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, stop_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids

    def append(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None = None) -> str:
        """Add one sampled token to `seq`; the text that may be sent now."""
        seq.output_ids.append(token)  # counted in usage even when it ends the sequence, as vLLM does
        complete = seq.grammar is not None and seq.grammar.advance(token)
        may_stop = len(seq.output_ids) > seq.params.min_tokens
        if token in self.stop_token_ids and (complete or not seq.params.ignore_eos and may_stop):
            return self._finish(seq, "stop")
        start = len(seq.text)
        seq.text += self._new_text(seq)
        if logprobs is not None:
            seq.logprobs.append((start, len(seq.text), self._entry(token, *logprobs, seq.echo_length + start)))
        stop_at = _find_stop(seq) if may_stop else -1
        if stop_at >= 0:
            seq.text = seq.text[:stop_at]
            return self._finish(seq, "stop")
        if complete:
            return self._finish(seq, "stop")
        if len(seq.output_ids) >= seq.max_tokens:
            return self._finish(seq, "length")
        end = len(seq.text) - (_stop_prefix_len(seq) if may_stop else 0)  # hold back a stop string's start
        delta = seq.text[seq.sent:end]
        seq.sent = max(seq.sent, end)
        return delta

    @staticmethod
    def take_logprobs(seq: Sequence) -> list[TokenLogprob]:
        """The entries of the tokens whose text has been sent: a token's entry leaves with the
        text it made, so that the two stay in step. Once the sequence has ended, that is every
        token with text in the output: none of a stop string, none of end-of-sequence."""
        if seq.finish_reason:
            taken = [entry for start, _, entry in seq.logprobs if start < len(seq.text)]
            seq.logprobs = []
            return taken
        sent = next((i for i, (_, end, _) in enumerate(seq.logprobs) if end > seq.sent), len(seq.logprobs))
        taken, seq.logprobs = [entry for *_, entry in seq.logprobs[:sent]], seq.logprobs[sent:]
        return taken

    def take_prompt_logprobs(self, seq: Sequence) -> list[PromptToken] | None:
        """Every prompt token, named, with its logprob (none for the first) and where its text
        starts in the prompt's; None where the job did not ask, or once they are taken."""
        if seq.prompt_logprobs is None:
            return None
        found, seq.prompt_logprobs = seq.prompt_logprobs, None
        ids = seq.prompt_ids
        tokens = [PromptToken(ids[0], *self._name(ids[0]), 0)]
        for token, offset, (logprob, rank, top) in zip(ids[1:], self._offsets(ids)[1:], found):
            alternatives = [Alternative(*self._name(t), _floored(lp), t) for t, lp in top]
            tokens.append(PromptToken(token, *self._name(token), offset, _floored(logprob), rank, alternatives))
        return tokens

    def _new_text(self, seq: Sequence) -> str:
        """Text of the last token. Decoding a small window, not the whole output, keeps this
        O(1) per token."""
        added = self._text_added(_window(seq, seq.prefix_offset), seq.read_offset - seq.prefix_offset)
        if added is None:
            return ""
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.output_ids)
        return added

    def _text_added(self, window: list[int], read: int) -> str | None:
        """The text that the tokens of `window` from `read` on add to those before them, or
        None while it is not text yet: a window ending in U+FFFD is an incomplete UTF-8
        character, which waits for the next token."""
        before = self.tokenizer.decode(window[:read])
        after = self.tokenizer.decode(window)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            return after[len(before):]
        return None

    def _offsets(self, token_ids: list[int]) -> list[int]:
        """Where each token's text starts in the text of them all, decoded a small window at
        a time as the output is, so that a long prompt costs time in proportion to its length."""
        offsets, length, prefix, read = [], 0, 0, 0
        for end in range(1, len(token_ids) + 1):
            offsets.append(length)
            added = self._text_added(token_ids[prefix:end], read - prefix)
            if added is not None:
                length += len(added)
                prefix, read = read, end
        return offsets

    def _entry(self, token: int, logprob: float, top: list[tuple[int, float]], offset: int) -> TokenLogprob:
        alternatives = [Alternative(*self._name(t), _floored(lp)) for t, lp in top]
        return TokenLogprob(*self._name(token), _floored(logprob), alternatives, offset)

    def _name(self, token_id: int) -> tuple[str, bytes]:
        """A token's name and bytes. A token holding part of a character is named by its
        bytes, as OpenAI names it ("bytes:\\xf0\\x9f"); clients rebuild the character from them."""
        raw = self.tokenizer.token_bytes(token_id)
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    @staticmethod
    def _finish(seq: Sequence, reason: str) -> str:
        """End `seq`; all its text not yet sent."""
        seq.finish_reason = reason
        delta = seq.text[seq.sent:]
        seq.sent = len(seq.text)
        return delta


def _window(seq: Sequence, start: int, end: int | None = None) -> list[int]:
    """Tokens start to end of the output, where negative positions are the prompt's last
    tokens (-1 its last) rather than Python's count from the end."""
    end = len(seq.output_ids) if end is None else end
    prompt_end = len(seq.prompt_ids) + min(end, 0)
    from_prompt = seq.prompt_ids[len(seq.prompt_ids) + start:prompt_end] if start < 0 else []
    return from_prompt + seq.output_ids[max(start, 0):max(end, 0)]


def _find_stop(seq: Sequence) -> int:
    """Where the first stop string starts in the text, or -1. Text before `sent` was checked
    already and holds no stop string's start."""
    hits = [i for i in (seq.text.find(s, seq.sent) for s in seq.params.stop) if i >= 0]
    return min(hits, default=-1)


def _stop_prefix_len(seq: Sequence) -> int:
    """The longest tail of the unsent text that is a stop string's start."""
    text, longest = seq.text, 0
    for stop in seq.params.stop:
        for k in range(min(len(stop) - 1, len(text) - seq.sent), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _floored(logprob: float) -> float:
    """The logprob, or the floor for -inf and NaN (a NaN is not >= anything)."""
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR
