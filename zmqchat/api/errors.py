"""Every error a client sees, shaped in one place: {"error": {"message", "type", "param",
"code"}} with an honest HTTP status.

ERRORS is the one table of how a job's ErrorCode (from the broker, a worker or the client)
looks over HTTP; below it, the HTTP layer's own errors (a missing API key, a body too large, a
request that fails validation). An error comes in as a BrokerError, an HTTPError and a message,
or an exception FastAPI caught; it leaves as a JSONResponse, or as the body of an SSE error
event once a stream has begun.
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
REQUEST_TOO_LARGE = HTTPError(413, "invalid_request_error", "request_too_large")
INTERNAL_ERROR = HTTPError(500, "server_error")

# An error known only by its status (no such route, a method not allowed) has the type of
# the errors above with that status.
_TYPES = {error.status: error.type
          for error in (*ERRORS.values(), INVALID_REQUEST, INVALID_API_KEY, REQUEST_TOO_LARGE)}


def error_body(error: HTTPError, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error.type, "param": param or error.param, "code": error.code}}


def error_response(error: HTTPError, message: str, param: str | None = None) -> JSONResponse:
    # 503: the cluster is busy, or not up yet; the same request may well succeed shortly.
    headers = {"Retry-After": "1"} if error.status == 503 else None
    return JSONResponse(error_body(error, message, param), status_code=error.status, headers=headers)


def broker_error_body(exc: BrokerError) -> dict:
    return error_body(ERRORS[exc.code], exc.message)


def broker_error_response(exc: BrokerError) -> JSONResponse:
    return error_response(ERRORS[exc.code], exc.message)


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
        log.exception("unexpected error on %s", request.url.path)
        return error_response(INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
