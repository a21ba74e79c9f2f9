"""The Gate every HTTP request passes first: API keys and the request body's size limit.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, under which a handler cannot see
its client leave). A request comes in as ASGI scope and messages; it goes on to the app with
its body read whole, or is answered here with a 401 or a 413. `read_api_keys` reads the keys
a keys file holds, for the command line.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from zmqchat.api.errors import INVALID_API_KEY, REQUEST_TOO_LARGE, error_response


def read_api_keys(path: Path) -> list[str]:
    """The keys in a keys file: one per line; blank lines and lines starting with # skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    keys = [line for line in lines if line and not line.startswith("#")]
    if not keys:
        raise ValueError(f"{path} holds no API keys")
    return keys


class Gate:
    """On /v1 routes, with keys configured, a request without one of them as its Bearer token
    gets 401. A request body over `limit` bytes gets 413, whether it declares its length or
    arrives in chunks without one: the body is read here, at most `limit` bytes of it, and
    handed on whole."""

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
            response = error_response(INVALID_API_KEY, "invalid or missing API key")
            response.headers["WWW-Authenticate"] = "Bearer"
            return await response(scope, receive, send)
        try:
            body = await self._read_body(headers, receive)
        except _TooLarge:
            response = error_response(REQUEST_TOO_LARGE, f"the request body is over the limit of {self.limit} bytes")
            return await response(scope, receive, send)
        if body is not None:  # None: the client left before sending its body
            await self.app(scope, _replay(body, receive), send)

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
