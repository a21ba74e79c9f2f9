"""The broker: one ROUTER for frontends, one ROUTER for workers, and the dispatch between them.

Frontends SUBMIT jobs; the broker queues each one under its model (bounded) and hands it to
a worker with a free slot, chosen by the dispatch policy. The broker counts every worker's
free slots itself (a slot is taken on dispatch and given back on the job's DONE or ERROR), so
it only sends work a worker can start now. CHUNK and DONE messages from workers are split by
frontend and routed to whoever submitted each job.

Workers and broker heartbeat each other. A worker silent for HEARTBEAT_LIVENESS intervals is
removed: its jobs that have sent no output yet go back to the front of the queue, the others
end with an error to their client. Queued jobs past their deadline end with a 504 error.

The loop is the Majordomo broker's `mediate()`: receive, handle by command, purge the dead,
send heartbeats. Everything runs on one thread; nothing a peer sends can raise out of it.
"""

from __future__ import annotations

import logging
import signal
import time
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

import zmq

from zmqchat import protocol as p
from zmqchat.curve import Curve, secure_server
from zmqchat.policy import make_policy

log = logging.getLogger("zmqchat.broker")

HEARTBEAT_INTERVAL = 1.0  # seconds between heartbeats, both ways
HEARTBEAT_LIVENESS = 3  # intervals of silence after which a peer is dead
FRONTEND_LIVENESS = 10  # intervals of silence after which a frontend's jobs are cancelled
MAX_QUEUE = 1024  # jobs waiting per model before new ones are refused
MAX_TIMEOUT = 3600.0  # longest deadline a request may ask for, in seconds
DRAIN_BATCH = 256  # messages read from one socket before looking at the other


@dataclass
class BrokerConfig:
    frontend: str = "tcp://127.0.0.1:5555"
    backend: str = "tcp://127.0.0.1:5556"
    policy: str = "shortest-queue"
    max_queue: int = MAX_QUEUE
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    heartbeat_liveness: int = HEARTBEAT_LIVENESS
    curve: Curve | None = None


@dataclass(eq=False)
class Worker:
    identity: bytes
    worker_id: str
    models: list[str]
    slots: int
    free: int
    host: str
    device: str
    expires: float
    jobs: set[str] = field(default_factory=set)
    dispatched: int = 0
    done: int = 0
    draining: bool = False  # finishing its jobs; gets no new ones


@dataclass(eq=False)
class Job:
    id: str
    frontend: bytes
    model: str
    frames: list[bytes]  # the SUBMIT message as received, forwarded to the worker unchanged
    expires: float
    worker: Worker | None = None
    started: bool = False  # the worker has sent output for it: it can no longer be rerun
    cancelled: bool = False  # the client is gone; the worker's final message is dropped


