"""The zmqchat wire protocol, ZMQCHAT/3: every message between frontends, broker and workers.

A message is three ZeroMQ frames, after the peer's identity on a ROUTER socket:

    [b"ZMQCHAT/3"] [command: 1 byte] [body: msgpack]

Each command's body is one typed struct below, encoded by msgspec. Nothing outside this
module builds or parses frames: `encode()` turns a message into frames; `decode()` turns
frames into a message, or raises ProtocolError for anything else (another protocol or
version, an unknown command, a missing or mistyped field, a value out of range), which the
receiver logs and drops. So no handler ever looks into an unchecked body.

  READY       W->B     Ready: the worker's id, the models it serves and for which tasks (generate,
                       embed), its slots, host, device, pid
  HEARTBEAT   W<->B    Heartbeat; a frontend's HEARTBEAT (F->B) is answered with the broker's id,
              F<->B    new after a restart. A frontend silent for long has its jobs cancelled.
  SUBMIT      F->B->W  Submit: one job (one choice of a request): id, model, timeout in seconds,
                       SamplingParams (with a Constraint for structured output), and one of
                       `messages` (a chat: turns, tool calls and results, and the tools offered),
                       `prompt` (a completion: text or token ids) or `embed` (an embeddings
                       request: all its inputs). Its task (generate, or embed) is all the broker
                       reads of it: it goes to a worker that serves the model for that task
  CANCEL      F->B->W  Cancel: job ids
  STEP        W->B->F  Step: one engine step's Output for each sequence it advanced: new text,
                       the number of tokens it covers, their logprobs where the job asked, and
                       for a finished sequence its finish reason; a sequence's first and last
                       outputs carry its usage so far (so a frontend knows the prompt's size from
                       the start), and its first also its prompt's tokens' logprobs where asked;
                       an embedding job's outputs carry the vectors of the inputs embedded that
                       step, in order. The broker frees a slot for each finished output.
  ERROR       W/B->F   Error: a job that ended without an answer, with an ErrorCode (never an HTTP
                       status: which status a code gets is the API's business)
  DISCONNECT  W->B     Disconnect: with `drain`, the worker takes no new jobs and finishes those it
                       has; without, it leaves now (its jobs are requeued or failed)
              B->W     the broker does not know this worker: it must send READY again
  STATUS      F->B     Status with a token; B->F the same token and a StatusReport
                       (workers, models, queues)

Structs that cross the wire once per job or per peer are msgpack maps (field names as keys);
those sent for every token (Output and what it holds) are arrays of their fields in order, since
they are the hot path. An array holds every field, defaults too (msgspec omits defaults from
maps only), so a field added to Output costs its bytes in every output.

The limits here (sizes, counts, the ranges of sampling parameters) are the wire's own, checked
on decode; the API's request schemas use the same constants.
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal, Union

import msgspec
from msgspec import Meta, Struct, field

PROTOCOL = b"ZMQCHAT/3"  # /3: Output counts its tokens, and its first carries usage

# -- limits -------------------------------------------------------------------------------

MAX_INT = 2**31 - 1  # for counts: more is a mistake
# A frame bigger than this is a broken or hostile peer: every socket refuses it unread
# (ZMQ_MAXMSGSIZE). Twice the API's 4 MiB request limit, so that any request it takes fits.
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_ID = 256  # characters of a job or worker id
MAX_NAME = 256  # characters of a model name
MAX_MODELS = 64  # models one worker may announce
MAX_SLOTS = 4096  # slots one worker may announce
MAX_CANCEL = 4096  # ids in one CANCEL
MAX_TIMEOUT = 3600.0  # longest a job may take, in seconds
MAX_STOP_STRINGS = 16  # each is checked at every token; OpenAI allows 4
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI allows
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-MAX_PENALTY, MAX_PENALTY]
SEED_RANGE = (-(2**63), 2**63 - 1)  # a seed must fit an int64
MAX_LOGIT_BIAS = 100.0  # a bias lies in [-100, 100], as OpenAI's; -100 bans the token
MAX_BIASED_TOKENS = 1024  # tokens one request may bias
MAX_EMBED_INPUTS = 256  # inputs of one embeddings request (OpenAI's 2048 would not fit a frame's vectors)
MAX_TOOLS = 128  # tools one request may offer, and calls one message may carry, as OpenAI allows
MAX_GRAMMAR = 256 * 1024  # characters of a constraint's source: a JSON schema, a regex or a grammar

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME)]
Count = Annotated[int, Meta(ge=0, le=MAX_INT)]
Probability = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-MAX_PENALTY, le=MAX_PENALTY)]
TokenIds = Annotated[list[Annotated[int, Meta(ge=0, le=MAX_INT)]], Meta(min_length=1)]
Task = Literal["generate", "embed"]  # what a worker does with a model: generate text, or embed inputs
TASKS: tuple[Task, ...] = ("generate", "embed")


class ErrorCode(str, enum.Enum):
    """Why a job ended without an answer."""

    INVALID_REQUEST = "invalid_request"  # the job's parameters or prompt are not acceptable
    CONTEXT_LENGTH = "context_length_exceeded"  # prompt + max_tokens over the model's window
    MODEL_NOT_FOUND = "model_not_found"  # no worker serves the model, but others are connected
    NO_WORKER = "no_worker"  # no worker is connected at all
    OVERLOADED = "overloaded"  # the model's queue (or a worker) is full: try again later
    TIMEOUT = "timeout"  # the job's deadline passed
    WORKER_LOST = "worker_lost"  # the worker generating the job went away mid-answer
    ENGINE_ERROR = "engine_error"  # the worker's engine failed
    BROKER_UNAVAILABLE = "broker_unavailable"  # a frontend lost the broker (never sent on the wire)


class ProtocolError(ValueError):
    """Frames that are not a valid zmqchat message."""


class JobError(Exception):
    """A job refused or failed, raised where it is found and sent as an Error message."""

    def __init__(self, code: ErrorCode, message: str, param: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param  # the request parameter at fault, if one is

    def error(self, job_id: str) -> Error:
        return Error(job_id, self.code, self.message, self.param)


# -- messages -----------------------------------------------------------------------------

class Wire(Struct, omit_defaults=True, forbid_unknown_fields=True):
    """A struct sent as a msgpack map, fields at their defaults left out."""


class Packed(Struct, array_like=True, forbid_unknown_fields=True):
    """A struct sent as a msgpack array of every field, in order."""


class Ready(Wire):
    worker_id: Id
    models: Annotated[list[Name], Meta(min_length=1, max_length=MAX_MODELS)]
    slots: Annotated[int, Meta(ge=1, le=MAX_SLOTS)]
    host: Annotated[str, Meta(max_length=MAX_NAME)] = ""
    device: Annotated[str, Meta(max_length=MAX_NAME)] = ""
    pid: Count = 0
    max_model_len: Count = 0  # the model's context window, in tokens (0: not said)
    tasks: Annotated[list[Task], Meta(min_length=1)] = field(default_factory=lambda: list(TASKS))


class Heartbeat(Wire):
    broker_id: Annotated[str, Meta(max_length=MAX_ID)] = ""  # set in the broker's answer to a frontend


class Constraint(Wire, frozen=True):
    """What a job's output must match, token by token (zmqchat/grammar.py): a JSON schema (as
    JSON text), a regular expression, or a Lark grammar (llguidance's dialect, which may embed
    JSON schemas with %json)."""

    kind: Literal["json_schema", "regex", "lark"]
    source: Annotated[str, Meta(min_length=1, max_length=MAX_GRAMMAR)]


class SamplingParams(Wire, frozen=True):
    """How to sample one job. None means the model's own default (then OpenAI's)."""

    max_tokens: Count | None = None  # 0 (with echo): only score the prompt, generate nothing
    temperature: Annotated[float, Meta(ge=0.0, le=MAX_TEMPERATURE)] | None = None
    top_p: Probability | None = None
    top_k: Count = 0  # 0: no limit
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: Annotated[int, Meta(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stop: Annotated[tuple[Annotated[str, Meta(min_length=1)], ...], Meta(max_length=MAX_STOP_STRINGS)] = ()
    ignore_eos: bool = False  # run to max_tokens (vLLM's extension, for benchmarks)
    logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # top alternatives per token
    echo: bool = False  # the output starts with the prompt (/v1/completions)
    min_tokens: Count = 0  # no end of sequence nor stop string before this many tokens (vLLM's)
    # token id -> added to its logit before sampling (OpenAI's logit_bias)
    logit_bias: Annotated[dict[Annotated[int, Meta(ge=0, le=MAX_INT)],
                               Annotated[float, Meta(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
                          Meta(max_length=MAX_BIASED_TOKENS)] = field(default_factory=dict)
    # The prompt's tokens' logprobs, with this many alternatives each (vLLM's prompt_logprobs)
    prompt_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    constraint: Constraint | None = None  # structured output: only tokens that keep to it are sampled

    def __post_init__(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it is only allowed with echo, to score the prompt")


class ToolCall(Wire, frozen=True):
    """A call an assistant made earlier in the conversation."""

    id: Annotated[str, Meta(max_length=MAX_ID)]
    name: Name
    arguments: str  # a JSON object, as text


class ChatMessage(Wire, frozen=True):
    role: Annotated[str, Meta(min_length=1, max_length=64)]
    content: str
    tool_calls: Annotated[tuple[ToolCall, ...], Meta(max_length=MAX_TOOLS)] = ()  # an assistant's
    tool_call_id: Annotated[str, Meta(max_length=MAX_ID)] = ""  # a tool's result: the call it answers


class Function(Wire, frozen=True):
    """A tool the model may call: for the chat template to render."""

    name: Name
    description: str = ""
    parameters: str = ""  # its arguments' JSON schema, as text ("": any object)


class Embed(Wire):
    """An embeddings request: its inputs (texts or token ids), each embedded into one vector."""

    inputs: Annotated[list[Annotated[str, Meta(min_length=1)] | TokenIds],
                      Meta(min_length=1, max_length=MAX_EMBED_INPUTS)]
    dimensions: Annotated[int, Meta(ge=1, le=MAX_INT)] | None = None  # None: the model's own size


class Submit(Wire):
    id: Id
    model: Name
    timeout: Annotated[float, Meta(gt=0.0, le=MAX_TIMEOUT)]  # seconds from now (clocks differ across machines)
    params: SamplingParams = field(default_factory=SamplingParams)
    messages: Annotated[list[ChatMessage], Meta(min_length=1)] | None = None
    tools: Annotated[tuple[Function, ...], Meta(max_length=MAX_TOOLS)] = ()  # with messages only
    prompt: str | TokenIds | None = None
    embed: Embed | None = None

    def __post_init__(self):
        if [self.messages, self.prompt, self.embed].count(None) != 2:
            raise ValueError("a job has one of messages, a prompt or inputs to embed")

    @property
    def task(self) -> Task:
        return "generate" if self.embed is None else "embed"


class Cancel(Wire):
    ids: Annotated[list[Id], Meta(max_length=MAX_CANCEL)]


class Alternative(Packed):
    token: str  # the token's text, or "bytes:\\xNN..." when it holds part of a character
    raw: bytes  # its bytes
    logprob: float
    id: Count | None = None  # its token id, for a prompt token's alternatives (vLLM's prompt_logprobs name them so)


class TokenLogprob(Packed):
    token: str
    raw: bytes
    logprob: float
    top: list[Alternative]  # the likeliest tokens at this position, with their logprobs
    offset: Count  # where the token's text starts in the output (echo included)


class PromptToken(Packed):
    """A prompt token and how likely the model found it after the tokens before it. The
    first has no logprob: nothing comes before it."""

    id: Count
    token: str
    raw: bytes
    offset: Count  # where its text starts in the prompt's text
    logprob: float | None = None
    rank: Count = 0  # 1 + how many tokens the model found likelier (0: no logprob)
    top: list[Alternative] = field(default_factory=list)  # the likeliest tokens at this position


class Usage(Packed):
    prompt_tokens: Count
    completion_tokens: Count
    cached_tokens: Count = 0  # of the prompt's, whose KV the worker reused rather than computed


FinishReason = Literal["stop", "length", "cancelled"]


class Output(Packed):
    """One sequence's output of one engine step."""

    id: Id
    text: str = ""
    # Tokens generated since the sequence's previous output (text held back, as a possible stop
    # string, waits for a later output; its tokens are counted there). One byte, mostly.
    tokens: Count = 0
    logprobs: list[TokenLogprob] | None = None  # of the tokens that made `text`, where the job asked
    finish: FinishReason | None = None  # set on the sequence's last output
    usage: Usage | None = None  # so far: on the sequence's first output, and on its last (with `finish`)
    # Every prompt token, in the sequence's first output, where the job asked (prompt_logprobs)
    prompt_logprobs: list[PromptToken] | None = None
    # An embedding job's vectors of this step's inputs, in order: little-endian float32 each
    embeddings: list[bytes] | None = None

    def __post_init__(self):
        if self.finish is not None and self.usage is None:
            raise ValueError("a finished output has usage")
        if self.embeddings and any(len(vector) % 4 for vector in self.embeddings):
            raise ValueError("an embedding is float32 values: a multiple of 4 bytes")


