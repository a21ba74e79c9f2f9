"""The Gate every HTTP request passes first: the Host header, API keys, and the request body's
size and time limits.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, under which a handler cannot see
its client leave). A request comes in as ASGI scope and messages; it goes on to the app with
its body read whole, or is answered here with a 421, 401, 413 or 408, and its connection
closed. `read_api_keys` reads the keys a keys file holds, for the command line.
"""

from __future__ import annotations

import asyncio
import hmac
from pathlib import Path

from fastapi.responses import JSONResponse

from zmqchat.api.errors import (INVALID_API_KEY, MISDIRECTED_REQUEST, REQUEST_TIMEOUT, REQUEST_TOO_LARGE,
                                error_response)
from zmqchat.config import APIConfig, is_loopback

# Paths served without an API key: the chat page (it asks its user for a key and sends it with
# its /v1 calls) and the health check. Anything else, /metrics and the API docs included, needs one.
OPEN_PATHS = ("/", "/health")
OPEN_PREFIX = "/web/"


def read_api_keys(path: Path) -> list[str]:
    """The keys in a keys file: one per line; blank lines and lines starting with # skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no API keys")
    return keys


def host_name(host_header: bytes) -> str:
    """The host of a Host header, without its port: "[::1]:8000" -> "::1"."""
    host = host_header.decode("latin-1")
    return host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]


class Gate:
    """A request is refused, in order:

    - on an API listening on loopback, if its Host header names anything else (421): a web page
      whose own name the attacker points at 127.0.0.1 (DNS rebinding) would otherwise be able
      to read a keyless API as its own origin;
    - with keys configured, outside OPEN_PATHS (and /metrics with `public_metrics`), if it lacks
      one of them as its Bearer token (401);
    - if its body is over `max_body` bytes (413), whether it declares its length or arrives in
      chunks without one: the body is read here, at most that many bytes of it, and handed on whole;
    - if its whole body is not in within `body_timeout` seconds of its headers (408): a deadline
      for the whole body, not for each read (nginx's), which a byte now and then would meet.
    A refused request's connection is closed: its unread body could otherwise hold it open."""

    def __init__(self, app, config: APIConfig):
        self.app = app
        self.limit = config.max_body
        self.body_timeout = config.body_timeout
        self.loopback_only = is_loopback(config.host)
        self.api_keys = [key.encode() for key in config.api_keys]
        self.open_paths = OPEN_PATHS + (("/metrics",) if config.public_metrics else ())

    def authorised(self, headers: dict) -> bool:
        scheme, _, supplied = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest, against every key (a list, not a short-circuiting generator): how
        # long a wrong key takes to refuse says nothing about the right ones.
        matches = [hmac.compare_digest(supplied.strip(), key) for key in self.api_keys]
        return scheme.lower() == b"bearer" and any(matches)

    def needs_key(self, path: str) -> bool:
        return bool(self.api_keys) and path not in self.open_paths and not path.startswith(OPEN_PREFIX)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = self.header_refusal(scope["path"], headers)
        if refusal is None:
            try:
                body = await asyncio.wait_for(self._read_body(headers, receive), self.body_timeout)
            except _TooLarge:
                refusal = error_response(REQUEST_TOO_LARGE, f"the request body is over the limit of {self.limit} bytes")
            except asyncio.TimeoutError:
                refusal = error_response(REQUEST_TIMEOUT, f"the request body took over {self.body_timeout:g} s to send")
            else:
                if body is not None:  # None: the client left before sending its body
                    await self.app(scope, _replay(body, receive), send)
                return
        refusal.headers["Connection"] = "close"
        await refusal(scope, receive, send)

    def header_refusal(self, path: str, headers: dict) -> JSONResponse | None:
        """The answer to a request its headers alone refuse, or None."""
        if self.loopback_only and not is_loopback(host_name(headers.get(b"host", b""))):
            return error_response(MISDIRECTED_REQUEST, "this API listens on loopback and serves only requests "
                                  "whose Host is localhost, 127.x.x.x or [::1]")
        if self.needs_key(path) and not self.authorised(headers):
            response = error_response(INVALID_API_KEY, "invalid or missing API key")
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        return None

    async def _read_body(self, headers: dict, receive) -> bytes | None:
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            raise _TooLarge
        body, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            body.append(message.get("body", b""))
            size += len(body[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                raise _TooLarge
        return b"".join(body)


class _TooLarge(Exception):
    """A request body over the Gate's limit."""


def _replay(body: bytes, receive):
    """An ASGI receive that gives the app the body read already, whole, then passes on to
    `receive`: for the disconnect a streaming response watches for."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
