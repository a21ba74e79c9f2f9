"""The API frontend: OpenAI's HTTP API in front of the broker, served by uvicorn.

    gate.py       the plain-ASGI Gate every request passes first: API keys, body size
    schemas.py    the request bodies (pydantic), and the choices they become on the wire
    routes.py     create_app() and its routes: requests in, to the broker, answers out
    responses.py  a request's events from the broker as an OpenAI JSON body or SSE stream
    errors.py     every error a client sees, and the one table of ErrorCode -> HTTP

`run(config)` is the role's entry point (`zmqchat api`).
"""

from __future__ import annotations

from zmqchat.api.gate import read_api_keys
from zmqchat.api.routes import create_app
from zmqchat.config import APIConfig

__all__ = ["create_app", "read_api_keys", "run"]

# Idle keep-alive connections are closed after this long. Longer than a client's or load
# balancer's own idle timeout (60 s is common), so the server never closes a connection a
# client is just reusing, which the client sees as a reset request.
KEEP_ALIVE = 75


def run(config: APIConfig) -> None:
    import uvicorn

    # On SIGTERM uvicorn stops accepting connections and lets open ones (streams) finish.
    # Its access log is off: the API logs each request's end itself, with the request's id.
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                timeout_graceful_shutdown=config.drain_timeout, timeout_keep_alive=KEEP_ALIVE, access_log=False)
