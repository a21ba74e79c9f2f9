"""Every error a client sees, shaped in one place: {"error": {"message", "type", "param",
"code"}} with an honest HTTP status.

ERRORS is the one table of how a job's ErrorCode (from the broker, a worker or the client)
looks over HTTP; below it, the HTTP layer's own errors (a foreign Host, a missing API key, a
body too large or too slow, a request that fails validation). An error comes in as a
BrokerError, an HTTPError and a message, or an exception FastAPI caught; it leaves as a
JSONResponse, or as the body of an SSE error event once a stream has begun. `clip` is how a
client's text may appear in a log line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from zmqchat.client import BrokerError
from zmqchat.protocol import ErrorCode

log = logging.getLogger("zmqchat.api")


@dataclass(frozen=True)
class HTTPError:
    """How one kind of error looks to an HTTP client."""

    status: int
    type: str  # OpenAI's error type
    code: str | None = None
    param: str | None = None  # the request parameter at fault, where it is always the same


ERRORS: dict[ErrorCode, HTTPError] = {
    ErrorCode.INVALID_REQUEST: HTTPError(400, "invalid_request_error", "invalid_request_error"),
    ErrorCode.CONTEXT_LENGTH: HTTPError(400, "invalid_request_error", "context_length_exceeded"),
    ErrorCode.MODEL_NOT_FOUND: HTTPError(404, "not_found_error", "model_not_found", "model"),
    ErrorCode.NO_WORKER: HTTPError(503, "service_unavailable", "no_worker"),
    ErrorCode.OVERLOADED: HTTPError(503, "service_unavailable", "overloaded"),
    ErrorCode.TIMEOUT: HTTPError(504, "timeout", "timeout"),
    ErrorCode.WORKER_LOST: HTTPError(502, "server_error", "worker_lost"),
    ErrorCode.ENGINE_ERROR: HTTPError(500, "server_error", "engine_error"),
    ErrorCode.BROKER_UNAVAILABLE: HTTPError(503, "service_unavailable", "broker_unavailable"),
}
INVALID_REQUEST = HTTPError(400, "invalid_request_error")  # refused at the HTTP boundary; param says where
INVALID_API_KEY = HTTPError(401, "authentication_error", "invalid_api_key")
REQUEST_TIMEOUT = HTTPError(408, "invalid_request_error", "request_timeout")
REQUEST_TOO_LARGE = HTTPError(413, "invalid_request_error", "request_too_large")
MISDIRECTED_REQUEST = HTTPError(421, "invalid_request_error", "misdirected_request")
INTERNAL_ERROR = HTTPError(500, "server_error")
RESPONSE_NOT_FOUND = HTTPError(404, "invalid_request_error", "response_not_found")  # not (or no longer) stored

# Characters of a client's text (a model name, a path) a log line holds: enough to recognise it.
# An error's message may quote such text (the model name, up to MAX_NAME) in its explanation.
LOGGED_TEXT = 64
LOGGED_MESSAGE = 160

# An error known only by its status (no such route, a method not allowed) has the type of
# the errors above with that status.
_TYPES = {error.status: error.type
          for error in (*ERRORS.values(), INVALID_REQUEST, INVALID_API_KEY, REQUEST_TOO_LARGE)}


def clip(text: str, limit: int = LOGGED_TEXT) -> str:
    """A client's `text` as a log line may hold it: cut to `limit` characters, and escaped as a
    Python literal is, so that a newline or a terminal escape in it cannot forge a log line."""
    short = text if len(text) <= limit else text[:limit] + "..."
    return repr(short)[1:-1]


def error_body(error: HTTPError, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error.type, "param": param or error.param, "code": error.code}}


def error_response(error: HTTPError, message: str, param: str | None = None) -> JSONResponse:
    # 503: the cluster is busy, or not up yet; the same request may well succeed shortly.
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error_body(error, message, param), status_code=error.status, headers=headers)


def broker_error_body(exc: BrokerError) -> dict:
    return error_body(ERRORS[exc.code], exc.message, exc.param)


def broker_error_response(exc: BrokerError) -> JSONResponse:
    return error_response(ERRORS[exc.code], exc.message, exc.param)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """A 400 that names the parameter at fault, as "param" and in the message."""
    error = max(exc.errors(), key=_specificity)
    if error["type"] == "json_invalid":
        return error_response(INVALID_REQUEST,
                              f"the request body is not valid JSON: {error.get('ctx', {}).get('error', '')}")
    location = [str(part) for part in error.get("loc", ()) if not _union_branch(part)]
    if location == ["body"]:
        return error_response(INVALID_REQUEST, "the request body must be a JSON object")
    param = ".".join(location).removeprefix("body.") or None
    if error["type"] == "extra_forbidden":
        message = "this parameter is not supported by zmqchat"
    else:
        message = str(error.get("msg", "invalid request")).removeprefix("Value error, ")
    return error_response(INVALID_REQUEST, f"{param}: {message}" if param else message, param)


def _specificity(error: dict) -> tuple:
    """For a value that fits no branch of a union, pydantic reports every branch. The one to
    tell the client about is a branch of the value's own type ("too many stop strings", not
    "stop should be a string"), and the deepest of those (a text part's bad "type")."""
    return not error["type"].endswith("_type"), len(error.get("loc", ()))


def _union_branch(part) -> bool:
    """pydantic's name for a branch of a union in an error's location ("str", "list[int]")."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part or "-" in part)


def add_error_handlers(app: FastAPI) -> None:
    """Every error FastAPI catches leaves in OpenAI's shape."""

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        # Counted under model="unknown": nothing in an invalid body, its model included, is a label.
        request.app.state.metrics.count(None, ErrorCode.INVALID_REQUEST.value)
        return validation_error_response(exc)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException):
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
            return error_response(INVALID_REQUEST, f"the request body could not be read: {exc.__cause__}")
        return error_response(HTTPError(exc.status_code, _TYPES.get(exc.status_code, "server_error")), str(exc.detail))

    @app.exception_handler(BrokerError)
    async def on_broker_error(request: Request, exc: BrokerError):
        return broker_error_response(exc)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, exc: Exception):
        log.exception("unexpected error on %s", clip(request.url.path))
        return error_response(INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
