"""The API frontend: OpenAI's HTTP API in front of the broker.

A request is validated here (pydantic, at the HTTP boundary) and sent to the broker as one
SUBMIT per choice (n choices of a chat; n per prompt of a completion) over the process's
single BrokerClient. The choices' CHUNK/DONE/ERROR events come back interleaved and leave as
one JSON body or as server-sent events in OpenAI's chunk format. A client that goes away
mid-stream makes the client send CANCEL.

Every error a client sees is shaped in one place, `error_response()`:
{"error": {"message", "type", "param", "code"}} with an honest HTTP status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from starlette.exceptions import HTTPException

from zmqchat.client import BrokerClient, BrokerError, Stream
from zmqchat.curve import Curve, describe
from zmqchat.engine import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS
from zmqchat.metrics import Metrics, RequestMetrics

log = logging.getLogger("zmqchat.api")

WEB_DIR = Path(__file__).parent / "web"  # the chat page: plain HTML, CSS and JavaScript
REQUEST_TIMEOUT = 300.0  # seconds a request may take, end to end, unless configured
DRAIN_TIMEOUT = 30.0  # seconds open requests get to finish after SIGTERM
MAX_BODY = 4 * 1024 * 1024  # bytes of request body; more gets 413
MAX_N = 16  # choices of one prompt
MAX_CHOICES = 128  # choices of one request: prompts x n
DISCONNECT_POLL = 0.5  # seconds between checks that a client waiting for a JSON reply is still there
MAX_INT = 2**31 - 1  # for counts: more is a mistake, and would not fit the wire's integers
# Idle keep-alive connections are closed after this long. Longer than a client's or load
# balancer's own idle timeout (60 s is common), so the server never closes a connection a
# client is just reusing, which the client sees as a reset request.
KEEP_ALIVE = 75


@dataclass
class APIConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    broker: str = "tcp://127.0.0.1:5555"
    api_keys: tuple[str, ...] = ()
    request_timeout: float = REQUEST_TIMEOUT
    drain_timeout: float = DRAIN_TIMEOUT
    max_body: int = MAX_BODY
    log_level: str = "info"
    curve: Curve | None = None


def read_api_keys(path: Path) -> list[str]:
    """The keys in a keys file: one per line; blank lines and lines starting with # skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no API keys")
    return keys


# -- request schemas --------------------------------------------------------------------------

class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown parameter is a 400 that names it

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """OpenAI's API takes null for any optional parameter, meaning its default; some
        clients send every parameter so. A required one stays null, and is refused."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: str | list[TextPart]
    name: str | None = None

    def wire(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text"]  # JSON modes would need constrained decoding, which zmqchat does not do


Count = Annotated[int, Field(ge=1, le=MAX_INT)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT)]], Field(min_length=1)]


class GenerationRequest(Strict):
    """What chat and text completions share."""

    model: str = Field(min_length=1)
    max_tokens: Count | None = None
    # Left out: the model's own sampling defaults apply (else 1.0, as OpenAI's do).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT)  # vLLM's extension; -1 or 0: no limit
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def params(self, index: int) -> dict:
        """The sampling parameters of choice `index` that both APIs share (max_tokens, whose
        default differs, each adds itself). A seeded request's choices get seeds of
        their own, so that n choices differ and the same request gives the same n again."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return {"temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "stop": stop, "ignore_eos": self.ignore_eos,
                "seed": None if self.seed is None else (self.seed + index) % 2**63}


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return value

    def choices(self) -> list[dict]:
        messages = [m.wire() for m in self.messages]
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens or self.max_tokens
        return [{"messages": messages, "params": {**self.params(i), "max_tokens": max_tokens, "logprobs": logprobs}}
                for i in range(self.n)]


