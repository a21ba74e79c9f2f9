"""The API frontend: OpenAI's HTTP API in front of the broker, served by uvicorn.

    server.py     run(): uvicorn with a header timeout and a connection cap; exposure()
    gate.py       the plain-ASGI Gate every request passes first: Host, API keys, body size and time
    schemas.py    the request bodies (pydantic, strict), and the choices they become on the wire
    routes.py     create_app() and its routes: requests in, to the broker, answers out
    responses.py  a request's events from the broker as an OpenAI JSON body or SSE stream
    responses_api.py  the Responses API: its request as a chat, its response and events, the store
    errors.py     every error a client sees, and the one table of ErrorCode -> HTTP

`run(config)` is the role's entry point (`zmqchat api`).
"""

from __future__ import annotations

from zmqchat.api.gate import read_api_keys
from zmqchat.api.routes import create_app
from zmqchat.api.server import exposure, run

__all__ = ["create_app", "exposure", "read_api_keys", "run"]
