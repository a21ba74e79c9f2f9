"""The app: create_app() and its routes, OpenAI's HTTP API in front of the broker.

A request passes the Gate, is validated into a schema, and goes to the broker as one SUBMIT
per choice (an embeddings request: one for all its inputs) over the process's single
BrokerClient (app.state.client). The first event decides
the HTTP status; the rest leave through a Completion as JSON or SSE. A client that goes away
before its reply has its jobs cancelled. Around the API: the chat page, /health, /metrics and
/v1/cluster (the broker's STATUS).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import msgspec
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST

from zmqchat.api.errors import (ERRORS, RESPONSE_NOT_FOUND, add_error_handlers, broker_error_response, clip,
                                error_response)
from zmqchat.api.gate import Gate
from zmqchat.api.responses import ChatCompletion, Completion, Embeddings, TextCompletion
from zmqchat.api.responses_api import ResponsesCompletion, ResponsesRequest, ResponseStore
from zmqchat.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, GenerationRequest
from zmqchat.client import BrokerClient, BrokerError, Stream
from zmqchat.config import APIConfig
from zmqchat.curve import describe
from zmqchat.metrics import Metrics, RequestMetrics
from zmqchat.protocol import ErrorCode, ModelStatus

log = logging.getLogger("zmqchat.api")

WEB_DIR = Path(__file__).parent.parent / "web"  # the chat page: plain HTML, CSS and JavaScript
DISCONNECT_POLL = 0.5  # seconds between checks that a client waiting for a JSON reply is still there

router = APIRouter()


def create_app(config: APIConfig) -> FastAPI:
    client = BrokerClient(config.broker, config.curve, config.heartbeat_interval, config.heartbeat_liveness)

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
    app.state.config = config
    app.state.client = client
    app.state.metrics = Metrics()
    app.state.responses = ResponseStore(config.response_store_size)
    app.add_middleware(Gate, config=config)
    add_error_handlers(app)
    app.mount("/web", StaticFiles(directory=WEB_DIR), name="web")
    app.include_router(router)
    return app


def broker(request: Request) -> BrokerClient:
    return request.app.state.client


@router.get("/", include_in_schema=False)
async def chat_page():
    return FileResponse(WEB_DIR / "index.html")


@router.get("/health")
async def health(request: Request):
    up = broker(request).broker_up
    return {"status": "ok" if up else "broker_unavailable", "broker": request.app.state.config.broker}


@router.get("/metrics")
async def metrics_page(request: Request):
    try:
        report = await broker(request).status(timeout=1.0)
    except BrokerError:
        report = None
    return Response(request.app.state.metrics.render(report), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/cluster")
async def cluster_status(request: Request):
    """The broker's STATUS (workers, models, free slots, queues), for the chat page."""
    return msgspec.to_builtins(await broker(request).status())


@router.get("/v1/models")
async def list_models(request: Request):
    report = await broker(request).status()
    return {"object": "list", "data": [model_card(name, model) for name, model in sorted(report.models.items())]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    model = (await broker(request).status()).models.get(model_id)
    if model is None:
        return error_response(ERRORS[ErrorCode.MODEL_NOT_FOUND], f"The model '{model_id}' does not exist")
    return model_card(model_id, model)


def model_card(name: str, model: ModelStatus) -> dict:
    """OpenAI's model object, with vLLM's max_model_len (the context window, in tokens)."""
    return {"id": name, "object": "model", "created": 0, "owned_by": "zmqchat", "max_model_len": model.max_model_len}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatCompletionRequest):
    parser = request.app.state.config.tool_parser
    return await generate(request, body, partial(ChatCompletion, tool_parser=parser))


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest):
    return await generate(request, body, TextCompletion)


@router.post("/v1/responses")
async def create_response(request: Request, body: ResponsesRequest):
    """OpenAI's Responses API: the chat that `body` translates to, answered in its shapes."""
    store: ResponseStore = request.app.state.responses
    history = ()
    if body.previous_response_id is not None:
        previous = store.get(body.previous_response_id)
        if previous is None:
            return response_not_found(body.previous_response_id, "previous_response_id")
        history = previous.conversation
    answer = partial(ResponsesCompletion, asked=body, history=history, store=store)
    return await generate(request, body.chat_request(history), answer)


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: str):
    stored = request.app.state.responses.get(response_id)
    return response_not_found(response_id) if stored is None else stored.body


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str):
    if not request.app.state.responses.delete(response_id):
        return response_not_found(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def response_not_found(response_id: str, param: str | None = None) -> Response:
    what = "Previous response" if param else "Response"
    return error_response(RESPONSE_NOT_FOUND, f"{what} with id '{clip(response_id)}' not found "
                          "(responses are kept in the memory of the API process that made them, the most "
                          "recently used only)", param)


@router.post("/v1/embeddings")
async def embeddings(request: Request, body: EmbeddingRequest):
    return await generate(request, body, Embeddings)


async def generate(request: Request, body: GenerationRequest | EmbeddingRequest,
                   answer: Callable[[Stream, GenerationRequest | EmbeddingRequest, RequestMetrics], Completion]):
    """Run `body`'s choices; `answer` (a Completion class) shapes their events as its API does."""
    client, state = broker(request), request.app.state
    timing = RequestMetrics(state.metrics, body.model)
    try:
        stream = client.submit(body.model, body.choices(), state.config.request_timeout)
    except BrokerError as exc:
        timing.failed(exc.code.value)
        raise
    completion = answer(stream, body, timing)
    log.debug("request %s: %s, model %s, %d choices, stream %s", stream.id, type(completion).__name__,
              clip(body.model), len(stream.job_ids), body.stream)
    streaming = False
    try:
        # Wait for the first event before answering, so that an error (unknown model, no
        # worker, a prompt too long) gets its own HTTP status rather than a 200 stream.
        first = await while_connected(request, stream.next())
        if first.error is not None:
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
