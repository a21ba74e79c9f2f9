"""A runner without a model, for fast tests and benchmarks of the plumbing: FakeRunner.

It answers with the words of the last user message (of the prompt, for a completion), one
word per step and then end-of-sequence, taking `delay` seconds a step whatever the batch size
(like a batched forward pass). Its tokens are words with their trailing space; each new word
it reads gets the next id. Its logprobs are certain: 0 for the word it says, the floor for
the alternatives it lists after it. It keeps each batch row's answer as a model keeps a KV
cache row, following the scheduler's Batch. It refuses a job with a constraint (structured
output): its words are no tokenizer that a grammar can match.
"""

from __future__ import annotations

import re
import time

from zmqchat.engine.detokenizer import LOGPROB_FLOOR
from zmqchat.engine.scheduler import Batch
from zmqchat.engine.sequence import Sequence
from zmqchat.protocol import MAX_SLOTS, ChatMessage, Constraint, ErrorCode, JobError

EOS = 0


class FakeRunner:
    def __init__(self, model_name: str = "fake", delay: float = 0.0, context_window: int = 4096):
        self.model_name = model_name
        self.delay = delay
        self.context_window = context_window
        self.stop_token_ids = {EOS}
        self.sampling_defaults: dict = {}  # it samples nothing
        self.max_token_chars = None  # a word is a token, however long
        self.token_budget = MAX_SLOTS * context_window  # no cache to fill: never the limit
        self.words = ["</s>"]  # token id -> word
        self.ids: dict[str, int] = {}
        self.answers: list[list[int]] = []  # per batch row, the tokens it says

    # -- the tokenizer --------------------------------------------------------------------------

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
        self.answers = [self.answers[i] for i in batch.kept] + [self._answer(s) for s in batch.new]
        if not batch.sequences:
            return [], []
        if self.delay:
            time.sleep(self.delay)
        tokens = [answer[len(s.output_ids)] if len(s.output_ids) < len(answer) else EOS
                  for s, answer in zip(batch.sequences, self.answers)]
        return tokens, [self._logprobs(t, s.params.logprobs) for s, t in zip(batch.sequences, tokens)]

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
