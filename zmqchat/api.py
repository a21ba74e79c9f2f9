"""The API frontend: OpenAI's HTTP API in front of the broker.

A request is validated here (pydantic, at the HTTP boundary), given an id and sent to the
broker as one SUBMIT over the process's single BrokerClient. The answer comes back as
CHUNK/DONE/ERROR events and leaves as one JSON body or as server-sent events in OpenAI's
chunk format. A client that goes away mid-stream makes the client send CANCEL.

Every error a client sees is shaped in one place, `error_response()`:
{"error": {"message", "type", "param", "code"}} with an honest HTTP status.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from zmqchat.client import BrokerClient, BrokerError, Stream
from zmqchat.curve import Curve, describe
from zmqchat.metrics import Metrics, RequestMetrics

log = logging.getLogger("zmqchat.api")

WEB_DIR = Path(__file__).parent / "web"  # the chat page: plain HTML, CSS and JavaScript
REQUEST_TIMEOUT = 300.0  # seconds a request may take, end to end, unless configured
DRAIN_TIMEOUT = 30.0  # seconds open requests get to finish after SIGTERM
MAX_BODY = 4 * 1024 * 1024  # bytes a request body may declare; more gets 413
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


# -- request schemas --------------------------------------------------------------------------

class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Left out: the model's own sampling defaults apply (else 1.0, as OpenAI's do).
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's extension; -1 or 0: no limit
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says

    def params(self) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return {"max_tokens": self.max_completion_tokens or self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "presence_penalty": self.presence_penalty, "frequency_penalty": self.frequency_penalty,
                "seed": self.seed, "stop": stop, "ignore_eos": self.ignore_eos}


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
    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    return error_response(400, f"{param}: {message}" if param else message, param=param)


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

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        return validation_error_response(exc)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}")

    @app.exception_handler(BrokerError)
    async def on_broker_error(request: Request, exc: BrokerError):
        return broker_error_response(exc)

    @app.middleware("http")
    async def check_request(request: Request, call_next):
        length = request.headers.get("content-length", "0")
        if not length.isdigit() or int(length) > config.max_body:
            return error_response(413, f"the request body is over the limit of {config.max_body} bytes",
                                  code="request_too_large")
        if config.api_keys and request.url.path.startswith("/v1"):
            supplied = request.headers.get("authorization", "")
            if supplied.removeprefix("Bearer ").strip() not in config.api_keys:
                return error_response(401, "invalid or missing API key", code="invalid_api_key")
        return await call_next(request)

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

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        timing = RequestMetrics(metrics, body.model)
        try:
            stream = client.submit(body.model, messages, body.params(), config.request_timeout)
        except BrokerError as exc:
            timing.failed(exc.type)
            raise
        log.debug("request %s: model %s, %d messages, stream %s", stream.id, body.model, len(messages), body.stream)
        completion = Completion(stream, body.model, timing)
        # Wait for the first event before answering, so that an error (unknown model, no
        # worker, a prompt too long) gets its own HTTP status rather than a 200 stream.
        try:
            first = await stream.next()
        except BaseException:
            client.finish(stream)
            raise
        if first.kind == "error":
            client.finish(stream)
            completion.failed(first.error)
            return broker_error_response(first.error)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(completion.sse(client, first, include_usage), media_type="text/event-stream")
        try:
            return await completion.json(first)
        finally:
            client.finish(stream)

    return app


class Completion:
    """Turns one request's events into an OpenAI chat.completion or its chunk stream."""

    def __init__(self, stream: Stream, model: str, timing: RequestMetrics):
        self.stream = stream
        self.id = f"chatcmpl-{stream.id}"
        self.model = model
        self.created = int(time.time())
        self.timing = timing

    async def events(self, first):
        """The request's events from `first` to its end, each counted in the metrics."""
        event = first
        while True:
            if event.kind == "chunk" or (event.kind == "done" and event.text):
                self.timing.output()
            if event.kind == "done":
                self.timing.finished(event.finish_reason, event.prompt_tokens, event.completion_tokens)
                log.info("request %s: %s, %d prompt + %d output tokens", self.stream.id, event.finish_reason,
                         event.prompt_tokens, event.completion_tokens)
            elif event.kind == "error":
                self.failed(event.error)
            yield event
            if event.kind != "chunk":
                return
            event = await self.stream.next()

    def failed(self, error: BrokerError) -> None:
        self.timing.failed(error.type)
        log.info("request %s failed (%d): %s", self.stream.id, error.status, error.message)

    async def json(self, first) -> JSONResponse | dict:
        parts = []
        async for event in self.events(first):
            if event.kind == "error":
                return broker_error_response(event.error)
            parts.append(event.text)
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                         "finish_reason": event.finish_reason}],
            "usage": self._usage(event),
        }

    async def sse(self, client: BrokerClient, first, include_usage: bool):
        completed = False
        try:
            yield self._chunk({"role": "assistant", "content": ""})
            async for event in self.events(first):
                if event.kind == "error":
                    yield _sse(error_body(event.error.status, event.error.message, code=event.error.type))
                elif event.text:
                    yield self._chunk({"content": event.text})
            if event.kind == "done":
                yield self._chunk({}, event.finish_reason)
                if include_usage:
                    yield _sse({**self._header(), "choices": [], "usage": self._usage(event)})
            yield "data: [DONE]\n\n"
            completed = True
        finally:
            # Runs when the stream ends and when the client disconnects mid-stream.
            if not completed:
                self.timing.failed("cancelled")
                log.info("request %s: the client left mid-stream; cancelling", self.stream.id)
            client.finish(self.stream)

    def _header(self) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model}

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> str:
        return _sse({**self._header(), "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    @staticmethod
    def _usage(done) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens}


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
