"""`zmqchat serve`: a broker, N workers and an API frontend on one machine, in one command.

Each part runs as its own process, running the same role `run(config)` that `zmqchat
broker|worker|api` runs, from a config object built here (not a command line to parse again),
so a crash stays where it happened and the parts behave as they would across machines. The model
is resolved (and a GGUF converted) once here, before the workers start, so N workers never
convert at once. Ctrl-C or SIGTERM stops the parts in order: the API lets open requests finish,
the workers drain, then the broker goes. A second Ctrl-C kills whatever is left at once.
The parts run in their own session, so a terminal's Ctrl-C reaches only this process.
"""

from __future__ import annotations

import importlib
import logging
import pickle
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace

from zmqchat.client import BrokerError, fetch_status
from zmqchat.config import ServeConfig, configure_logging
from zmqchat.curve import from_folder

log = logging.getLogger("zmqchat.serve")

STOP_GRACE = 90.0  # seconds a stage gets to stop on SIGTERM (API and worker drains) before it is killed
READY_POLL = 0.5  # seconds between checks that the workers have joined


def part_configs(config: ServeConfig, model_path: str | None, model_name: str) -> list[tuple[str, object]]:
    """(role, config) of each part: broker, workers, then API, wired to one another."""
    curve = lambda name: from_folder(config.curve_dir, name)  # noqa: E731
    broker = replace(config.broker, curve=curve("broker"))
    worker = replace(config.worker, model_path=model_path, model_name=model_name, broker=broker.backend,
                     curve=curve("worker"))
    api = replace(config.api, broker=broker.frontend, log_level=config.log_level, curve=curve("api"))
    return [("broker", broker)] + [("worker", worker)] * config.workers + [("api", api)]


def start_part(role: str, config, log_level: str) -> subprocess.Popen:
    """A process running `zmqchat.<role>.run(config)`, in a session of its own (so a terminal's
    Ctrl-C reaches only `serve`, which stops the parts in order). The config travels pickled on
    its stdin: nothing, API keys included, is on its command line, where `ps` would show it."""
    process = subprocess.Popen([sys.executable, "-m", "zmqchat.serve", role], stdin=subprocess.PIPE,
                               start_new_session=True)
    process.stdin.write(pickle.dumps((config, log_level)))
    process.stdin.close()
    return process


def run(config: ServeConfig) -> int:
    if config.worker.fake:
        model_path, model_name = None, config.worker.model_name or "fake"
    else:
        from zmqchat import models

        model_path, model_name = models.resolve(config.worker.model_path, config.worker.model_name)
    if config.curve_dir:
        from zmqchat.curve import ensure_keys

        ensure_keys(config.curve_dir, {"broker": None, "worker": "worker", "api": "frontend", "status": "frontend"})
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    parts = [start_part(role, part, config.log_level) for role, part in part_configs(config, model_path, model_name)]
    try:
        if not wait_until_ready(config, model_name, parts, stopping):
            return 1 if not stopping else 0
        url = f"http://{config.api.host}:{config.api.port}"
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
            model = fetch_status(config.broker.frontend, timeout=1.0, curve=curve).models.get(model_name)
        except BrokerError:
            model = None
        now_joined = model.workers if model else 0
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
        with urllib.request.urlopen(f"http://{config.api.host}:{config.api.port}/health", timeout=1.0):
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


def run_part() -> None:
    """The body of a process started by start_part."""
    role = sys.argv[1]
    config, log_level = pickle.load(sys.stdin.buffer)
    configure_logging(log_level)
    importlib.import_module(f"zmqchat.{role}").run(config)


if __name__ == "__main__":
    run_part()
