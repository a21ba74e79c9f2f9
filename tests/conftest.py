"""Fixtures that start real zmqchat processes on free loopback ports and stop them by pid."""

from __future__ import annotations

import os
import random
import select
import signal
import socket
import threading
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec
import openai
import pytest
import zmq

from zmqchat import protocol as p
from zmqchat.broker import Broker
from zmqchat.client import BrokerError, fetch_status
from zmqchat.config import BrokerConfig

START_TIMEOUT = 120.0  # seconds for a part to come up (a real model loads in a few)
RECV_TIMEOUT = 5.0  # seconds a test peer waits for a message
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
# Where the real-model tests run the default model: the CPU, or a GPU ("cuda") as bin/gpu-bench sets it.
DEVICE = os.environ.get("ZMQCHAT_TEST_DEVICE", "cpu")


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except OSError:
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


EPHEMERAL = _ephemeral_ports()
_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port that is free now and stays free until a part binds it: taken outside the
    ephemeral range, so no outgoing connection (a worker's, a relay's) can be given it as its
    source port in the meantime, and never handed out twice in one session."""
    candidates = [port for port in range(10000, 65536) if port not in EPHEMERAL and port not in _handed_out]
    for port in random.sample(candidates, min(200, len(candidates))):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free loopback port outside the ephemeral range")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Part:
    name: str
    process: subprocess.Popen
    log: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    """Processes of one test's cluster, each logging to a file in the test's tmp_path."""

    tmp_path: Path
    frontend: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    backend: str = field(default_factory=lambda: f"tcp://127.0.0.1:{free_port()}")
    port: int = field(default_factory=free_port)
    parts: list[Part] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, name: str, *args: str) -> Part:
        log = self.tmp_path / f"{name}-{len(self.parts)}.log"
        with open(log, "w") as out:
            process = subprocess.Popen([sys.executable, "-m", "zmqchat", *args], stdout=out,
                                       stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        part = Part(name, process, log)
        self.parts.append(part)
        return part

    def broker(self, *args: str) -> Part:
        return self.spawn("broker", "broker", "--frontend", self.frontend, "--backend", self.backend, *args)

    def worker(self, *args: str, fake: bool = True, wait: bool = True) -> Part:
        before = len(self.workers()) if wait else 0
        part = self.spawn("worker", "worker", "--broker", self.backend, *(("--fake",) if fake else ()), *args)
        if wait:
            wait_for(lambda: len(self.workers()) > before or self._dead(part), START_TIMEOUT, "a worker to join")
            assert part.process.poll() is None, part.output()
        return part

    def api(self, *args: str, broker: str | None = None, wait: bool = True) -> Part:
        """The API on this cluster's port, talking to `broker` (a relay, say) or the frontend."""
        part = self.spawn("api", "api", "--port", str(self.port), "--broker", broker or self.frontend, *args)
        if wait:
            wait_for(lambda: self._healthy() or self._dead(part), START_TIMEOUT, "the API to answer")
            assert part.process.poll() is None, part.output()
        return part

    def status(self) -> dict:
        """The broker's STATUS as the JSON that /v1/cluster serves."""
        return msgspec.to_builtins(fetch_status(self.frontend, timeout=2.0))

    def workers(self) -> list[dict]:
        try:
            return self.status()["workers"]
        except BrokerError:
            return []

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _dead(part: Part) -> bool:
        return part.process.poll() is not None

    def stop(self) -> None:
        for part in reversed(self.parts):
            part.stop()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory):
    """One cluster shared by a module's tests that only read from it."""
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()


def serve_default_model(cluster: Cluster) -> str:
    """`zmqchat serve` of the real default model on `cluster`'s ports; the API's URL."""
    port = free_port()
    serve = cluster.spawn("serve", "serve", "--port", str(port), "--frontend", cluster.frontend,
                          "--backend", cluster.backend, "--device", DEVICE)
    wait_for(lambda: "is serving" in serve.output() or serve.process.poll() is not None, 300,
             "serve to load the default model")
    assert serve.process.poll() is None, serve.output()
    return f"http://127.0.0.1:{port}"


def assert_each_refused_naming_its_param(request, cases: dict[str, dict]) -> None:
    """`request(**options)` is a 400 naming `param`, for each param and options of `cases`."""
    for param, options in cases.items():
        try:
            request(**options)
        except openai.BadRequestError as error:
            assert error.param == param and param.split(".")[0] in error.message
        else:
            pytest.fail(f"accepted {options}, which should be a 400 naming {param}")


def chat(model: str = "fake", content: str = "hello there world", **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


class Relay:
    """A TCP relay between two parts that records what crosses it and can stop forwarding
    (a partition)."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarding = True
        self.closed = False
        self.captured = bytearray()  # every byte that crossed, both ways
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:  # the far end is not listening yet: refuse this one, as it would
                downstream.close()
                continue
            threading.Thread(target=self._pump, args=(downstream, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        with a, b:
            while not self.closed:
                readable, _, _ = select.select([a, b], [], [], 0.1)
                for src in readable:
                    data = src.recv(65536)
                    if not data:
                        return
                    if self.forwarding:  # cut: bytes are read and lost, the connections stay up
                        self.captured += data
                        (b if src is a else a).sendall(data)

    def close(self) -> None:
        self.closed = True
        self.listener.close()


class Peer:
    """A DEALER speaking zmqchat, standing in for a worker or a frontend."""

    def __init__(self, context: zmq.Context, address: str):
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def send(self, message: p.Message) -> None:
        self.socket.send_multipart(p.encode(message))

    def recv(self, timeout: float = RECV_TIMEOUT, skip=(p.Heartbeat,), beat: bool = False):
        """The next message not of a type in `skip`; with `beat`, heartbeat while waiting, as a live worker does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if beat:
                self.send(p.Heartbeat())
            if self.socket.poll(200):
                message = p.decode(self.socket.recv_multipart())
                if not isinstance(message, skip):
                    return message
        return None


class Running:
    """A broker on its own thread and a private context, and the peers of one test."""

    def __init__(self, **config):
        self.context = zmq.Context()
        self.config = BrokerConfig(frontend=f"tcp://127.0.0.1:{free_port()}",
                                   backend=f"tcp://127.0.0.1:{free_port()}", **config)
        self.broker = Broker(self.config, self.context)
        self.thread = threading.Thread(target=self.broker.run, daemon=True)
        self.thread.start()

    def __call__(self, kind: str) -> Peer:
        return Peer(self.context, self.config.frontend if kind == "frontend" else self.config.backend)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        self.broker.stop()
        self.thread.join(timeout=5)
        self.context.destroy(linger=0)
