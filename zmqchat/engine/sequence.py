"""A request's tokens and state, from the engine's `add()` to its last output.

A Sequence is built by the engine from a protocol.Submit: its prompt tokens, its sampling
parameters resolved with the model's own defaults, and the most tokens it may generate. The
scheduler's BlockManager keeps its place in the KV cache; the runner notes its random stream
and, where the job asked, its prompt tokens' logprobs; the detokeniser appends each sampled
token, with the text it makes, and the pending logprobs that leave with that text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from zmqchat.engine.detokenizer import DETOKENIZER_CONTEXT, PromptLogprobs
from zmqchat.protocol import SamplingParams, Submit, TokenLogprob

if TYPE_CHECKING:
    import torch

    from zmqchat.grammar import Matcher


def resolve(params: SamplingParams, defaults: dict) -> SamplingParams:
    """`params` with temperature and top_p set: the request's, else the model's own
    (`defaults`, from its generation config), else 1.0."""
    def pick(name: str) -> float:
        asked = getattr(params, name)
        return float(asked if asked is not None else defaults.get(name, 1.0))

    return msgspec.structs.replace(params, temperature=pick("temperature"), top_p=pick("top_p"))


@dataclass(eq=False)
class Sequence:
    id: str
    prompt_ids: list[int]
    params: SamplingParams  # resolved: temperature and top_p are numbers
    max_tokens: int
    job: Submit | None = None  # what the client sent (the fake runner answers its last user message)
    grammar: Matcher | None = None  # where a constrained sequence is in its grammar (zmqchat/grammar.py)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    generator: torch.Generator | None = None  # its own random stream, where it asked for a seed
    # Its place in the KV cache (kv_cache.py), kept by the scheduler's BlockManager.
    blocks: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    computed_tokens: int = 0
    cached_tokens: int = 0  # of the prompt, whose KV was found in the cache
    reserved_blocks: int = 0
    reported_tokens: int | None = None  # of output_ids, those its outputs have counted; None: no output yet
    # Where the job asked: each prompt token's but the first, set at prefill, taken by the first output.
    prompt_logprobs: PromptLogprobs | None = None
    # The detokeniser's state.
    text: str = ""  # output decoded so far
    sent: int = 0  # characters of `text` already handed out
    # Its window over output_ids, as vLLM and TGI keep it; negative offsets reach back into
    # the prompt's last tokens.
    prefix_offset: int = 0
    read_offset: int = 0
    # Logprobs not yet handed out: (start, end) of the token's text in `text`, and its entry.
    logprobs: list[tuple[int, int, TokenLogprob]] = field(default_factory=list)
    # Echo: the prompt's text, sent before the first output, which logprob offsets count in.
    pending_echo: str = ""
    echo_length: int = 0

    def __post_init__(self):
        self.prefix_offset = -min(DETOKENIZER_CONTEXT, len(self.prompt_ids))

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    @property
    def must_go_on(self) -> bool:
        """Short of its min_tokens, it may not end; a grammar decides that alone."""
        return len(self.output_ids) < self.params.min_tokens and self.grammar is None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of the prompt followed by the output."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:end] + self.output_ids[:max(end - n, 0)]

    @property
    def reserved_tokens(self) -> int:
        """The most cache this sequence may need: its prompt and every token it may generate."""
        return len(self.prompt_ids) + self.max_tokens
