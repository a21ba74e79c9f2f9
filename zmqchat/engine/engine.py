"""The engine: runs many sequences at once and turns their tokens into text, step by step.

The worker turns each protocol.Submit job into a Sequence with `prepare()` (on a thread of
its own: it encodes the job's prompt, a chat through the model's template or text or token
ids for a completion, with the runner's tokenizer, and checks it, or raises JobError); its
engine thread hands sequences to `add()` and ids to `cancel()`, and calls `step()` in a loop. A step asks the
scheduler for the batch, has the runner (a model, or the fake) produce each sequence's next
token, and the detokeniser turn it into text; it returns a protocol.Output for each sequence
with new text or that finished, and finished sequences leave the scheduler.
"""

from __future__ import annotations

import functools
from typing import Protocol

from zmqchat.config import DEFAULT_MAX_TOKENS, SLOTS
from zmqchat.engine.detokenizer import Detokenizer
from zmqchat.engine.scheduler import Batch, Scheduler
from zmqchat.engine.sequence import Sequence, resolve
from zmqchat.grammar import Matcher
from zmqchat.protocol import ChatMessage, Constraint, ErrorCode, Function, JobError, Output, Submit, Usage

PROMPTS_REMEMBERED = 8  # tokenised prompts kept, for the choices of one request that follow each other


class Runner(Protocol):
    """What the engine needs of a model: HFRunner's, or FakeRunner's."""

    model_name: str
    context_window: int  # tokens of prompt and output the model can hold
    token_budget: int  # tokens of KV cache the batch may fill at most
    vocab_size: int  # token ids in a prompt must be below this
    stop_token_ids: set[int]
    sampling_defaults: dict  # the model's own temperature and top_p, if it has them
    max_token_chars: int | None  # characters of the vocabulary's longest token (None: no bound)

    def encode_chat(self, messages: list[ChatMessage], functions: tuple[Function, ...] = ()) -> list[int]: ...
    def encode_text(self, text: str) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...

    def constrain(self, constraint: Constraint) -> Matcher:
        """A matcher of `constraint` over this model's tokens, or a JobError."""

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
    def max_model_len(self) -> int:
        return self.runner.context_window

    @property
    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    def job_ids(self) -> list[str]:
        return list(self.scheduler.by_id)

    def prepare(self, job: Submit) -> Sequence:
        """The job's Sequence: its prompt encoded and checked against the model's window, or a
        JobError. It reads no batch state, so the worker calls it on a thread of its own: a
        long prompt's tokenisation never stalls the running batch."""
        params = resolve(job.params, self.runner.sampling_defaults)
        if any(token >= self.runner.vocab_size for token in params.logit_bias):
            raise JobError(ErrorCode.INVALID_REQUEST,
                           f"logit_bias names a token id outside the vocabulary [0, {self.runner.vocab_size})")
        prompt_ids, prompt_text = self._encode(job)
        seq = Sequence(job.id, prompt_ids, params, self._max_tokens(len(prompt_ids), params.max_tokens), job)
        if params.constraint is not None:  # compiled here, off the engine thread
            seq.grammar = self.runner.constrain(params.constraint)
        if params.echo and prompt_text is not None:  # token ids are decoded for echo by add(), on the engine thread
            seq.pending_echo, seq.echo_length = prompt_text, len(prompt_text)
        if not self.scheduler.fits_alone(seq):
            raise JobError(ErrorCode.INVALID_REQUEST,
                           f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({seq.max_tokens}) is more than "
                           f"this worker's {self.scheduler.max_tokens} tokens in flight; ask for fewer max_tokens")
        return seq

    def add(self, seq: Sequence) -> None:
        """A prepared sequence joins the queue for the batch."""
        if len(self.scheduler) >= self.slots:
            raise JobError(ErrorCode.OVERLOADED, "the worker has no free slot")
        if self.scheduler.get(seq.id) is not None:
            raise JobError(ErrorCode.INVALID_REQUEST, f"request id {seq.id} is already running")
        if seq.params.echo and not isinstance(seq.job.prompt, str):
            seq.pending_echo = self.runner.decode(seq.prompt_ids)
            seq.echo_length = len(seq.pending_echo)
        self.scheduler.add(seq)

    def _encode(self, job: Submit) -> tuple[list[int], str | None]:
        """The job's prompt tokens, and its text where the client gave text."""
        if job.messages is not None:
            self._check_length(sum(len(m.content) + sum(len(c.arguments) for c in m.tool_calls) for m in job.messages)
                               + sum(len(f.description) + len(f.parameters) for f in job.tools))
            ids, text = self._encoded(tuple(job.messages), job.tools), None
        elif isinstance(job.prompt, str):
            self._check_length(len(job.prompt))
            ids, text = self._encoded(job.prompt), job.prompt
        else:
            vocab = self.runner.vocab_size
            if not job.prompt or not all(0 <= t < vocab for t in job.prompt):
                raise JobError(ErrorCode.INVALID_REQUEST,
                               f"a prompt of token ids must be a non-empty list of ids in [0, {vocab})")
            ids, text = job.prompt, None
        if not ids:
            raise JobError(ErrorCode.INVALID_REQUEST, "the prompt is empty")
        return list(ids), text

    @functools.lru_cache(maxsize=PROMPTS_REMEMBERED)
    def _encoded(self, prompt: str | tuple[ChatMessage, ...], functions: tuple[Function, ...] = ()) -> tuple[int, ...]:
        """A prompt's tokens, remembered: the n choices of a request arrive as n jobs with one
        prompt, which is tokenised once."""
        if isinstance(prompt, str):
            return tuple(self.runner.encode_text(prompt))
        return tuple(self.runner.encode_chat(list(prompt), functions))

    def _check_length(self, characters: int) -> None:
        """Refuse, before tokenising it, a prompt longer than the context window could hold
        even if each of its tokens were the longest in the vocabulary."""
        longest = self.runner.max_token_chars
        window = self.runner.context_window
        if longest and characters > window * longest:
            raise JobError(ErrorCode.CONTEXT_LENGTH,
                           f"This model's maximum context length is {window} tokens. However, the prompt has "
                           f"{characters} characters, more than {window} tokens can hold (none is longer than "
                           f"{longest} characters). Please shorten the prompt.")

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
        usage = Usage(len(seq.prompt_ids), len(seq.output_ids), seq.cached_tokens) if seq.finish_reason else None
        return Output(seq.id, text, logprobs, seq.finish_reason, usage)
