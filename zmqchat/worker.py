"""The worker: one model on one device (or a group of GPUs), connected to the broker.

Three threads, each command passing through them in order. The socket thread owns the
DEALER to the broker: it hands jobs and cancels to the preparing thread, forwards the
engine's messages, and heartbeats. The preparing thread turns each job into a Sequence
(tokenising its prompt, which for a long prompt takes a while) so that the engine never
waits for it. The engine owns the model: it adds prepared sequences, applies cancels, runs
steps, and pushes each step's outputs (one STEP message, whatever the number of sequences)
down an inproc socket. Because the model computes apart from the socket thread, heartbeats
keep going during generation.

The engine runs on the thread that loaded (and compiled) the model, the process's main
thread, and no other thread computes with torch. OpenMP (libgomp) keeps a pool of threads
for each thread that runs parallel work; once the pools hold more threads than there are
cores, libgomp stops spin-waiting between parallel regions and every region waits to be
woken. A model loaded on one thread and run on another had two pools: its steps were 7%
slower eager, and compiled (whose steps are many short regions) 1.8 times slower.

Liveness follows the ZeroMQ Guide's Paranoid Pirate worker: a broker silent for
HEARTBEAT_LIVENESS intervals is presumed dead; the worker drops the jobs it was running
(the broker has failed or requeued them), reconnects with exponential back-off, and sends
READY again. A broker that does not know the worker says DISCONNECT, with the same effect.
A send that cannot complete within a heartbeat (no connection: the broker is gone, or
refused this worker's CURVE key, which the worker logs) counts as a lost broker too.

If the engine dies (vLLM's "engine dead"), the worker fails every job it holds with
an error, tells the broker it is leaving, and exits with status 1 for a supervisor to restart it.
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
from zmq.utils.monitor import recv_monitor_message

from zmqchat import models
from zmqchat import protocol as p
from zmqchat.config import SLOTS, WorkerConfig
from zmqchat.curve import describe, secure_client
from zmqchat.engine import Engine
from zmqchat.protocol import ErrorCode, JobError

log = logging.getLogger("zmqchat.worker")

RECONNECT_MAX = 8.0  # longest back-off between reconnect attempts, in seconds
DRAIN_POLL = 0.1  # how often a draining worker checks whether it is done
ENGINE_IDLE_WAIT = 0.5  # how often an idle engine checks whether to stop
THREAD_STOP_WAIT = 5.0  # seconds a stopping worker waits for a thread to finish
HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class BrokerLost(Exception):
    """A message to the broker could not be sent: there is no connection to send it on."""


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine, device: str,
                 context: zmq.Context | None = None):
        self.config = config
        self.engine = engine
        self.device = device
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.context = context or zmq.Context.instance()
        self.jobs: queue.Queue = queue.Queue()  # socket thread -> preparing thread
        self.inbox: queue.Queue = queue.Queue()  # preparing thread -> engine
        self.outputs_address = f"inproc://engine-{self.worker_id}"
        self.outputs = self.context.socket(zmq.PULL)
        self.outputs.bind(self.outputs_address)
        self.dealer: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.running = True
        self.drain_deadline: float | None = None  # set by the first SIGTERM or SIGINT
        self.engine_dead = False  # set by the engine as it dies
        self.socket_dead = False  # set by the socket thread as it dies
        self.liveness = config.heartbeat_interval * config.heartbeat_liveness

    def run(self) -> int:
        """Serve until stopped; the exit status: 1 if the engine or the socket thread died, else 0.
        The engine runs on the calling thread (see above), the others on threads of their own."""
        engine_done = threading.Event()
        threads = [threading.Thread(target=self._prepare_loop, name="prepare", daemon=True),
                   threading.Thread(target=self._socket_loop, args=(engine_done,), name="socket", daemon=True)]
        for thread in threads:
            thread.start()
        try:
            self._engine_loop()
        finally:
            engine_done.set()
            for thread in threads:
                thread.join(timeout=THREAD_STOP_WAIT)
        return 1 if self.engine_dead or self.socket_dead else 0

    # -- socket thread ------------------------------------------------------------------------

    def _socket_loop(self, engine_done: threading.Event) -> None:
        """Serve the broker until stopped, then stop the engine (through the preparing thread,
        so that it first takes every job handed on) and send its last words."""
        try:
            self._serve()
        except Exception:
            log.exception("the socket thread died; stopping the worker")
            self.socket_dead = True
        finally:
            self.jobs.put(None)
            engine_done.wait(timeout=THREAD_STOP_WAIT)
            self._say_goodbye()

    def _serve(self) -> None:
        self._connect()
        backoff = self.config.heartbeat_interval
        last_heard = time.monotonic()
        next_beat = last_heard + self.config.heartbeat_interval
        drain_announced = False
        while self.running and not self.engine_dead:
            wait = DRAIN_POLL if self.drain_deadline else next_beat - time.monotonic()
            try:
                events = dict(self.poller.poll(max(0.0, wait) * 1000))
                if self.dealer in events and self._drain_broker():
                    last_heard = time.monotonic()
                    backoff = self.config.heartbeat_interval
                if self.monitor in events:
                    self._log_handshake_failures()
                if self.outputs in events:
                    self._forward_outputs()
                now = time.monotonic()
                if self.drain_deadline is not None:
                    if not drain_announced:
                        self._send(p.Disconnect("drain", drain=True))
                        drain_announced = True
                        log.info("draining: no new jobs; finishing %d in flight", len(self.engine.job_ids()))
                    if self._idle() or now > self.drain_deadline:
                        return
                if now >= next_beat:
                    self._send(p.Heartbeat())
                    next_beat = now + self.config.heartbeat_interval
            except BrokerLost:
                last_heard = 0.0
            if time.monotonic() - last_heard > self.liveness:
                if self.drain_deadline is not None:
                    return  # draining, and the broker has given up this worker's jobs: nothing to finish
                log.warning("lost the broker; reconnecting in %.1f s", backoff)
                if not self._wait_unless_stopped(backoff):
                    return
                backoff = min(backoff * 2, RECONNECT_MAX)
                self._connect()
                drain_announced = False
                last_heard = time.monotonic()

    def stop(self, *_) -> None:
        """The first signal drains (no new jobs, finish those in flight); a second stops now."""
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.config.drain_timeout
        else:
            self.running = False

    def _idle(self) -> bool:
        return self.jobs.empty() and self.inbox.empty() and not self.engine.has_work

    def _wait_unless_stopped(self, seconds: float) -> bool:
        """Sleep `seconds`; False as soon as a signal says stop (a drain included: a worker
        without a broker has nothing to drain)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.running or self.drain_deadline is not None:
                return False
            time.sleep(min(0.1, seconds))
        return True

    def _connect(self) -> None:
        """A fresh DEALER (Paranoid Pirate: never reuse a socket to a dead peer), then READY."""
        self._close_dealer()
        self.dealer = self.context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.MAXMSGSIZE, p.MAX_BODY_BYTES)
        # A send with no connection to take it fails after this long instead of waiting forever.
        self.dealer.setsockopt(zmq.SNDTIMEO, int(self.config.heartbeat_interval * 1000))
        secure_client(self.dealer, self.config.curve)
        self.monitor = self.dealer.get_monitor_socket(HANDSHAKE_FAILURES)
        self.dealer.connect(self.config.broker)
        self.poller = zmq.Poller()
        for sock in (self.dealer, self.monitor, self.outputs):
            self.poller.register(sock, zmq.POLLIN)
        try:
            self._announce()
        except BrokerLost:
            pass  # the loop notices the silence and tries again

    def _close_dealer(self) -> None:
        if self.dealer is not None:
            self.dealer.disable_monitor()
            self.monitor.close(linger=0)
            self.dealer.close(linger=0)

    def _say_goodbye(self) -> None:
        """The engine's last messages, then DISCONNECT, sent if the broker can take them."""
        try:
            self._forward_outputs()
            reason = "engine dead" if self.engine_dead else "drained" if self._idle() else "shutdown"
            self._send(p.Disconnect(reason))
        except BrokerLost:
            log.warning("could not tell the broker that this worker is leaving")
        self._close_dealer()
        self.outputs.close()
        log.info("worker %s stopped", self.worker_id)

    def _announce(self) -> None:
        # Jobs still running belong to a broker connection that is gone: drop them first.
        self.jobs.put(("reset", None))
        self._send(p.Ready(worker_id=self.worker_id, models=[self.engine.model_name], slots=self.engine.slots,
                           host=socket.gethostname(), device=self.device, pid=os.getpid(),
                           max_model_len=self.engine.max_model_len, tasks=list(self.engine.tasks)))
        log.info("worker %s announced %s for %s (%d slots) to %s", self.worker_id, self.engine.model_name,
                 " and ".join(self.engine.tasks), self.engine.slots, self.config.broker)

    def _send(self, message: p.Message) -> None:
        self._send_frames(p.encode(message))

    def _send_frames(self, frames: list[bytes]) -> None:
        try:
            self.dealer.send_multipart(frames)
        except zmq.Again:
            raise BrokerLost from None

    def _log_handshake_failures(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            log.error("the broker at %s refused this worker's handshake (%s, code %s): with CURVE, is this "
                      "worker's public key among those the broker admits for workers?",
                      self.config.broker, event["event"].name, event["value"])

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
                self.jobs.put(("add", message))
            elif isinstance(message, p.Cancel):
                self.jobs.put(("cancel", message.ids))
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
            self._send_frames(frames)

    # -- preparing thread ---------------------------------------------------------------------

    def _prepare_loop(self) -> None:
        """Prepare each job for the engine, passing cancels and resets through in order (a
        cancel never overtakes the job it cancels). A refused job becomes its error."""
        while (item := self.jobs.get()) is not None:
            kind, arg = item
            if kind == "add":
                try:
                    item = ("add", self.engine.prepare(arg))
                except JobError as exc:
                    item = ("error", exc.error(arg.id))
                except Exception as exc:  # a job the engine cannot take must not stop the worker
                    log.exception("request %s: could not be prepared", arg.id)
                    item = ("error", p.Error(arg.id, ErrorCode.ENGINE_ERROR,
                                             f"the worker failed to take the job: {exc!r}"))
            self.inbox.put(item)
        self.inbox.put(None)

    # -- the engine (on the main thread) ------------------------------------------------------

    def _engine_loop(self) -> None:
        out = self.context.socket(zmq.PUSH)
        out.connect(self.outputs_address)
        send = lambda message: out.send_multipart(p.encode(message))  # noqa: E731
        try:
            self._run_engine(send)
        except Exception as exc:
            log.exception("the engine died; failing its jobs and leaving")
            for job_id in self._jobs_held():
                send(p.Error(job_id, ErrorCode.ENGINE_ERROR, f"the worker's engine died: {exc!r}"))
            self.engine_dead = True
        finally:
            out.close(linger=1000)

    def _run_engine(self, send) -> None:
        while (commands := self._take_commands(block=not self.engine.has_work)) is not None:
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

    def _jobs_held(self) -> list[str]:
        """Every job the engine holds or has yet to take, for its last words."""
        held = self.engine.job_ids()
        for queued in (self.inbox, self.jobs):
            while True:
                try:
                    item = queued.get_nowait()
                except queue.Empty:
                    break
                if item is not None and item[0] == "add":
                    held.append(item[1].id)
        return held

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
                self._refuse(exc.error(arg.id), send)
        elif kind == "error":  # refused while it was prepared
            self._refuse(arg, send)
        elif kind == "cancel":
            for job_id in arg:
                output = self.engine.cancel(job_id)
                if output:
                    log.info("request %s: cancelled after %d tokens", job_id, output.usage.completion_tokens)
                    outputs.append(output)
        elif kind == "reset":
            for job_id in self.engine.job_ids():
                self.engine.cancel(job_id)


    @staticmethod
    def _refuse(error: p.Error, send) -> None:
        log.info("request %s: refused (%s): %s", error.id, error.code.value, error.message)
        send(error)


def build_engine(config: WorkerConfig) -> tuple[Engine, str]:
    """The engine for `config` and a description of its device."""
    if config.fake:
        from zmqchat.engine import FakeRunner

        runner = FakeRunner(config.model_name or "fake", config.fake_delay)
        return Engine(runner, config.max_batch or SLOTS, config.tasks, config.step_tokens), "fake"
    from zmqchat.engine import HFRunner
    from zmqchat.engine.model_runner import slots_from_memory

    loaded = models.load(config.model_path, config.model_name, config.device, config.dtype, config.quantize)
    runner = HFRunner(loaded, config.max_tokens_in_flight, compile=config.compile)
    slots = config.max_batch or slots_from_memory(runner.token_budget)
    log.info("%d slots, %d tokens of KV cache", slots, runner.token_budget)
    return Engine(runner, slots, config.tasks, config.step_tokens), loaded.description


def run(config: WorkerConfig) -> None:
    try:
        engine, device = build_engine(config)
    except models.LoadError as exc:
        log.error("cannot serve the model: %s", exc)
        raise SystemExit(2) from None
    worker = Worker(config, engine, device)
    log.info(describe(config.curve))
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, worker.stop)
    raise SystemExit(worker.run())
