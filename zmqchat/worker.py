"""The worker: one model on one device (or a group of GPUs), connected to the broker.

Two threads. The engine thread owns the Engine: it takes jobs and cancels from an inbox,
runs engine steps, and pushes each step's output (one CHUNK and one DONE message, whatever
the number of sequences) down an inproc socket. The socket thread owns the DEALER to the
broker: it puts incoming jobs in the inbox, forwards the engine's messages, and heartbeats.
Because the model computes on the other thread, heartbeats keep going during generation.

Liveness follows the ZeroMQ Guide's Paranoid Pirate worker: a broker silent for
HEARTBEAT_LIVENESS intervals is presumed dead; the worker drops the jobs it was running
(the broker has failed or requeued them), reconnects with exponential back-off, and sends
READY again. A broker that does not know the worker says DISCONNECT, with the same effect.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import zmq

from zmqchat import protocol as p
from zmqchat.broker import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS
from zmqchat.curve import Curve, describe, secure_client
from zmqchat.engine import DEFAULT_SLOTS, Engine, RequestError

log = logging.getLogger("zmqchat.worker")

RECONNECT_MAX = 8.0  # longest back-off between reconnect attempts, in seconds
DRAIN_TIMEOUT = 60.0  # seconds a draining worker gives its jobs in flight before it leaves anyway
DRAIN_POLL = 0.1  # how often a draining worker checks whether it is done
ENGINE_IDLE_WAIT = 0.5  # how often an idle engine thread checks whether to stop


@dataclass
class WorkerConfig:
    model_path: str | None = None
    model_name: str | None = None
    broker: str = "tcp://127.0.0.1:5556"
    device: str = "auto"
    dtype: str = "auto"
    max_batch: int = DEFAULT_SLOTS
    max_tokens_in_flight: int | None = None  # KV-cache tokens; default: half the free memory
    fake: bool = False  # serve the fake engine instead of a model (tests, benchmarks)
    fake_delay: float = 0.02
    drain_timeout: float = DRAIN_TIMEOUT
    curve: Curve | None = None
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine, device: str,
                 context: zmq.Context | None = None):
        self.config = config
        self.engine = engine
        self.device = device
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.context = context or zmq.Context.instance()
        self.inbox: queue.Queue = queue.Queue()
        self.outputs_address = f"inproc://engine-{self.worker_id}"
        self.outputs = self.context.socket(zmq.PULL)
        self.outputs.bind(self.outputs_address)
        self.dealer: zmq.Socket | None = None
        self.running = True
        self.drain_deadline: float | None = None  # set by the first SIGTERM or SIGINT
        self.liveness = config.heartbeat_interval * config.heartbeat_liveness

    # -- socket thread ------------------------------------------------------------------------

    def run(self) -> None:
        engine_thread = threading.Thread(target=self._engine_loop, name="engine", daemon=True)
        engine_thread.start()
        self._connect()
        backoff = self.config.heartbeat_interval
        last_heard = time.monotonic()
        next_beat = last_heard + self.config.heartbeat_interval
        drain_announced = False
        while self.running:
            wait = DRAIN_POLL if self.drain_deadline else next_beat - time.monotonic()
            events = dict(self.poller.poll(max(0.0, wait) * 1000))
            if self.dealer in events and self._drain_broker():
                last_heard = time.monotonic()
                backoff = self.config.heartbeat_interval
            if self.outputs in events:
                self._forward_outputs()
            now = time.monotonic()
            if self.drain_deadline is not None:
                if not drain_announced:
                    self._send(p.DISCONNECT, {"reason": "drain", "drain": True})
                    drain_announced = True
                    log.info("draining: no new jobs; finishing %d in flight", len(self.engine.sequences))
                if self._idle() or now > self.drain_deadline:
                    break
            if now - last_heard > self.liveness:
                log.warning("broker silent for %.1f s; reconnecting in %.1f s", now - last_heard, backoff)
                self._stopped_during(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX)
                self._connect()
                drain_announced = False
                last_heard = time.monotonic()
            if now >= next_beat:
                self._send(p.HEARTBEAT, {})
                next_beat = now + self.config.heartbeat_interval
        self.inbox.put(None)
        engine_thread.join(timeout=5)
        self._forward_outputs()  # the engine's last messages go out before we say goodbye
        self._send(p.DISCONNECT, {"reason": "drained" if self._idle() else "shutdown"})
        self.dealer.close(linger=1000)
        self.outputs.close()
        log.info("worker %s stopped", self.worker_id)

    def stop(self, *_) -> None:
        """The first signal drains (no new jobs, finish those in flight); a second stops now."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.config.drain_timeout
        else:
            self.running = False

    def _idle(self) -> bool:
        return self.inbox.empty() and not self.engine.sequences

    def _stopped_during(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.running and time.monotonic() < deadline:
            time.sleep(min(0.1, seconds))

    def _connect(self) -> None:
        """A fresh DEALER (Paranoid Pirate: never reuse a socket to a dead peer), then READY."""
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        secure_client(self.dealer, self.config.curve)
        self.dealer.connect(self.config.broker)
        self.poller = zmq.Poller()
        self.poller.register(self.dealer, zmq.POLLIN)
        self.poller.register(self.outputs, zmq.POLLIN)
        self._announce()

    def _announce(self) -> None:
        # Jobs still running belong to a broker connection that is gone: drop them first.
        self.inbox.put(("reset", None))
        self._send(p.READY, {
            "worker_id": self.worker_id, "models": [self.engine.model_name],
            "slots": self.engine.slots, "host": socket.gethostname(), "device": self.device,
            "pid": os.getpid(),
        })
        log.info("worker %s announced %s (%d slots) to %s", self.worker_id,
                 self.engine.model_name, self.engine.slots, self.config.broker)

    def _send(self, command: bytes, body) -> None:
        self.dealer.send_multipart(p.encode(command, body))

    def _drain_broker(self) -> bool:
        """Handle every waiting message from the broker; True if any was valid."""
        heard = False
        while True:
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return heard
            try:
                command, body = p.decode(frames)
            except p.ProtocolError as exc:
                log.warning("dropped a bad message from the broker: %s", exc)
                continue
            heard = True
            if command == p.SUBMIT:
                self.inbox.put(("add", body))
            elif command == p.CANCEL:
                self.inbox.put(("cancel", body.get("ids", [])))
            elif command == p.DISCONNECT:
                log.info("broker asked for a new announcement: %s", body.get("reason"))
                self._announce()
            elif command != p.HEARTBEAT:
                log.warning("dropped %s from the broker", p.COMMAND_NAMES[command])

    def _forward_outputs(self) -> None:
        while True:
            try:
                frames = self.outputs.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.dealer.send_multipart(frames)

    # -- engine thread ------------------------------------------------------------------------

    def _engine_loop(self) -> None:
        out = self.context.socket(zmq.PUSH)
        out.connect(self.outputs_address)
        send = lambda command, body: out.send_multipart(p.encode(command, body))  # noqa: E731
        try:
            while True:
                commands = self._take_commands(block=not self.engine.sequences)
                if commands is None:
                    return
                dones = []
                for kind, arg in commands:
                    self._apply(kind, arg, dones, send)
                try:
                    chunks, finished = self.engine.step()
                except Exception as exc:
                    log.exception("engine step failed; failing its %d sequences", len(self.engine.sequences))
                    for job_id in list(self.engine.sequences):
                        self.engine.cancel(job_id)
                        log.warning("request %s: failed in the engine", job_id)
                        send(p.ERROR, p.error_body(job_id, 500, "engine_error", f"the engine failed: {exc}"))
                    chunks, finished = [], []
                if chunks:
                    send(p.CHUNK, chunks)
                for entry in finished:
                    log.debug("request %s: finished (%s), %d prompt and %d output tokens",
                              entry[0], entry[2], entry[3], entry[4])
                if dones or finished:
                    send(p.DONE, dones + finished)
        finally:
            out.close(linger=1000)

    def _take_commands(self, block: bool) -> list | None:
        """Everything in the inbox; waits for something when the engine is idle. None: stop."""
        commands = []
        while True:
            try:
                item = self.inbox.get(block=block and not commands, timeout=ENGINE_IDLE_WAIT)
            except queue.Empty:
                if commands or not block:
                    return commands
                continue
            if item is None:
                return None
            commands.append(item)

    def _apply(self, kind: str, arg, dones: list, send) -> None:
        if kind == "add":
            try:
                self.engine.add(arg)
                log.debug("request %s: accepted", arg["id"])
            except RequestError as exc:
                log.info("request %s: refused (%d): %s", arg.get("id"), exc.status, exc)
                send(p.ERROR, p.error_body(arg.get("id", ""), exc.status, exc.type, str(exc)))
            except Exception as exc:  # a malformed job must not stop the engine
                log.warning("refused a malformed job: %r", exc)
                send(p.ERROR, p.error_body(str(arg.get("id", "")), 400, "invalid_request_error",
                                           f"malformed job: {exc!r}"))
        elif kind == "cancel":
            for job_id in arg:
                entry = self.engine.cancel(job_id)
                if entry:
                    log.info("request %s: cancelled after %d tokens", job_id, entry[4])
                    dones.append(entry)
        elif kind == "reset":
            for job_id in list(self.engine.sequences):
                self.engine.cancel(job_id)


def build_engine(config: WorkerConfig) -> tuple[Engine, str]:
    """The engine for `config` and a description of its device."""
    if config.fake:
        from zmqchat.engine import FakeEngine

        return FakeEngine(config.model_name or "fake", config.max_batch, config.fake_delay), "fake"
    from zmqchat import models
    from zmqchat.engine import HFEngine

    loaded = models.load(config.model_path, config.model_name, config.device, config.dtype)
    return HFEngine(loaded, config.max_batch, config.max_tokens_in_flight), loaded.description


def run(config: WorkerConfig) -> None:
    engine, device = build_engine(config)
    worker = Worker(config, engine, device)
    log.info(describe(config.curve))
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.run()
