"""`zmqchat serve`: a broker, N workers and an API frontend on one machine, in one command.

Each part runs as its own process (the same ones `zmqchat broker|worker|api` start), so a
crash stays where it happened and the parts behave as they would across machines. The model
is resolved (and a GGUF converted) once here, before the workers start, so N workers never
convert at once. Ctrl-C or SIGTERM stops the parts in order: the API lets open requests finish,
the workers drain, then the broker goes. A second Ctrl-C kills whatever is left at once.
The parts run in their own session, so a terminal's Ctrl-C reaches only this process.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from zmqchat.client import BrokerError, fetch_status
from zmqchat.curve import from_folder

log = logging.getLogger("zmqchat.serve")

# `zmqchat api` reads its --api-key values from this (click's name for the option's dest), split on spaces.
API_KEYS_VARIABLE = "ZMQCHAT_API_API_KEYS"
STOP_GRACE = 90.0  # seconds a stage gets to stop on SIGTERM (API and worker drains) before it is killed
READY_POLL = 0.5  # seconds between checks that the workers have joined


@dataclass
class ServeConfig:
    model_path: str | None = None
    model_name: str | None = None
    workers: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    frontend: str = "tcp://127.0.0.1:5555"
    backend: str = "tcp://127.0.0.1:5556"
    policy: str = "shortest-queue"
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int | None = None
    max_tokens_in_flight: int | None = None
    api_keys: tuple[str, ...] = ()
    fake: bool = False
    fake_delay: float | None = None
    curve_dir: Path | None = None
    ready_timeout: float = 600.0
    log_level: str = "info"


def part_commands(config: ServeConfig, model_path: str | None, model_name: str) -> list[list[str]]:
    """The command line of each part: broker, workers, then API."""
    zmqchat = [sys.executable, "-m", "zmqchat"]
    common = ["--log-level", config.log_level] + (["--curve", str(config.curve_dir)] if config.curve_dir else [])
    broker = [*zmqchat, "broker", *common, "--frontend", config.frontend, "--backend", config.backend,
              "--policy", config.policy]
    worker = [*zmqchat, "worker", *common, "--broker", config.backend, "--model-name", model_name,
              "--device", config.device, "--dtype", config.dtype]
    if model_path:
        worker.append(model_path)
    if config.max_batch:
        worker += ["--max-batch", str(config.max_batch)]
    if config.max_tokens_in_flight:
        worker += ["--max-tokens-in-flight", str(config.max_tokens_in_flight)]
    if config.fake:
        worker += ["--fake"] + (["--fake-delay", str(config.fake_delay)] if config.fake_delay is not None else [])
    api = [*zmqchat, "api", *common, "--host", config.host, "--port", str(config.port), "--broker", config.frontend]
    return [broker] + [worker] * config.workers + [api]


def run(config: ServeConfig) -> int:
    if config.fake:
        model_path, model_name = None, config.model_name or "fake"
    else:
        from zmqchat import models

        model_path, model_name = models.resolve(config.model_path, config.model_name)
    if config.curve_dir:
        from zmqchat.curve import ensure_keys

        ensure_keys(config.curve_dir, ["broker", "worker", "api", "status"])
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    # The API's keys go in its environment, not on its command line, where `ps` shows them.
    *others, api = part_commands(config, model_path, model_name)
    api_env = {**os.environ, API_KEYS_VARIABLE: " ".join(config.api_keys)} if config.api_keys else None
    parts = [subprocess.Popen(cmd, start_new_session=True) for cmd in others]
    parts.append(subprocess.Popen(api, start_new_session=True, env=api_env))
    try:
        if not wait_until_ready(config, model_name, parts, stopping):
            return 1 if not stopping else 0
        url = f"http://{config.host}:{config.port}"
        print(f"zmqchat is serving {model_name} with {config.workers} worker(s): chat page at {url}/ , "
              f"OpenAI API at {url}/v1 (try: curl {url}/v1/models). Ctrl-C stops.", flush=True)
        while not stopping:
            if any(part.poll() is not None for part in parts):
                log.error("a part of the cluster exited (%s); stopping the rest",
                          ", ".join(f"pid {p.pid}: {p.returncode}" for p in parts if p.returncode is not None))
                return 1
            time.sleep(READY_POLL)
        return 0
    finally:
        stop_parts(parts)


def wait_until_ready(config: ServeConfig, model_name: str, parts: list, stopping: list) -> bool:
    curve = from_folder(config.curve_dir, "status")
    deadline = time.monotonic() + config.ready_timeout
    joined = -1
    while not stopping and time.monotonic() < deadline:
        if any(part.poll() is not None for part in parts):
            log.error("a part of the cluster exited during start-up")
            return False
        try:
            model = fetch_status(config.frontend, timeout=1.0, curve=curve)["models"].get(model_name)
        except BrokerError:
            model = None
        now_joined = model["workers"] if model else 0
        if now_joined != joined:
            joined = now_joined
            print(f"waiting for workers to load {model_name}: {joined}/{config.workers} ready", flush=True)
        if joined >= config.workers and api_answers(config):
            return True
        time.sleep(READY_POLL)
    if not stopping:
        log.error("the workers were not ready within %.0f s", config.ready_timeout)
    return False


def api_answers(config: ServeConfig) -> bool:
    try:
        with urllib.request.urlopen(f"http://{config.host}:{config.port}/health", timeout=1.0):
            return True
    except OSError:
        return False


def stop_parts(parts: list[subprocess.Popen]) -> None:
    """The API first, then the workers, then the broker, each stage waiting for the last."""
    broker, workers, api = parts[:1], parts[1:-1], parts[-1:]
    forced = []
    signal.signal(signal.SIGINT, lambda *_: forced.append(True))
    for stage in (api, workers, broker):
        for part in stage:
            if part.poll() is None:
                part.terminate()
        deadline = time.monotonic() + STOP_GRACE
        for part in stage:
            while part.poll() is None and time.monotonic() < deadline and not forced:
                time.sleep(0.05)
            if part.poll() is None:
                part.kill()
                part.wait()
