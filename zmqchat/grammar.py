"""Structured output: a job's protocol.Constraint as a grammar, matched token by token. The one
module that speaks llguidance (chosen by measurement, bin/grammar-bench: it compiles a JSON
schema in about 1 ms where xgrammar takes 400 ms and outlines-core 2 s, and its masks for a
batch of 16 cost about 1 ms a step, under 1% of a decode step here).

The API `check()`s each constraint it builds, without a tokenizer, so that a bad schema, regex
or grammar is a 400 naming its parameter. On the worker, the preparing thread turns a job's
constraint into a Matcher with its runner's Grammars (compiled once per constraint and kept);
each step the sampler has `fill_bitmask()` write the allowed tokens of the batch's constrained
sequences, and the detokeniser `advance()`s a sequence's matcher by the token it appends: when
the grammar can take no more, the sequence ends.
"""

from __future__ import annotations

import functools
import json

import llguidance
import llguidance.gbnf_to_lark
import llguidance.hf

from zmqchat.protocol import Constraint, ErrorCode, JobError

# JSON on one line with json.dumps' separators: whitespace left free lets a small model pad a
# document with newlines until max_tokens, and then it does not parse.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GRAMMARS_REMEMBERED = 256  # compiled constraints a worker keeps: requests often repeat a schema


def grammar_of(constraint: Constraint) -> str:
    """llguidance's grammar for `constraint` (ValueError for a JSON schema that is not a JSON object)."""
    if constraint.kind == "json_schema":
        return llguidance.LLMatcher.grammar_from_json_schema(constraint.source, defaults=JSON_OPTIONS)
    if constraint.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(constraint.source)
    return llguidance.LLMatcher.grammar_from_lark(constraint.source)


def check(constraint: Constraint) -> str | None:
    """Why `constraint` cannot be matched, or None if it can."""
    try:
        return llguidance.LLMatcher.validate_grammar(grammar_of(constraint)) or None
    except ValueError as exc:
        return str(exc)


def lark_of(grammar: str) -> str:
    """A grammar in Lark syntax, converted where it is written as GBNF (llama.cpp's EBNF, with
    `root ::= ...`); ValueError where it is neither."""
    try:
        return llguidance.gbnf_to_lark.any_to_lark(grammar)
    except llguidance.gbnf_to_lark.GbnfToLarkError as exc:
        raise ValueError(f"not a Lark grammar, nor GBNF: {exc}") from None


def lark_literal(text: str) -> str:
    """`text` as a Lark string literal: llguidance reads JSON's escapes in one."""
    return json.dumps(text, ensure_ascii=False)


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def advance(self, token: int) -> bool:
        """Take the token sampled (under this matcher's mask); True when the grammar is complete
        and can take no more tokens (an end-of-sequence token included). A token it refuses
        (none should pass the mask) ends it too, rather than generate past a broken grammar."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped() or self.matcher.is_error()


class Grammars:
    """A tokenizer's compiled grammars. `matcher()` runs on the worker's preparing thread,
    `fill_bitmask()` on the engine thread; a compiled grammar is never changed, only copied."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: set[int]):
        # Tokens past the tokenizer's (an embedding padded to a round size) are never allowed.
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size,
                                                      eos_token=sorted(stop_token_ids))

    def matcher(self, constraint: Constraint) -> Matcher:
        return Matcher(self._compiled(constraint).deep_copy())

    @functools.lru_cache(maxsize=GRAMMARS_REMEMBERED)
    def _compiled(self, constraint: Constraint) -> llguidance.LLMatcher:
        try:
            matcher = llguidance.LLMatcher(self.tokenizer, grammar_of(constraint), log_level=0)
        except ValueError as exc:
            matcher, error = None, str(exc)
        else:
            error = matcher.get_error()
        if error:
            raise JobError(ErrorCode.INVALID_REQUEST, f"the {constraint.kind} constraint cannot be used: {error}")
        return matcher


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()


def fill_bitmask(matchers: list[Matcher], bitmask) -> None:
    """Write each matcher's allowed tokens into its row of `bitmask` (a contiguous int32 CPU
    tensor [len(matchers), words]), the rows in parallel with the GIL released."""
    _executor().unsafe_compute_mask_ptr([(m.matcher, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                        bitmask.shape[1] * 4, bitmask.shape[0])
