"""Structured output below the API: grammars checked and compiled (zmqchat/grammar.py), and
their masks applied per row in the sampler, where rows without a constraint cost nothing."""

from __future__ import annotations

import json

import pytest
import torch

from zmqchat import grammar
from zmqchat.engine import sampler
from zmqchat.engine.sequence import Sequence
from zmqchat.protocol import Constraint, SamplingParams

VOCAB = 70  # not a multiple of 32: the last word of a bitmask is partly unused


def bitmask_allowing(*rows: list[int]) -> torch.Tensor:
    """A packed bitmask (int32 words), one row per list of allowed token ids."""
    words = torch.zeros(len(rows), (VOCAB + 31) // 32, dtype=torch.int64)
    for i, allowed in enumerate(rows):
        for token in allowed:
            words[i, token // 32] |= 1 << (token % 32)
    return words.to(torch.int32)  # bit 31 wraps to the sign, as the libraries write it


def seq(grammar=None, **params) -> Sequence:
    s = Sequence("s", [1, 2], SamplingParams(**{"temperature": 1.0, "top_p": 1.0, **params}), 10)
    s.grammar = grammar
    return s


def test_a_bitmask_unpacks_bit_j_of_word_w_as_token_32w_plus_j():
    allowed = [0, 5, 31, 32, 63, 69]
    unpacked = sampler.unpack_bitmask(bitmask_allowing(allowed), VOCAB)
    assert unpacked.shape == (1, VOCAB) and unpacked[0].nonzero().flatten().tolist() == allowed


def test_only_the_constrained_rows_are_masked():
    logits = torch.randn(3, VOCAB)
    masked = sampler.mask_rows(logits, [0, 2], bitmask_allowing([3, 40], [7]))
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [3, 40]
    assert torch.equal(masked[0, [3, 40]], logits[0, [3, 40]])
    assert torch.equal(masked[1], logits[1])  # no constraint: untouched
    assert torch.isfinite(masked[2]).nonzero().flatten().tolist() == [7]
    assert torch.isfinite(logits).all()  # the runner's logits are not changed in place


def test_a_batch_without_constraints_pays_nothing(monkeypatch):
    monkeypatch.setattr(sampler, "fill_bitmask", lambda *_: pytest.fail("no mask is computed"))
    logits = torch.randn(2, VOCAB)
    assert sampler.apply_grammars(logits, [seq(), seq()]) is logits


class Allows:
    """A stand-in matcher that allows a fixed set of tokens."""

    def __init__(self, *tokens: int):
        self.tokens = list(tokens)


def test_sampling_picks_only_what_each_rows_grammar_allows(monkeypatch):
    def fill(matchers, bitmask):
        bitmask.copy_(bitmask_allowing(*[m.tokens for m in matchers]))

    monkeypatch.setattr(sampler, "fill_bitmask", fill)
    logits = torch.zeros(3, VOCAB)
    logits[:, 9] = 50.0  # what an unconstrained row all but surely picks
    seqs = [seq(Allows(4, 65)), seq(), seq(Allows(12), temperature=0.0, logprobs=1)]
    for _ in range(20):
        tokens, logprobs = sampler.sample(logits, seqs, [None] * 3, set())
        assert tokens[0] in (4, 65) and tokens[1] == 9 and tokens[2] == 12
        assert logprobs[2][0] == 0.0  # the grammar's only token is certain


def test_min_tokens_does_not_ban_the_end_a_grammar_allows():
    logits = torch.zeros(2, VOCAB)
    biased = sampler.apply_biases(logits, [seq(min_tokens=5), seq(Allows(0), min_tokens=5)], {0})
    assert biased[0, 0] == float("-inf") and biased[1, 0] == 0.0


@pytest.mark.parametrize("constraint, error", [
    (Constraint("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}})), None),
    (Constraint("json_schema", json.dumps({"type": "integer", "minimum": "x"})), "minimum"),
    (Constraint("json_schema", "[1, 2]"), "object"),
    (Constraint("regex", r"[0-9]{3}-\w+"), None),
    (Constraint("regex", "(unclosed"), "unclosed"),
    (Constraint("lark", 'start: "yes" | "no"'), None),
    (Constraint("lark", 'start: "<tool_call>" %json {"type": "object"} "</tool_call>"'), None),
    (Constraint("lark", "start: undefined_rule"), "undefined_rule"),
])
def test_check_says_why_a_constraint_cannot_be_matched(constraint, error):
    found = grammar.check(constraint)
    assert found is None if error is None else error in found


def test_a_choice_literal_keeps_quotes_newlines_and_any_character():
    choices = ['say "hi"', "two\nlines", "back\\slash", "été 🌍"]
    source = "start: " + " | ".join(grammar.lark_literal(c) for c in choices)
    assert grammar.check(Constraint("lark", source)) is None


def test_gbnf_is_converted_to_lark_and_nonsense_is_refused():
    assert grammar.check(Constraint("lark", grammar.lark_of('root ::= "a" | "b"'))) is None
    with pytest.raises(ValueError, match="GBNF"):
        grammar.lark_of("root ::= (")


# -- on the default model's tokenizer ------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from zmqchat import models

    return AutoTokenizer.from_pretrained(models.resolve(None, None)[0])


@pytest.mark.model
def test_a_matcher_follows_a_schema_and_says_when_it_is_complete(tokenizer):
    grammars = grammar.Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    schema = Constraint("json_schema", json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                   "required": ["ok"], "additionalProperties": False}))
    matcher = grammars.matcher(schema)
    assert grammars._compiled(schema) is grammars._compiled(schema)  # compiled once
    bitmask = torch.zeros(1, (len(tokenizer) + 31) // 32, dtype=torch.int32)
    tokens = tokenizer('{"ok": true}', add_special_tokens=False).input_ids
    for token in tokens:
        grammar.fill_bitmask([matcher], bitmask)
        assert sampler.unpack_bitmask(bitmask, len(tokenizer))[0, token]
        done = matcher.advance(token)
    assert done  # nothing can follow the closing brace
    fresh = grammars.matcher(schema)  # a new sequence starts at the beginning
    grammar.fill_bitmask([fresh], bitmask)
    assert not sampler.unpack_bitmask(bitmask, len(tokenizer))[0, tokens[-1]]


@pytest.mark.model
def test_a_constraint_the_tokenizer_cannot_follow_is_a_job_error(tokenizer):
    from zmqchat.protocol import JobError

    grammars = grammar.Grammars(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    with pytest.raises(JobError, match="regex"):
        grammars.matcher(Constraint("regex", "(unclosed"))