class Step(Wire):
    outputs: Annotated[list[Output], Meta(min_length=1)]


class Error(Wire):
    id: Annotated[str, Meta(max_length=MAX_ID)]
    code: ErrorCode
    message: str
    param: Annotated[str, Meta(max_length=64)] = ""  # the request parameter at fault, where the worker knows it


class Disconnect(Wire):
    reason: Annotated[str, Meta(max_length=1024)] = ""
    drain: bool = False


class WorkerStatus(Wire):
    worker_id: str
    models: list[str]
    host: str
    device: str
    slots: int
    free: int
    dispatched: int
    done: int
    draining: bool
    last_heard: float  # seconds since the broker last heard from it
    tasks: list[Task] = field(default_factory=lambda: list(TASKS))


class ModelStatus(Wire):
    workers: int
    slots: int
    free: int
    queued: int
    max_model_len: int = 0  # the smallest context window its workers announced (0: none said)


class StatusReport(Wire):
    policy: str
    workers: list[WorkerStatus]
    models: dict[str, ModelStatus]


class Status(Wire):
    token: Annotated[str, Meta(max_length=MAX_ID)]
    report: StatusReport | None = None  # None in the question, set in the broker's answer


Message = Union[Ready, Heartbeat, Submit, Cancel, Step, Error, Disconnect, Status]