class Broker:
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None):
        self.config = config
        self.policy = make_policy(config.policy)
        self.liveness = config.heartbeat_interval * config.heartbeat_liveness
        self.workers: dict[bytes, Worker] = {}
        self.serving: dict[str, list[Worker]] = defaultdict(list)  # model -> workers, by worker_id
        self.jobs: dict[str, Job] = {}  # every job the broker is responsible for
        self.queues: dict[str, OrderedDict[str, Job]] = defaultdict(OrderedDict)  # not yet dispatched
        self.frontends: dict[bytes, float] = {}  # identity -> when it counts as gone
        self.running = True
        # Told to frontends in every HEARTBEAT: a new id means a restarted broker, which
        # knows nothing of the jobs they had in flight.
        self.broker_id = uuid.uuid4().hex
        self.context = context or zmq.Context.instance()
        self.frontend, self.backend = self._router(), self._router()
        self.authenticator = secure_server(self.context, [self.frontend, self.backend], config.curve)
        self.frontend.bind(config.frontend)
        self.backend.bind(config.backend)

    def _router(self) -> zmq.Socket:
        socket = self.context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 100_000)
        socket.setsockopt(zmq.RCVHWM, 100_000)
        return socket

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        next_beat = time.monotonic() + self.config.heartbeat_interval
        log.info("broker up: frontends on %s, workers on %s, policy %s",
                 self.config.frontend, self.config.backend, self.policy.name)
        while self.running:
            timeout_ms = max(0.0, next_beat - time.monotonic()) * 1000
            events = dict(poller.poll(timeout_ms))
            if self.frontend in events:
                self._read_all(self.frontend, self.process_frontend)
            if self.backend in events:
                self._read_all(self.backend, self.process_worker)
            now = time.monotonic()
            if now >= next_beat:
                self.purge_workers(now)
                self.purge_frontends(now)
                self.expire_queued(now)
                self.send_heartbeats()
                next_beat = now + self.config.heartbeat_interval
        self.close()

    def stop(self, *_) -> None:
        self.running = False

    def close(self) -> None:
        self.frontend.close()
        self.backend.close()
        if self.authenticator is not None:
            self.authenticator.stop()

    def _read_all(self, socket: zmq.Socket, handle) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                frames = socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity, rest = frames[0], frames[1:]
            try:
                command, body = p.decode(rest)
                handle(identity, command, body)
            except p.ProtocolError as exc:
                log.warning("dropped a bad message from %s: %s", identity.hex(), exc)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                log.warning("dropped a malformed %s from %s: %r",
                            p.COMMAND_NAMES.get(rest[1] if len(rest) > 1 else b"", "message"),
                            identity.hex(), exc)

    def _send_frontend(self, identity: bytes, command: bytes, body) -> None:
        self.frontend.send_multipart([identity, *p.encode(command, body)])

    def _send_worker(self, worker: Worker, command: bytes, body) -> None:
        self.backend.send_multipart([worker.identity, *p.encode(command, body)])

    def _fail(self, job: Job, status: int, type_: str, message: str) -> None:
        log.info("request %s failed (%d): %s", job.id, status, message)
        self._send_frontend(job.frontend, p.ERROR, p.error_body(job.id, status, type_, message))

    # -- frontends ----------------------------------------------------------------------------

    def process_frontend(self, identity: bytes, command: bytes, body) -> None:
        self.frontends[identity] = time.monotonic() + self.config.heartbeat_interval * FRONTEND_LIVENESS
        if command == p.SUBMIT:
            self.submit(identity, body)
        elif command == p.CANCEL:
            self.cancel(identity, body["ids"])
        elif command == p.HEARTBEAT:
            self._send_frontend(identity, p.HEARTBEAT, {"broker_id": self.broker_id})
        elif command == p.STATUS:
            self._send_frontend(identity, p.STATUS, {"token": body.get("token"), **self.status()})
        else:
            log.warning("dropped %s from frontend %s", p.COMMAND_NAMES[command], identity.hex())

    def submit(self, frontend: bytes, body: dict) -> None:
        job_id, model, timeout = body["id"], body["model"], float(body["timeout"])
        if not isinstance(job_id, str) or not isinstance(model, str):
            raise TypeError("SUBMIT id and model must be strings")
        job = Job(job_id, frontend, model, p.encode(p.SUBMIT, body),
                  time.monotonic() + min(max(timeout, 0.0), MAX_TIMEOUT))
        if job_id in self.jobs:
            return self._fail(job, 400, "invalid_request_error", f"request id {job_id} is already in use")
        if not self.serving.get(model):
            if self.workers:
                served = ", ".join(sorted(m for m, ws in self.serving.items() if ws))
                return self._fail(job, 404, "model_not_found",
                                  f"The model '{model}' does not exist. Served models: {served}")
            return self._fail(job, 503, "no_worker", "no worker is connected to the broker")
        queue = self.queues[model]
        if len(queue) >= self.config.max_queue:
            return self._fail(job, 503, "overloaded",
                              f"the queue for model '{model}' is full ({len(queue)} waiting)")
        self.jobs[job_id] = job
        queue[job_id] = job
        log.debug("request %s: queued for %s (%d waiting)", job_id, model, len(queue))
        self.dispatch(model)

    def cancel(self, frontend: bytes, ids: list[str]) -> None:
        for job_id in ids:
            job = self.jobs.get(job_id)
            if job is None or job.frontend != frontend or job.cancelled:
                continue
            log.info("request %s: cancelled by its frontend", job_id)
            if job.worker is None:
                del self.queues[job.model][job_id]
                del self.jobs[job_id]
            else:
                # The slot stays taken until the worker confirms the sequence is gone.
                job.cancelled = True
                self._send_worker(job.worker, p.CANCEL, {"ids": [job_id]})

    def status(self) -> dict:
        now = time.monotonic()
        workers = [{
            "worker_id": w.worker_id, "models": w.models, "host": w.host, "device": w.device,
            "slots": w.slots, "free": w.free, "dispatched": w.dispatched, "done": w.done, "draining": w.draining,
            "last_heard": round(self.liveness - (w.expires - now), 3),
        } for w in self.workers.values()]
        models = {}
        for model, ws in self.serving.items():
            if ws:
                models[model] = {"workers": len(ws), "slots": sum(w.slots for w in ws),
                                 "free": sum(w.free for w in ws), "queued": len(self.queues[model])}
        return {"policy": self.policy.name, "workers": workers, "models": models}

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self, model: str) -> None:
        """Hand queued jobs of `model` to workers while any has a free slot."""
        queue = self.queues[model]
        while queue:
            candidates = [w for w in self.serving[model] if w.free > 0 and not w.draining]
            if not candidates:
                return
            _, job = queue.popitem(last=False)
            worker = self.policy.pick(candidates)
            worker.free -= 1
            worker.dispatched += 1
            worker.jobs.add(job.id)
            job.worker = worker
            self.backend.send_multipart([worker.identity, *job.frames])
            log.debug("request %s: dispatched to worker %s", job.id, worker.worker_id)

    def release(self, job: Job) -> None:
        """The worker is done with `job`: its slot is free and the broker forgets the job."""
        worker = job.worker
        worker.free += 1
        worker.done += 1
        worker.jobs.discard(job.id)
        del self.jobs[job.id]

    # -- workers ------------------------------------------------------------------------------

    def process_worker(self, identity: bytes, command: bytes, body) -> None:
        if command == p.READY:
            return self.worker_ready(identity, body)
        worker = self.workers.get(identity)
        if worker is None:
            # A worker we do not know (we restarted, or purged it): make it announce itself.
            self.backend.send_multipart([identity, *p.encode(p.DISCONNECT, {"reason": "unknown worker"})])
            return
        worker.expires = time.monotonic() + self.liveness
        if command == p.CHUNK:
            self.route_outputs(worker, p.CHUNK, body, finished=False)
        elif command == p.DONE:
            self.route_outputs(worker, p.DONE, body, finished=True)
        elif command == p.ERROR:
            self.job_failed(worker, body)
        elif command == p.DISCONNECT and body.get("drain"):
            worker.draining = True
            log.info("worker %s is draining: it finishes %d jobs and gets no new ones",
                     worker.worker_id, len(worker.jobs))
        elif command == p.DISCONNECT:
            self.remove_worker(worker, str(body.get("reason", "disconnect")))
        elif command != p.HEARTBEAT:
            log.warning("dropped %s from worker %s", p.COMMAND_NAMES[command], worker.worker_id)

    def worker_ready(self, identity: bytes, body: dict) -> None:
        models, slots = body["models"], int(body["slots"])
        if not models or not all(isinstance(m, str) for m in models) or slots < 1:
            raise ValueError(f"READY needs models and slots, got {models!r} and {slots}")
        old = self.workers.get(identity)
        if old is not None:
            self.remove_worker(old, "announced itself again")
        worker = Worker(identity, str(body.get("worker_id", identity.hex())), list(models), slots,
                        slots, str(body.get("host", "")), str(body.get("device", "")),
                        time.monotonic() + self.liveness)
        self.workers[identity] = worker
        for model in worker.models:
            self.serving[model].append(worker)
            self.serving[model].sort(key=lambda w: w.worker_id)
        log.info("worker %s joined: models %s, %d slots, %s on %s",
                 worker.worker_id, worker.models, slots, worker.device, worker.host)
        for model in worker.models:
            self.dispatch(model)

    def remove_worker(self, worker: Worker, reason: str) -> None:
        del self.workers[worker.identity]
        for model in worker.models:
            self.serving[model].remove(worker)
        requeued = 0
        for job_id in worker.jobs:
            job = self.jobs[job_id]
            if job.cancelled:
                del self.jobs[job_id]
            elif not job.started:
                log.info("request %s: requeued (its worker %s left)", job_id, worker.worker_id)
                job.worker = None
                queue = self.queues[job.model]
                queue[job_id] = job
                queue.move_to_end(job_id, last=False)
                requeued += 1
            else:
                del self.jobs[job_id]
                self._fail(job, 502, "worker_lost",
                           f"the worker generating this response was lost ({reason})")
        log.info("worker %s left (%s); %d jobs requeued", worker.worker_id, reason, requeued)
        for model in worker.models:
            self.dispatch(model)

    def route_outputs(self, worker: Worker, command: bytes, entries: list, finished: bool) -> None:
        """Send each entry [id, text, ...] to the frontend of its job, one message per frontend."""
        by_frontend: dict[bytes, list] = {}
        for entry in entries:
            job = self.jobs.get(entry[0])
            if job is None or job.worker is not worker:
                continue  # stale: the job was failed, cancelled or requeued elsewhere
            if finished:
                log.debug("request %s: done", job.id)
                self.release(job)
            else:
                job.started = True
            if not job.cancelled:
                by_frontend.setdefault(job.frontend, []).append(entry)
        for frontend, items in by_frontend.items():
            self._send_frontend(frontend, command, items)
        if finished:
            for model in worker.models:
                self.dispatch(model)

    def job_failed(self, worker: Worker, body: dict) -> None:
        job = self.jobs.get(body["id"])
        if job is None or job.worker is not worker:
            return
        self.release(job)
        if not job.cancelled:
            self._send_frontend(job.frontend, p.ERROR, body)
        for model in worker.models:
            self.dispatch(model)

    # -- liveness -----------------------------------------------------------------------------

    def purge_workers(self, now: float) -> None:
        for worker in [w for w in self.workers.values() if w.expires < now]:
            self.remove_worker(worker, "heartbeat lost")

    def purge_frontends(self, now: float) -> None:
        """A frontend silent for FRONTEND_LIVENESS intervals is gone, or cut off: its jobs are
        cancelled so that they stop holding slots."""
        for identity in [f for f, expires in self.frontends.items() if expires < now]:
            del self.frontends[identity]
            orphans = [job_id for job_id, job in self.jobs.items() if job.frontend == identity]
            if orphans:
                log.info("frontend %s went silent; cancelling its %d jobs", identity.hex(), len(orphans))
                self.cancel(identity, orphans)

    def expire_queued(self, now: float) -> None:
        for model, queue in self.queues.items():
            for job in [j for j in queue.values() if j.expires < now]:
                del queue[job.id]
                del self.jobs[job.id]
                self._fail(job, 504, "timeout", f"no worker for model '{model}' became free before the deadline")

    def send_heartbeats(self) -> None:
        for worker in self.workers.values():
            self._send_worker(worker, p.HEARTBEAT, {})


def run(config: BrokerConfig) -> None:
    broker = Broker(config)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    broker.run()
    log.info("broker stopped")
