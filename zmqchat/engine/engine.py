"""The engine: runs many sequences at once and turns their tokens into text, step by step.

The worker's engine thread feeds it protocol.Submit jobs with `add()` and ids with
`cancel()`, and calls `step()` in a loop. `add()` encodes the job's prompt (a chat through
the model's template, or text or token ids for a completion) with the runner's tokenizer,
builds its Sequence and hands it to the scheduler, or raises JobError. A step asks the
scheduler for the batch, has the runner (a model, or the fake) produce each sequence's next
token, and the detokeniser turn it into text; it returns a protocol.Output for each sequence
with new text or that finished, and finished sequences leave the scheduler.
"""

from __future__ import annotations

from typing import Protocol

from zmqchat.config import DEFAULT_MAX_TOKENS, SLOTS
from zmqchat.engine.detokenizer import Detokenizer
from zmqchat.engine.scheduler import Batch, Scheduler
from zmqchat.engine.sequence import Sequence, resolve
from zmqchat.protocol import ChatMessage, ErrorCode, JobError, Output, Submit, Usage


class Runner(Protocol):
    """What the engine needs of a model: HFRunner's, or FakeRunner's."""

    model_name: str
    context_window: int  # tokens of prompt and output the model can hold
    token_budget: int  # tokens of KV cache the batch may fill at most
    vocab_size: int  # token ids in a prompt must be below this
    stop_token_ids: set[int]
    sampling_defaults: dict  # the model's own temperature and top_p, if it has them

    def encode_chat(self, messages: list[ChatMessage]) -> list[int]: ...
    def encode_text(self, text: str) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...

    def run(self, batch: Batch[Sequence]) -> tuple[list[int], list]:
        """Each sequence's next token and its logprobs (None where not asked), in batch order."""


class Engine:
    def __init__(self, runner: Runner, slots: int = SLOTS):
        self.runner = runner
        self.slots = slots
        self.scheduler: Scheduler[Sequence] = Scheduler(slots, runner.token_budget)
        self.detokenizer = Detokenizer(runner, runner.stop_token_ids)

    @property
    def model_name(self) -> str:
        return self.runner.model_name

    @property
    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    def job_ids(self) -> list[str]:
        return list(self.scheduler.by_id)

    def add(self, job: Submit) -> None:
        if len(self.scheduler) >= self.slots:
            raise JobError(ErrorCode.OVERLOADED, "the worker has no free slot")
        if self.scheduler.get(job.id) is not None:
            raise JobError(ErrorCode.INVALID_REQUEST, f"request id {job.id} is already running")
        params = resolve(job.params, self.runner.sampling_defaults)
        prompt_ids, prompt_text = self._encode(job)
        seq = Sequence(job.id, prompt_ids, params, self._max_tokens(len(prompt_ids), params.max_tokens), job)
        if params.echo:
            seq.pending_echo = prompt_text if prompt_text is not None else self.runner.decode(prompt_ids)
            seq.echo_length = len(seq.pending_echo)
        if not self.scheduler.fits_alone(seq):
            raise JobError(ErrorCode.INVALID_REQUEST,
                           f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({seq.max_tokens}) is more than "
                           f"this worker's {self.scheduler.max_tokens} tokens in flight; ask for fewer max_tokens")
        self.scheduler.add(seq)

    def _encode(self, job: Submit) -> tuple[list[int], str | None]:
        """The job's prompt tokens, and its text where the client gave text."""
        if job.messages is not None:
            ids, text = self.runner.encode_chat(job.messages), None
        elif isinstance(job.prompt, str):
            ids, text = self.runner.encode_text(job.prompt), job.prompt
        else:
            vocab = self.runner.vocab_size
            if not job.prompt or not all(0 <= t < vocab for t in job.prompt):
                raise JobError(ErrorCode.INVALID_REQUEST,
                               f"a prompt of token ids must be a non-empty list of ids in [0, {vocab})")
            ids, text = list(job.prompt), None
        if not ids:
            raise JobError(ErrorCode.INVALID_REQUEST, "the prompt is empty")
        return ids, text

    def _max_tokens(self, prompt_tokens: int, asked: int | None) -> int:
        window = self.runner.context_window
        if asked is None:
            if prompt_tokens >= window:
                raise JobError(ErrorCode.CONTEXT_LENGTH,
                               f"This model's maximum context length is {window} tokens. However, the "
                               f"prompt has {prompt_tokens} tokens. Please shorten the prompt.")
            return min(DEFAULT_MAX_TOKENS, window - prompt_tokens)
        if prompt_tokens + asked > window:
            raise JobError(ErrorCode.CONTEXT_LENGTH,
                           f"This model's maximum context length is {window} tokens. However, you requested "
                           f"{prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} for the "
                           f"completion). Please reduce the prompt or max_tokens.")
        return asked

    def cancel(self, job_id: str) -> Output | None:
        """The finished output confirming the cancel (so the broker frees the slot), if it held the job."""
        seq = self.scheduler.get(job_id)
        if seq is None:
            return None
        seq.finish_reason = "cancelled"
        self.scheduler.remove(seq)
        self._release_if_idle()
        return self._output(seq, "")

    def step(self) -> list[Output]:
        batch = self.scheduler.schedule()
        if not batch.sequences:
            return []
        outputs = []
        for seq, token, logprobs in zip(batch.sequences, *self.runner.run(batch)):
            delta = self.detokenizer.append(seq, token, logprobs)
            if seq.pending_echo:
                delta, seq.pending_echo = seq.pending_echo + delta, ""
            if seq.finish_reason:
                self.scheduler.remove(seq)
                outputs.append(self._output(seq, delta))
            elif delta:
                outputs.append(self._output(seq, delta))
        self._release_if_idle()
        return outputs

    def _release_if_idle(self) -> None:
        """With nothing left to run, the runner gets the empty batch now, to free its cache,
        rather than at a next step that an idle worker does not take."""
        if not self.has_work:
            self.runner.run(self.scheduler.schedule())

    def _output(self, seq: Sequence, text: str) -> Output:
        """`seq`'s output of `text`, with (and handing out) the logprobs that go with it."""
        logprobs = None if seq.params.logprobs is None else self.detokenizer.take_logprobs(seq)
        usage = Usage(len(seq.prompt_ids), len(seq.output_ids)) if seq.finish_reason else None
        return Output(seq.id, text, logprobs, seq.finish_reason, usage)
