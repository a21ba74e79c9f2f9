"""Each role's configuration, and every default, in one place.

The command line (cli.py) only parses options into these dataclasses and calls the role's
`run(config)`; `serve` builds them the same way for the parts it starts. Roles import their
config and defaults from here, never from one another. (The wire's own limits, and the
ranges of sampling parameters, are in protocol.py.)
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from zmqchat.protocol import TASKS

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
# Seconds the queued jobs of a model whose last worker left wait for another before they fail:
# long enough for a supervisor to restart a worker, short enough that clients are not left hanging.
NO_WORKER_GRACE = 15.0

SLOTS = 16  # sequences a fake worker runs at once; a model's follow from its KV memory:
MAX_SLOTS_FROM_MEMORY = 256  # at most this many (vLLM's max_num_seqs default),
SLOT_TOKENS = 1024  # each with room for this many tokens of KV cache (a prompt and a reply)
BLOCK_SIZE = 16  # tokens per block of the paged KV cache (vLLM's default)
CPU_KV_CACHE_BYTES = 4 * 1024**3  # a CPU worker's KV cache at most, as vLLM's CPU backend's default
# Tokens one step runs at most (vLLM's max_num_batched_tokens): each decoding sequence's one, and
# chunks of prompts in the rest. A long prompt is prefilled this many tokens a step, so no stream
# waits longer between two tokens than such a step takes.
STEP_TOKENS = 256
QUANTIZE_METHODS = ("auto", "none", "fp16", "int8", "int4", "bf16")  # weight formats a worker may serve (quantize.py)
DEFAULT_MAX_TOKENS = 1024  # for a chat that sets no max_tokens: a bound, not a whole context window
COMPLETION_MAX_TOKENS = 16  # for a completion that sets none, as OpenAI's legacy endpoint
FAKE_DELAY = 0.02  # seconds per step of the fake engine
WORKER_DRAIN_TIMEOUT = 60.0  # seconds a draining worker gives its jobs before it leaves anyway

REQUEST_TIMEOUT = 300.0  # seconds a request may take, end to end
API_DRAIN_TIMEOUT = 30.0  # seconds open requests get to finish after SIGTERM
MAX_BODY = 4 * 1024 * 1024  # bytes of HTTP request body; more gets 413
# Slow clients (slowloris) hold a connection, and a file descriptor, for as long as they are let.
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte (or the connection's start) to its headers' end
BODY_TIMEOUT = 30.0  # seconds for a request's whole body once its headers are in: 4 MiB at ~1.1 Mbit/s
MAX_CONNECTIONS = 512  # open HTTP connections before requests get 503: half the usual open-files limit of 1024
# Finished Responses-API responses an API process keeps for previous_response_id and GET, the most
# recently used. Each holds its conversation's text, shared with those it continues; a prompt must
# fit a model's context window to be answered, so each is at most a few hundred KB.
RESPONSE_STORE_SIZE = 1024

LOG_LEVEL = "info"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class BrokerConfig:
    frontend: str = FRONTEND
    backend: str = BACKEND
    policy: str = POLICY
    max_queue: int = MAX_QUEUE
    no_worker_grace: float = NO_WORKER_GRACE
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    curve: Curve | None = None
    insecure: bool = False  # may listen beyond loopback without CURVE


@dataclass
class WorkerConfig:
    model_path: str | None = None  # None: the embedded default model
    model_name: str | None = None  # None: the folder's name
    broker: str = BACKEND
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "auto"  # one of QUANTIZE_METHODS (zmqchat/quantize.py)
    max_batch: int | None = None  # None: from the KV memory (model_runner.slots_from_memory); fake: SLOTS
    max_tokens_in_flight: int | None = None  # KV-cache tokens; None: from the free memory (model_runner)
    step_tokens: int = STEP_TOKENS
    compile: bool = False  # the model's step through torch.compile (model_runner)
    fake: bool = False  # serve the fake engine instead of a model (tests, benchmarks)
    fake_delay: float = FAKE_DELAY
    tasks: tuple[str, ...] = TASKS  # what it serves its model for: generating text, embedding inputs
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
    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    public_metrics: bool = False  # /metrics without a key even when keys are set (for a scraper)
    response_store_size: int = RESPONSE_STORE_SIZE  # responses kept for previous_response_id; 0: none
    insecure: bool = False  # listen on a non-loopback address without API keys, all the same
    tool_parser: str = "auto"  # how chat replies are read for tool calls (zmqchat/tools.py)
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


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, without a port; brackets allowed) is this machine's
    loopback only: localhost, 127.0.0.0/8 or ::1. A name or "*" may reach beyond it."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