class CompletionRequest(GenerationRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt")
    @classmethod
    def _choices_within_limit(cls, prompt, info: ValidationInfo):
        if len(cls.each_prompt(prompt)) * info.data.get("n", 1) > MAX_CHOICES:
            raise ValueError(f"a request may ask for at most {MAX_CHOICES} choices (prompts x n)")
        return prompt

    @staticmethod
    def each_prompt(prompt) -> list[str | list[int]]:
        """A string or a list of token ids is one prompt; other lists are lists of prompts."""
        return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)

    def prompts(self) -> list[str | list[int]]:
        return self.each_prompt(self.prompt)

    def choices(self) -> list[dict]:
        """n choices per prompt, prompt by prompt, as OpenAI numbers them."""
        # max_tokens left out: 16, OpenAI's default for completions
        params = {"max_tokens": self.max_tokens or 16, "echo": self.echo, "logprobs": self.logprobs}
        return [{"prompt": prompt, "params": {**self.params(i), **params}} for prompt in self.prompts()
                for i in range(self.n)]


# -- errors -----------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 503: "service_unavailable", 504: "timeout"}


def error_body(status: int, message: str, type_: str | None = None, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_ or ERROR_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, type_: str | None = None, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(error_body(status, message, type_, param, code), status_code=status, headers=headers)


def broker_error_response(error: BrokerError) -> JSONResponse:
    param = "model" if error.status == 404 else None
    return error_response(error.status, error.message, param=param, code=error.type)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    error = max(exc.errors(), key=_specificity)
    if error["type"] == "json_invalid":
        return error_response(400, f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')}")
    location = [str(part) for part in error.get("loc", ()) if not _union_branch(part)]
    if location == ["body"]:
        return error_response(400, "the request body must be a JSON object")
    param = ".".join(location).removeprefix("body.") or None
    if error["type"] == "extra_forbidden":
        message = "this parameter is not supported by zmqchat"
    else:
        message = str(error.get("msg", "invalid request")).removeprefix("Value error, ")
    return error_response(400, f"{param}: {message}" if param else message, param=param)


def _specificity(error: dict) -> tuple:
    """For a value that fits no branch of a union, pydantic reports every branch. The one to
    tell the client about is a branch of the value's own type ("too many stop strings", not
    "stop should be a string"), and the deepest of those (a text part's bad "type")."""
    return not error["type"].endswith("_type"), len(error.get("loc", ()))


def _union_branch(part) -> bool:
    """pydantic's name for a branch of a union in an error's location ("str", "list[int]")."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part or "-" in part)


class Gate:
    """ASGI middleware every request passes first. On /v1 routes, with keys configured, a
    request without one of them as its Bearer token gets 401. A request body over `limit`
    bytes gets 413, whether it declares its length or arrives in chunks without one: the body
    is read here, at most `limit` bytes of it, and handed on whole. (Plain ASGI, not
    Starlette's BaseHTTPMiddleware, under which a handler cannot see its client leave.)"""

    def __init__(self, app, limit: int, api_keys: tuple[str, ...]):
        self.app = app
        self.limit = limit
        self.api_keys = [key.encode() for key in api_keys]

    def authorised(self, headers: dict) -> bool:
        scheme, _, supplied = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest, against every key (a list, not a short-circuiting generator): how
        # long a wrong key takes to refuse says nothing about the right ones.
        matches = [hmac.compare_digest(supplied.strip(), key) for key in self.api_keys]
        return scheme.lower() == b"bearer" and any(matches)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_keys and scope["path"].startswith("/v1") and not self.authorised(headers):
            response = error_response(401, "invalid or missing API key", code="invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        body, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await self._refuse(scope, receive, send)
        whole = {"type": "http.request", "body": b"".join(body), "more_body": False}
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return whole
            return await receive()  # after the body: the disconnect a streaming response watches for

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"the request body is over the limit of {self.limit} bytes",
                                  code="request_too_large")
        await response(scope, receive, send)


# -- the app ----------------------------------------------------------------------------------

def create_app(config: APIConfig) -> FastAPI:
    client = BrokerClient(config.broker, config.curve)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        log.info(describe(config.curve))
        await client.start()
        log.info("chat page at http://%s:%d/", config.host, config.port)
        if not await client.wait_for_broker(2.0):
            log.warning("no answer yet from the broker at %s; requests get 503 until it answers", config.broker)
        yield
        await client.close()

    app = FastAPI(title="zmqchat", lifespan=lifespan)
    app.state.client = client
    app.add_middleware(Gate, limit=config.max_body, api_keys=config.api_keys)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return validation_error_response(exc)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
            return error_response(400, f"the request body could not be read: {exc.__cause__}")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")

    @app.exception_handler(BrokerError)
    async def on_broker_error(request: Request, exc: BrokerError):
        return broker_error_response(exc)

    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(WEB_DIR / "index.html")

    @app.get("/v1/cluster")
    async def cluster_status():
        """The broker's STATUS (workers, models, free slots, queues), for the chat page."""
        return await client.status()

    @app.get("/health")
    async def health():
        return {"status": "ok" if client.broker_up else "broker_unavailable", "broker": config.broker}

    @app.get("/v1/models")
    async def list_models():
        status = await client.status()
        return {"object": "list", "data": [model_card(name) for name in sorted(status["models"])]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in (await client.status())["models"]:
            return error_response(404, f"The model '{model_id}' does not exist", param="model",
                                  code="model_not_found")
        return model_card(model_id)

    @app.get("/metrics")
    async def metrics_page():
        try:
            status = await client.status(timeout=1.0)
        except BrokerError:
            status = None
        return Response(metrics.render(status), media_type=CONTENT_TYPE_LATEST)

    async def generate(request: Request, body: GenerationRequest, completion_type: type[Completion]):
        timing = RequestMetrics(metrics, body.model)
        try:
            stream = client.submit(body.model, body.choices(), config.request_timeout)
        except BrokerError as exc:
            timing.failed(exc.type)
            raise
        log.debug("request %s: %s, model %s, %d choices, stream %s", stream.id, completion_type.__name__,
                  body.model, len(stream.job_ids), body.stream)
        completion = completion_type(stream, body, timing)
        streaming = False
        try:
            # Wait for the first event before answering, so that an error (unknown model, no
            # worker, a prompt too long) gets its own HTTP status rather than a 200 stream.
            first = await while_connected(request, stream.next())
            if first.kind == "error":
                completion.failed(first.error)
                return broker_error_response(first.error)
            if body.stream:
                streaming = True  # the stream's generator finishes it
                return StreamingResponse(completion.sse(client, first), media_type="text/event-stream")
            return await while_connected(request, completion.json(first))
        except ClientGone:
            completion.left()
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            if not streaming:
                client.finish(stream)  # cancels the jobs still queued or running, if any

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        return await generate(request, body, ChatCompletion)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        return await generate(request, body, TextCompletion)

    return app


class ClientGone(Exception):
    """The HTTP client disconnected before its reply."""


async def while_connected(request: Request, work):
    """What `work` returns, unless the client disconnects first: then ClientGone, so that
    its jobs are cancelled rather than left to hold queue places and slots for nobody."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if not task.done() and await request.is_disconnected():
                raise ClientGone
        return task.result()
    finally:
        task.cancel()  # a no-op once it is done


# -- responses --------------------------------------------------------------------------------

class Completion:
    """Turns one request's events into an OpenAI response or its chunk stream. The choices'
    events come interleaved; each choice ends with its "done", the request with the last
    choice's, or with the first error. Subclasses shape the choices of their API."""

    object: str  # of a whole response
    chunk_object: str  # of each streamed chunk
    id_prefix: str

    def __init__(self, stream: Stream, request: GenerationRequest, timing: RequestMetrics):
        self.stream = stream
        self.request = request
        self.id = f"{self.id_prefix}{stream.id}"
        self.created = int(time.time())
        self.timing = timing
        self.dones: dict[int, object] = {}  # each choice's "done" event, by index

    async def events(self, first):
        """The request's events from `first` to its end, each counted in the metrics."""
        event = first
        while True:
            if event.kind == "chunk" or (event.kind == "done" and event.text):
                self.timing.output(event.index)
            if event.kind == "error":
                self.failed(event.error)
                yield event
                return
            if event.kind == "done":
                self.dones[event.index] = event
            yield event
            if self.stream.finished:
                self._finished()
                return
            event = await self.stream.next()

    def _finished(self) -> None:
        usage = self._usage()
        reasons = {done.finish_reason for done in self.dones.values()}
        outcome = reasons.pop() if len(reasons) == 1 else "mixed"
        self.timing.finished(outcome, usage["prompt_tokens"], usage["completion_tokens"])
        log.info("request %s: %s, %d prompt + %d output tokens", self.stream.id, outcome,
                 usage["prompt_tokens"], usage["completion_tokens"])

    def failed(self, error: BrokerError) -> None:
        self.timing.failed(error.type)
        log.info("request %s failed (%d): %s", self.stream.id, error.status, error.message)

    def left(self) -> None:
        self.timing.failed("cancelled")
        log.info("request %s: the client left; cancelling", self.stream.id)

    def _usage(self) -> dict:
        # The n choices of one prompt read it once: its tokens are counted once.
        prompt = sum(d.prompt_tokens for i, d in self.dones.items() if i % self.request.n == 0)
        completion = sum(d.completion_tokens for d in self.dones.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def json(self, first) -> JSONResponse | dict:
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list] = {}
        async for event in self.events(first):
            if event.kind == "error":
                return broker_error_response(event.error)
            texts.setdefault(event.index, []).append(event.text)
            logprobs.setdefault(event.index, []).extend(event.logprobs or [])
        choices = [self.choice(i, "".join(texts[i]), logprobs[i], self.dones[i].finish_reason)
                   for i in sorted(self.dones)]
        return {**self._header(self.object), "choices": choices, "usage": self._usage()}

    async def sse(self, client: BrokerClient, first):
        completed = False
        try:
            for opening in self.opening_chunks():
                yield opening
            async for event in self.events(first):
                if event.kind == "error":
                    yield _sse(error_body(event.error.status, event.error.message, code=event.error.type))
                    break
                if event.text or event.logprobs:
                    yield self._chunk(self.chunk_choice(event.index, event.text, event.logprobs, None))
                if event.kind == "done":
                    yield self._chunk(self.chunk_choice(event.index, None, None, event.finish_reason))
            else:
                if self.request.include_usage:
                    yield _sse({**self._header(self.chunk_object), "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
            completed = True
        finally:
            # Runs when the stream ends and when the client disconnects mid-stream.
            if not completed:
                self.left()
            client.finish(self.stream)

    def _header(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.request.model}

    def _chunk(self, choice: dict) -> str:
        return _sse({**self._header(self.chunk_object), "choices": [choice]})

    # -- the API's shapes, supplied by subclasses -----------------------------------------

    def opening_chunks(self) -> list[str]:
        """What a stream sends before any output."""
        return []

    def choice(self, index: int, text: str, logprobs: list, finish_reason: str) -> dict:
        raise NotImplementedError

    def chunk_choice(self, index: int, text: str | None, logprobs: list | None, finish_reason: str | None) -> dict:
        raise NotImplementedError


class ChatCompletion(Completion):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def opening_chunks(self) -> list[str]:
        """The role, first, in each choice's first delta, as OpenAI's clients expect."""
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for i in range(self.request.n)]

    def choice(self, index, text, logprobs, finish_reason) -> dict:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}

    def chunk_choice(self, index, text, logprobs, finish_reason) -> dict:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}

    def _logprobs(self, entries: list | None) -> dict | None:
        if not self.request.logprobs or entries is None:
            return None
        return {"content": [{**_token_logprob(token, raw, logprob),
                             "top_logprobs": [_token_logprob(*alternative) for alternative in top]}
                            for token, raw, logprob, top, _ in entries]}


class TextCompletion(Completion):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def choice(self, index, text, logprobs, finish_reason) -> dict:
        return {"index": index, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}

    def chunk_choice(self, index, text, logprobs, finish_reason) -> dict:
        return self.choice(index, text or "", logprobs, finish_reason)

    def _logprobs(self, entries: list | None) -> dict | None:
        """The legacy shape: parallel lists, top alternatives as {token: logprob}."""
        if self.request.logprobs is None or entries is None:
            return None
        return {"tokens": [token for token, *_ in entries], "token_logprobs": [e[2] for e in entries],
                "top_logprobs": [{token: logprob for token, _, logprob in e[3]} for e in entries],
                "text_offset": [e[4] for e in entries]}


def _token_logprob(token: str, raw: bytes, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(raw)}


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "zmqchat"}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def run(config: APIConfig) -> None:
    import uvicorn

    # On SIGTERM uvicorn stops accepting connections and lets open ones (streams) finish.
    # Its access log is off: the API logs each request's end itself, with the request's id.
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=config.drain_timeout, timeout_keep_alive=KEEP_ALIVE, access_log=False)
