"""Each role's configuration, and every default, in one place.

The command line (cli.py) only parses options into these dataclasses and calls the role's
`run(config)`; `serve` builds them the same way for the parts it starts. Roles import their
config and defaults from here, never from one another. (The wire's own limits, and the
ranges of sampling parameters, are in protocol.py.)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zmqchat.curve import Curve

FRONTEND = "tcp://127.0.0.1:5555"  # where API frontends reach the broker
BACKEND = "tcp://127.0.0.1:5556"  # where workers reach the broker
HOST = "127.0.0.1"  # the API listens on loopback unless told otherwise
PORT = 8000

# Liveness, as the ZeroMQ Guide's Paranoid Pirate: a peer silent for LIVENESS intervals is dead.
HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats, every way
HEARTBEAT_LIVENESS = 3
FRONTEND_LIVENESS = 10  # intervals of silence after which the broker cancels a frontend's jobs

POLICY = "shortest-queue"
MAX_QUEUE = 1024  # jobs waiting per model before new ones are refused

SLOTS = 16  # sequences a worker runs at once
DEFAULT_MAX_TOKENS = 1024  # for a chat that sets no max_tokens: a bound, not a whole context window
COMPLETION_MAX_TOKENS = 16  # for a completion that sets none, as OpenAI's legacy endpoint
FAKE_DELAY = 0.02  # seconds per step of the fake engine
WORKER_DRAIN_TIMEOUT = 60.0  # seconds a draining worker gives its jobs before it leaves anyway

REQUEST_TIMEOUT = 300.0  # seconds a request may take, end to end
API_DRAIN_TIMEOUT = 30.0  # seconds open requests get to finish after SIGTERM
MAX_BODY = 4 * 1024 * 1024  # bytes of HTTP request body; more gets 413

LOG_LEVEL = "info"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class BrokerConfig:
    frontend: str = FRONTEND
    backend: str = BACKEND
    policy: str = POLICY
    max_queue: int = MAX_QUEUE
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    curve: Curve | None = None


@dataclass
class WorkerConfig:
    model_path: str | None = None  # None: the embedded default model
    model_name: str | None = None  # None: the folder's name
    broker: str = BACKEND
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = SLOTS
    max_tokens_in_flight: int | None = None  # KV-cache tokens; None: half the free memory
    fake: bool = False  # serve the fake engine instead of a model (tests, benchmarks)
    fake_delay: float = FAKE_DELAY
    drain_timeout: float = WORKER_DRAIN_TIMEOUT
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    curve: Curve | None = None


@dataclass
class APIConfig:
    host: str = HOST
    port: int = PORT
    broker: str = FRONTEND
    api_keys: tuple[str, ...] = ()
    request_timeout: float = REQUEST_TIMEOUT
    drain_timeout: float = API_DRAIN_TIMEOUT
    max_body: int = MAX_BODY
    log_level: str = LOG_LEVEL
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    curve: Curve | None = None


@dataclass
class ServeConfig:
    """A whole cluster on one machine: a broker, `workers` workers, one API. The parts'
    addresses and CURVE settings are made to agree by `serve` itself."""

    broker: BrokerConfig = field(default_factory=BrokerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    api: APIConfig = field(default_factory=APIConfig)
    workers: int = 1
    curve_dir: Path | None = None
    ready_timeout: float = 600.0  # seconds the workers get to load their model
    log_level: str = LOG_LEVEL


def configure_logging(level: str) -> None:
    """Every process logs the same way: the command line's --log-level, or serve's for its parts."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)
