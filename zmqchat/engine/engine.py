"""The engine: runs many sequences at once and turns their tokens into text, step by step.

The worker turns each protocol.Submit job into a Sequence with `prepare()` (on a thread of
its own: it encodes the job's prompt, a chat through the model's template or text or token
ids for a completion, with the runner's tokenizer, and checks it, or raises JobError); its
engine thread hands sequences to `add()` and ids to `cancel()`, and calls `step()` in a loop. A step asks the
scheduler for the batch, has the runner (a model, or the fake) produce each sequence's next
token, and the detokeniser turn it into text; it returns a protocol.Output for each sequence
with new text or that finished, and finished sequences leave the scheduler. A sequence's first
output carries its prompt's logprobs where the job asked; one with max_tokens 0 only scores its
prompt, and ends after its prefill. An embedding job becomes an EmbedJob instead, queued apart:
each step also embeds the next of their inputs (within a budget, see embedding.py), and sends
their vectors in each job's Output.
"""

from __future__ import annotations

import functools
from typing import Protocol

from zmqchat.config import BLOCK_SIZE, DEFAULT_MAX_TOKENS, SLOTS, STEP_TOKENS
from zmqchat.engine.detokenizer import Detokenizer
from zmqchat.engine.embedding import EMBED_BYTES_PER_STEP, EmbedJob, packed, take_inputs
from zmqchat.engine.kv_cache import BlockManager
from zmqchat.engine.scheduler import Batch, Scheduler
from zmqchat.engine.sequence import Sequence, resolve
from zmqchat.grammar import Matcher
from zmqchat.protocol import TASKS, ChatMessage, Constraint, ErrorCode, Function, JobError, Output, Submit, Usage

PROMPTS_REMEMBERED = 8  # tokenised prompts kept, for the choices of one request that follow each other