COMMANDS: dict[bytes, type] = {
    b"\x01": Ready, b"\x02": Heartbeat, b"\x03": Submit, b"\x04": Cancel,
    b"\x05": Step, b"\x06": Error, b"\x07": Disconnect, b"\x08": Status,
}
_COMMAND_OF = {kind: command for command, kind in COMMANDS.items()}
_DECODERS = {command: msgspec.msgpack.Decoder(kind) for command, kind in COMMANDS.items()}
_ENCODER = msgspec.msgpack.Encoder()


def encode(message: Message) -> list[bytes]:
    """The frames of `message` (without a ROUTER identity)."""
    try:
        body = _ENCODER.encode(message)
    except UnicodeEncodeError as exc:  # a lone surrogate, which UTF-8 cannot carry
        raise ProtocolError(f"{type(message).__name__} holds text that is not valid Unicode: {exc.reason}") from None
    return [PROTOCOL, _COMMAND_OF[type(message)], body]


def decode(frames: list[bytes]) -> Message:
    """The message in `frames` (the ROUTER identity already removed), checked field by field."""
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    tag, command, raw = frames
    if tag != PROTOCOL:
        raise ProtocolError(f"unknown protocol or version {bytes(tag[:32])!r}, expected {PROTOCOL!r}")
    decoder = _DECODERS.get(bytes(command))
    if decoder is None:
        raise ProtocolError(f"unknown command {bytes(command[:8])!r}")
    if len(raw) > MAX_BODY_BYTES:
        raise ProtocolError(f"body of {len(raw)} bytes is over the limit")
    try:
        return decoder.decode(raw)
    # msgspec (0.22) raises UnicodeDecodeError, not DecodeError, for a map key of invalid UTF-8.
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # ValidationError included
        raise ProtocolError(f"bad {COMMANDS[bytes(command)].__name__}: {exc}") from None
