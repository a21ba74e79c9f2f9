"""The worker: one model on one device (or a group of GPUs), connected to the broker.

Two threads. The engine thread owns the Engine: it takes jobs and cancels from an inbox,
runs engine steps, and pushes each step's outputs (one STEP message, whatever the number of
sequences) down an inproc socket. The socket thread owns the DEALER to the
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

import zmq

from zmqchat import protocol as p
from zmqchat.config import WorkerConfig
from zmqchat.curve import describe, secure_client
from zmqchat.engine import Engine
from zmqchat.protocol import ErrorCode, JobError

log = logging.getLogger("zmqchat.worker")

RECONNECT_MAX = 8.0  # longest back-off between reconnect attempts, in seconds
DRAIN_POLL = 0.1  # how often a draining worker checks whether it is done
ENGINE_IDLE_WAIT = 0.5  # how often an idle engine thread checks whether to stop


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
                    self._send(p.Disconnect("drain", drain=True))
                    drain_announced = True
                    log.info("draining: no new jobs; finishing %d in flight", len(self.engine.job_ids()))
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
                self._send(p.Heartbeat())
                next_beat = now + self.config.heartbeat_interval
        self.inbox.put(None)
        engine_thread.join(timeout=5)
        self._forward_outputs()  # the engine's last messages go out before we say goodbye
        self._send(p.Disconnect("drained" if self._idle() else "shutdown"))
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
        return self.inbox.empty() and not self.engine.has_work

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
        self._send(p.Ready(worker_id=self.worker_id, models=[self.engine.model_name], slots=self.engine.slots,
                           host=socket.gethostname(), device=self.device, pid=os.getpid()))
        log.info("worker %s announced %s (%d slots) to %s", self.worker_id,
                 self.engine.model_name, self.engine.slots, self.config.broker)

    def _send(self, message: p.Message) -> None:
        self.dealer.send_multipart(p.encode(message))

    def _drain_broker(self) -> bool:
        """Handle every waiting message from the broker; True if any was valid."""
        heard = False
        while True:
            try:
                frames = self.dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return heard
            try:
                message = p.decode(frames)
            except p.ProtocolError as exc:
                log.warning("dropped a bad message from the broker: %s", exc)
                continue
            heard = True
            if isinstance(message, p.Submit):
                self.inbox.put(("add", message))
            elif isinstance(message, p.Cancel):
                self.inbox.put(("cancel", message.ids))
            elif isinstance(message, p.Disconnect):
                log.info("broker asked for a new announcement: %s", message.reason)
                self._announce()
            elif not isinstance(message, p.Heartbeat):
                log.warning("dropped %s from the broker", type(message).__name__)

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
        send = lambda message: out.send_multipart(p.encode(message))  # noqa: E731
        try:
            while True:
                commands = self._take_commands(block=not self.engine.has_work)
                if commands is None:
                    return
                outputs: list[p.Output] = []
                for kind, arg in commands:
                    self._apply(kind, arg, outputs, send)
                try:
                    outputs += self.engine.step()
                except Exception as exc:
                    log.exception("engine step failed; failing its %d sequences", len(self.engine.job_ids()))
                    for job_id in self.engine.job_ids():
                        self.engine.cancel(job_id)
                        send(p.Error(job_id, ErrorCode.ENGINE_ERROR, f"the engine failed: {exc}"))
                for output in outputs:
                    if output.finish:
                        log.debug("request %s: finished (%s), %d prompt and %d output tokens", output.id,
                                  output.finish, output.usage.prompt_tokens, output.usage.completion_tokens)
                if outputs:
                    send(p.Step(outputs))
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

    def _apply(self, kind: str, arg, outputs: list, send) -> None:
        if kind == "add":
            try:
                self.engine.add(arg)
                log.debug("request %s: accepted", arg.id)
            except JobError as exc:
                log.info("request %s: refused (%s): %s", arg.id, exc.code.value, exc.message)
                send(p.Error(arg.id, exc.code, exc.message))
            except Exception as exc:  # a job the engine fails to take must not stop the engine
                log.exception("request %s: the engine failed to take it", arg.id)
                send(p.Error(arg.id, ErrorCode.ENGINE_ERROR, f"the engine failed to take the job: {exc!r}"))
        elif kind == "cancel":
            for job_id in arg:
                output = self.engine.cancel(job_id)
                if output:
                    log.info("request %s: cancelled after %d tokens", job_id, output.usage.completion_tokens)
                    outputs.append(output)
        elif kind == "reset":
            for job_id in self.engine.job_ids():
                self.engine.cancel(job_id)


def build_engine(config: WorkerConfig) -> tuple[Engine, str]:
    """The engine for `config` and a description of its device."""
    if config.fake:
        from zmqchat.engine import FakeRunner

        return Engine(FakeRunner(config.model_name or "fake", config.fake_delay), config.max_batch), "fake"
    from zmqchat import models
    from zmqchat.engine import HFRunner

    loaded = models.load(config.model_path, config.model_name, config.device, config.dtype)
    return Engine(HFRunner(loaded, config.max_tokens_in_flight), config.max_batch), loaded.description


def run(config: WorkerConfig) -> None:
    engine, device = build_engine(config)
    worker = Worker(config, engine, device)
    log.info(describe(config.curve))
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    worker.run()