class Runner(Protocol):
    """What the engine needs of a model: HFRunner's, or FakeRunner's."""

    model_name: str
    context_window: int  # tokens of prompt and output the model can hold
    num_blocks: int  # blocks of BLOCK_SIZE tokens in its KV cache (kv_cache.py)
    vocab_size: int  # token ids in a prompt must be below this
    stop_token_ids: set[int]
    sampling_defaults: dict  # the model's own temperature and top_p, if it has them
    max_token_chars: int | None  # characters of the vocabulary's longest token (None: no bound)
    embedding_size: int  # values in one of its embeddings

    def encode_chat(self, messages: list[ChatMessage], functions: tuple[Function, ...] = ()) -> list[int]: ...
    def encode_text(self, text: str) -> list[int]: ...
    def decode(self, token_ids: list[int]) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...

    def constrain(self, constraint: Constraint) -> Matcher:
        """A matcher of `constraint` over this model's tokens, or a JobError."""

    def run(self, batch: Batch[Sequence]) -> tuple[list[int], list]:
        """The next token and its logprobs (None where not asked) of each of `batch.sequences`,
        in order. A sequence that wants its prompt's logprobs gets them in `seq.prompt_logprobs`
        by the time its prompt is done."""

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Each input's embedding, of unit length; an input's is the same in any batch."""


class Engine:
    def __init__(self, runner: Runner, slots: int = SLOTS, tasks: tuple[str, ...] = TASKS,
                 step_tokens: int = STEP_TOKENS):
        self.runner = runner
        self.slots = slots
        self.tasks = tasks  # what it takes jobs for: generate, embed
        self.scheduler: Scheduler[Sequence] = Scheduler(slots, BlockManager(runner.num_blocks, BLOCK_SIZE),
                                                        step_tokens)
        self.detokenizer = Detokenizer(runner, runner.stop_token_ids)
        self.embed_jobs: dict[str, EmbedJob] = {}  # in arrival order
        # Vectors one step may send: a frame holds so many, whatever the model's size.
        self.embed_inputs_per_step = max(1, EMBED_BYTES_PER_STEP // (4 * runner.embedding_size))

    @property
    def model_name(self) -> str:
        return self.runner.model_name

    @property
    def max_model_len(self) -> int:
        return self.runner.context_window

    @property
    def has_work(self) -> bool:
        return len(self.scheduler) > 0 or bool(self.embed_jobs)

    def job_ids(self) -> list[str]:
        return [*self.scheduler.by_id, *self.embed_jobs]

    def prepare(self, job: Submit) -> Sequence | EmbedJob:
        """The job's Sequence (its prompt encoded and checked against the model's window), or
        EmbedJob, or a JobError. It reads no batch state, so the worker calls it on a thread of
        its own: a long prompt's tokenisation never stalls the running batch."""
        if job.task not in self.tasks:
            raise JobError(ErrorCode.INVALID_REQUEST, f"this worker does not {job.task} with its model")
        if job.embed is not None:
            return self._prepare_embedding(job)
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
                           f"this worker's KV cache holds ({self.scheduler.max_tokens} tokens); "
                           "ask for fewer max_tokens")
        return seq

    def add(self, seq: Sequence | EmbedJob) -> None:
        """A prepared sequence joins the queue for the batch; an embedding job, its own."""
        if len(self.scheduler) + len(self.embed_jobs) >= self.slots:
            raise JobError(ErrorCode.OVERLOADED, "the worker has no free slot")
        if self.scheduler.get(seq.id) is not None or seq.id in self.embed_jobs:
            raise JobError(ErrorCode.INVALID_REQUEST, f"request id {seq.id} is already running")
        if isinstance(seq, EmbedJob):
            self.embed_jobs[seq.id] = seq
            return
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

    def _check_length(self, characters: int, what: str = "the prompt", param: str = "") -> None:
        """Refuse, before tokenising it, a prompt longer than the context window could hold
        even if each of its tokens were the longest in the vocabulary."""
        longest = self.runner.max_token_chars
        window = self.runner.context_window
        if longest and characters > window * longest:
            raise JobError(ErrorCode.CONTEXT_LENGTH,
                           f"This model's maximum context length is {window} tokens. However, {what} has "
                           f"{characters} characters, more than {window} tokens can hold (none is longer than "
                           f"{longest} characters). Please shorten it.", param)

    def _prepare_embedding(self, job: Submit) -> EmbedJob:
        """The job's inputs tokenised and checked: each within the context window, and the
        dimensions asked for within the model's."""
        size, dimensions = self.runner.embedding_size, job.embed.dimensions
        if dimensions is not None and dimensions > size:
            raise JobError(ErrorCode.INVALID_REQUEST, f"dimensions ({dimensions}) is more than this model's "
                                                      f"embeddings have ({size})", "dimensions")
        return EmbedJob(job.id, [self._embedding_input(i, given) for i, given in enumerate(job.embed.inputs)],
                        dimensions)

    def _embedding_input(self, index: int, given: str | list[int]) -> list[int]:
        window, vocab, what = self.runner.context_window, self.runner.vocab_size, f"input[{index}]"
        if isinstance(given, str):
            self._check_length(len(given), what, "input")
            tokens = self.runner.encode_text(given)
        elif all(0 <= t < vocab for t in given):
            tokens = given
        else:
            raise JobError(ErrorCode.INVALID_REQUEST, f"{what} holds token ids outside [0, {vocab})", "input")
        if not tokens:
            raise JobError(ErrorCode.INVALID_REQUEST, f"{what} has no tokens", "input")
        if len(tokens) > window:
            raise JobError(ErrorCode.CONTEXT_LENGTH, f"{what} has {len(tokens)} tokens, more than this model's "
                                                     f"maximum context length of {window} tokens", "input")
        return tokens

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
        if job_id in self.embed_jobs:
            embedding = self.embed_jobs.pop(job_id)
            return Output(job_id, finish="cancelled", usage=Usage(embedding.prompt_tokens, 0))
        seq = self.scheduler.get(job_id)
        if seq is None:
            return None
        seq.finish_reason = "cancelled"
        self.scheduler.remove(seq)
        return self._output(seq, "")

    def step(self) -> list[Output]:
        return self._generate() + self._embed()

    def _generate(self) -> list[Output]:
        """One step of the running sequences: a token for each that decodes, or finishes its prompt."""
        batch = self.scheduler.schedule()
        tokens, tokens_logprobs = self.runner.run(batch)
        self.scheduler.computed(batch)
        outputs = []
        for seq, token, logprobs in zip(batch.sequences, tokens, tokens_logprobs):
            if seq.max_tokens == 0:  # it only scores its prompt: the token is not its to keep
                seq.finish_reason, delta = "length", ""
            else:
                delta = self.detokenizer.append(seq, token, logprobs)
            if seq.pending_echo:
                delta, seq.pending_echo = seq.pending_echo + delta, ""
            if seq.finish_reason:
                self.scheduler.remove(seq)
                outputs.append(self._output(seq, delta))
            elif delta or seq.prompt_logprobs is not None:
                outputs.append(self._output(seq, delta))
        return outputs

    def _embed(self) -> list[Output]:
        """One step of the embedding jobs: their next inputs' vectors, sent as they are made."""
        if not self.embed_jobs:
            return []
        batch = take_inputs(list(self.embed_jobs.values()), self.embed_inputs_per_step)
        vectors = iter(self.runner.embed(batch.inputs))
        outputs = []
        for job, count in batch.taken:
            job.done += count
            embeddings = [packed(next(vectors), job.dimensions) for _ in range(count)]
            if job.finished:
                del self.embed_jobs[job.id]
                outputs.append(Output(job.id, embeddings=embeddings, finish="stop", usage=Usage(job.prompt_tokens, 0)))
            else:
                outputs.append(Output(job.id, embeddings=embeddings))
        return outputs

    def _output(self, seq: Sequence, text: str) -> Output:
        """`seq`'s output of `text`, with (and handing out) the logprobs that go with it, the
        tokens generated since its last output, and on its first and last its usage so far."""
        logprobs = None if seq.params.logprobs is None else self.detokenizer.take_logprobs(seq)
        first = seq.reported_tokens is None
        tokens = len(seq.output_ids) - (seq.reported_tokens or 0)
        seq.reported_tokens = len(seq.output_ids)
        usage = (Usage(len(seq.prompt_ids), len(seq.output_ids), seq.cached_tokens)
                 if first or seq.finish_reason else None)
        return Output(seq.id, text, tokens, logprobs, seq.finish_reason, usage,
                      self.detokenizer.take_prompt_logprobs(seq))
