"""The API's HTTP server: uvicorn, with the limits that keep slow or many clients from taking it.

`run(config)` serves the app with uvicorn's h11 protocol, subclassed here for the one limit
uvicorn lacks: a deadline for a request's headers (slowloris). The body's deadline is the
Gate's, which reads bodies whole; the cap on open connections is uvicorn's limit_concurrency.
`exposure(config)` says what an API listening beyond loopback without keys lays open: the
command line refuses to start one unless --insecure, and run() warns of it.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from zmqchat.api.routes import create_app
from zmqchat.config import APIConfig, is_loopback

log = logging.getLogger("zmqchat.api")

# Idle keep-alive connections are closed after this long. Longer than a client's or load
# balancer's own idle timeout (60 s is common), so the server never closes a connection a
# client is just reusing, which the client sees as a reset request.
KEEP_ALIVE = 75


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with nginx's client_header_timeout: a connection whose request
    line and headers are not all in within `header_timeout` seconds is closed, without a reply
    (nginx's way: there is no request to answer). The clock starts when the connection opens,
    and again at the first byte of each later request on it; between requests, an idle
    connection is the keep-alive timeout's."""

    def __init__(self, *args, header_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._start_header_clock()

    def data_received(self, data: bytes) -> None:
        if self.header_timer is None and self.conn.their_state is h11.IDLE:
            self._start_header_clock()  # the next request on a kept-alive connection begins
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its headers are in (or it was refused as malformed)
            self._stop_header_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def _start_header_clock(self) -> None:
        self.header_timer = self.loop.call_later(self.header_timeout, self.transport.close)

    def _stop_header_clock(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None


def exposure(config: APIConfig) -> str | None:
    """What anyone who can reach the API could do, if it listens beyond loopback without API
    keys; None if it does not."""
    if config.api_keys or is_loopback(config.host):
        return None
    return (f"the API on {config.host}:{config.port} has no API keys: anyone who can reach it can use the "
            "models, fill their queues, and read the cluster's status, metrics and API docs")


def run(config: APIConfig) -> None:
    import uvicorn

    if exposed := exposure(config):
        log.warning("--insecure: %s", exposed)
    # On SIGTERM uvicorn stops accepting connections and lets open ones (streams) finish.
    # Its access log is off: the API logs each request's end itself, with the request's id.
    # limit_concurrency counts the connection asking, too: one more lets max_connections be served.
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level=config.log_level,
                http=partial(HeaderTimeoutProtocol, header_timeout=config.header_timeout),
                limit_concurrency=config.max_connections + 1, timeout_keep_alive=KEEP_ALIVE,
                timeout_graceful_shutdown=config.drain_timeout, access_log=False)
