"""A runner without a model, for fast tests and benchmarks of the plumbing: FakeRunner.

It answers with the words of the last user message (of the prompt, for a completion), one
word per step and then end-of-sequence, taking `delay` seconds a step whatever the batch size
(like a batched forward pass). Its tokens are words with their trailing space; each new word
it reads gets the next id. Its logprobs are certain: 0 for the word it says (and for each
word of a prompt that asks for its logprobs, rank 1), the floor for the alternatives it lists
after it. Its embedding of an input counts its words, each word one of EMBEDDING_SIZE
values chosen by its id, scaled to unit length. It keeps the answer of each sequence it gives
a token, while it does. It refuses a job with a constraint
(structured output): its words are no tokenizer that a grammar can match.
"""

from __future__ import annotations

import math
import re
import time

from zmqchat.config import BLOCK_SIZE
from zmqchat.engine.detokenizer import LOGPROB_FLOOR
from zmqchat.engine.kv_cache import blocks_holding
from zmqchat.engine.scheduler import Batch
from zmqchat.engine.sequence import Sequence
from zmqchat.protocol import ChatMessage, Constraint, ErrorCode, JobError

EOS = 0
CACHE_WINDOWS = 64  # whole context windows its pretend KV cache holds: more than any test runs at once
EMBEDDING_SIZE = 8


class FakeRunner:
    def __init__(self, model_name: str = "fake", delay: float = 0.0, context_window: int = 4096):
        self.model_name = model_name
        self.delay = delay
        self.context_window = context_window
        self.stop_token_ids = {EOS}
        self.sampling_defaults: dict = {}  # it samples nothing
        self.max_token_chars = None  # a word is a token, however long
        self.token_budget = CACHE_WINDOWS * context_window  # no cache to fill: a pretend one
        self.embedding_size = EMBEDDING_SIZE
        self.words = ["</s>"]  # token id -> word
        self.ids: dict[str, int] = {}
        self.answers: dict[str, list[int]] = {}  # per running sequence, the tokens it says

    # -- the tokenizer --------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return blocks_holding(self.token_budget, BLOCK_SIZE)

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def _tokenize(self, text: str) -> list[int]:
        ids = []
        for word in re.findall(r"\S+\s*", text):
            if word not in self.ids:
                self.ids[word] = len(self.words)
                self.words.append(word)
            ids.append(self.ids[word])
        return ids

    def encode_chat(self, messages: list[ChatMessage], functions=()) -> list[int]:
        """Every word of every message (the tools offered are not read)."""
        prompt = [self._tokenize(m.content) for m in messages]
        if not any(prompt):
            raise JobError(ErrorCode.INVALID_REQUEST, "the conversation has no text")
        return [t for ids in prompt for t in ids]

    def encode_text(self, text: str) -> list[int]:
        return self.encode_chat([ChatMessage("user", text)])

    def decode(self, token_ids: list[int]) -> str:
        """The words, without the end-of-sequence token, as a tokenizer skips its special tokens."""
        return "".join(self.words[t] for t in token_ids if t != EOS)

    def token_bytes(self, token_id: int) -> bytes:
        return self.words[token_id].encode()

    def constrain(self, constraint: Constraint):
        raise JobError(ErrorCode.INVALID_REQUEST, "the fake engine cannot constrain its output (response_format, "
                                                  "structured_outputs, tool_choice required or named): its words "
                                                  "are no tokenizer a grammar can match")

    # -- the "model" ----------------------------------------------------------------------------

    def run(self, batch: Batch[Sequence]) -> tuple[list[int], list]:
        seqs = batch.sequences
        self.answers = {s.id: self.answers.get(s.id) or self._answer(s) for s in seqs}
        for chunk in batch.chunks:
            seq = chunk.seq
            if seq.wants_prompt_logprobs and chunk.start == 0:  # all of them with its first chunk
                seq.prompt_logprobs = [(logprob, 1, top) for logprob, top in
                                       (self._logprobs(t, seq.params.prompt_logprobs) for t in seq.prompt_ids[1:])]
        if not seqs:
            return [], []
        if self.delay:
            time.sleep(self.delay)
        tokens = [self._next(s) for s in seqs]
        return tokens, [self._logprobs(t, s.params.logprobs) for s, t in zip(seqs, tokens)]

    def _next(self, seq: Sequence) -> int:
        answer = self.answers[seq.id]
        return answer[len(seq.output_ids)] if len(seq.output_ids) < len(answer) else EOS

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        if self.delay:
            time.sleep(self.delay)
        counts = [[sum(1 for t in tokens if t % EMBEDDING_SIZE == i) for i in range(EMBEDDING_SIZE)]
                  for tokens in inputs]
        return [[c / math.sqrt(sum(x * x for x in row)) for c in row] for row in counts]

    def _answer(self, seq: Sequence) -> list[int]:
        """The words of the last user message (of the last message, if none is a user's)."""
        messages = seq.job.messages
        if messages is None:
            return seq.prompt_ids
        user = [m for m in messages if m.role == "user"] or messages
        return self._tokenize(user[-1].content) or [EOS]

    def _logprobs(self, token: int, wanted: int | None):
        if wanted is None:
            return None
        others = [t for t in range(min(wanted, len(self.words))) if t != token][:max(wanted - 1, 0)]
        return 0.0, ([(token, 0.0)] + [(t, LOGPROB_FLOOR) for t in others])[:wanted]
