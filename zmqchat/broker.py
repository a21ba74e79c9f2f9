"""The broker: one ROUTER for frontends, one ROUTER for workers, and the dispatch between them.

Frontends SUBMIT jobs; the broker queues each one under its model (bounded) and hands it to
a worker with a free slot that serves the model for the job's task (generate, or embed),
chosen by the dispatch policy. The broker counts every worker's
free slots itself (a slot is taken on dispatch and given back when the job's finished output
or its ERROR comes), so it only sends work a worker can start now. Each STEP from a worker is
split by frontend and routed to whoever submitted each job.

Workers and broker heartbeat each other. A worker silent for HEARTBEAT_LIVENESS intervals is
removed: its jobs that have sent no output yet go back to the front of the queue, the others
end with an error to their client. Queued jobs past their deadline end with a timeout error.
A model is forgotten once no worker serves it and nothing waits for it.

The loop is the Majordomo broker's `mediate()`: receive, handle by command, purge the dead,
send heartbeats. Everything runs on one thread; every message is checked on decode (protocol.py)
and one method handles each command, so nothing a peer sends can raise out of the loop.
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
from zmqchat.config import FRONTEND_LIVENESS, BrokerConfig
from zmqchat.curve import Gatekeeper, check_exposure
from zmqchat.policy import make_policy
from zmqchat.protocol import ErrorCode

log = logging.getLogger("zmqchat.broker")

DRAIN_BATCH = 256  # messages read from one socket before looking at the other


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
    stuck: bool = False  # held a job past its deadline without output; no new jobs until it sends output
    max_model_len: int = 0  # its model's context window, as it announced it
    tasks: tuple[str, ...] = p.TASKS  # what it serves its models for


@dataclass(eq=False)
class Job:
    id: str
    frontend: bytes
    model: str
    frames: list[bytes]  # the SUBMIT message as received, forwarded to the worker unchanged
    expires: float
    task: str = "generate"
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
        # Models whose last worker left with jobs queued -> when those jobs give up waiting for a new one.
        self.orphaned: dict[str, float] = {}
        self.frontends: dict[bytes, float] = {}  # identity -> when it counts as gone
        # One method per command, as the Majordomo broker has; READY comes before a worker is known.
        self.frontend_handlers = {p.Submit: self.submit, p.Cancel: self.cancel,
                                  p.Heartbeat: self.frontend_heartbeat, p.Status: self.status_query}
        self.worker_handlers = {p.Step: self.worker_step, p.Error: self.worker_error,
                                p.Disconnect: self.worker_disconnect, p.Heartbeat: lambda worker, beat: None}
        self.running = True
        # Told to frontends in every HEARTBEAT: a new id means a restarted broker, which
        # knows nothing of the jobs they had in flight.
        self.broker_id = uuid.uuid4().hex
        self.context = context or zmq.Context.instance()
        self.frontend, self.backend = self._router(), self._router()
        self.gatekeeper = Gatekeeper(self.context, self.frontend, self.backend, config.curve) if config.curve else None
        self.reload_keys = False  # set by SIGHUP: read the admitted keys again now
        self.peer_keys: dict[str, dict[bytes, str]] = {"frontends": {}, "workers": {}}  # role -> identity -> key
        self.banned: set[bytes] = set()  # connections whose key was revoked
        self.frontend.bind(config.frontend)
        self.backend.bind(config.backend)

    def _router(self) -> zmq.Socket:
        socket = self.context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, 100_000)
        socket.setsockopt(zmq.RCVHWM, 100_000)
        socket.setsockopt(zmq.MAXMSGSIZE, p.MAX_BODY_BYTES)  # a peer sending more is disconnected, unread
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
                self._read_all(self.frontend, "frontends", self.process_frontend, self.frontend_handlers)
            if self.backend in events:
                self._read_all(self.backend, "workers", self.process_worker, {p.Ready, *self.worker_handlers})
            now = time.monotonic()
            if now >= next_beat:
                self.purge_workers(now)
                self.purge_frontends(now)
                self.expire_queued(now)
                self.expire_dispatched(now)
                self.give_up_orphans(now)
                self.send_heartbeats()
                self.check_keys()
                next_beat = now + self.config.heartbeat_interval
        self.close()

    def stop(self, *_) -> None:
        self.running = False

    def hang_up(self, *_) -> None:
        """SIGHUP: read the admitted CURVE keys again."""
        self.reload_keys = True

    def close(self) -> None:
        self.frontend.close()
        self.backend.close()
        if self.gatekeeper is not None:
            self.gatekeeper.stop()

    def _read_all(self, socket: zmq.Socket, role: str, process, accepted) -> None:
        for _ in range(DRAIN_BATCH):
            try:
                identity, *frames = self._receive(socket, role)
            except zmq.Again:
                return
            if identity in self.banned:
                continue  # its key was revoked: it is not heard, and never answered
            try:
                message = p.decode(frames)
            except p.ProtocolError as exc:
                log.warning("dropped a bad message from %s: %s", identity.hex(), exc)
                continue
            if type(message) not in accepted:
                log.warning("dropped %s from %s: not expected there", type(message).__name__, identity.hex())
                continue
            try:
                process(identity, message)
            except Exception:  # a bug, not a peer's fault (messages are checked): keep serving
                log.exception("failed to handle %s from %s", type(message).__name__, identity.hex())

    def _receive(self, socket: zmq.Socket, role: str) -> list[bytes]:
        """The next message's frames. With CURVE, the sender's public key is noted (ZAP gives
        it as the message's User-Id) so that revoking it can silence the connection."""
        if self.gatekeeper is None:
            return socket.recv_multipart(zmq.NOBLOCK)
        identity, *frames = socket.recv_multipart(zmq.NOBLOCK, copy=False)
        self.peer_keys[role].setdefault(identity.bytes, identity.get("User-Id"))
        return [identity.bytes, *(frame.bytes for frame in frames)]

    def _send_frontend(self, identity: bytes, message: p.Message) -> None:
        self.frontend.send_multipart([identity, *p.encode(message)])

    def _send_worker(self, worker: Worker, message: p.Message) -> None:
        self.backend.send_multipart([worker.identity, *p.encode(message)])

    def _fail(self, job: Job, code: ErrorCode, message: str) -> None:
        log.info("request %s failed (%s): %s", job.id, code.value, message)
        self._send_frontend(job.frontend, p.Error(job.id, code, message))

    # -- frontends ----------------------------------------------------------------------------

    def process_frontend(self, identity: bytes, message: p.Message) -> None:
        self.frontends[identity] = time.monotonic() + self.config.heartbeat_interval * FRONTEND_LIVENESS
        self.frontend_handlers[type(message)](identity, message)

    def frontend_heartbeat(self, identity: bytes, _: p.Heartbeat) -> None:
        self._send_frontend(identity, p.Heartbeat(self.broker_id))

    def status_query(self, identity: bytes, query: p.Status) -> None:
        self._send_frontend(identity, p.Status(query.token, self.status()))

    def submit(self, frontend: bytes, submit: p.Submit) -> None:
        job = Job(submit.id, frontend, submit.model, p.encode(submit), time.monotonic() + submit.timeout, submit.task)
        if job.id in self.jobs:
            return self._fail(job, ErrorCode.INVALID_REQUEST, f"request id {job.id} is already in use")
        if not self.serving.get(job.model) and job.model not in self.orphaned:
            if self.workers:
                served = ", ".join(sorted(self.serving))
                return self._fail(job, ErrorCode.MODEL_NOT_FOUND,
                                  f"The model '{job.model}' does not exist. Served models: {served}")
            return self._fail(job, ErrorCode.NO_WORKER, "no worker is connected to the broker")
        if self.serving.get(job.model) and not any(job.task in w.tasks for w in self.serving[job.model]):
            return self._fail(job, ErrorCode.MODEL_NOT_FOUND,
                              f"The model '{job.model}' is not served for this ({job.task}) by any worker")
        queue = self.queues[job.model]
        if len(queue) >= self.config.max_queue:
            return self._fail(job, ErrorCode.OVERLOADED,
                              f"the queue for model '{job.model}' is full ({len(queue)} waiting)")
        self.jobs[job.id] = job
        queue[job.id] = job
        log.debug("request %s: queued for %s (%d waiting)", job.id, job.model, len(queue))
        self.dispatch(job.model)

    def cancel(self, frontend: bytes, cancel: p.Cancel) -> None:
        for job_id in cancel.ids:
            job = self.jobs.get(job_id)
            if job is None or job.frontend != frontend or job.cancelled:
                continue
            log.info("request %s: cancelled by its frontend", job_id)
            if job.worker is None:
                self._unqueue(job)
            else:
                # The slot stays taken until the worker confirms the sequence is gone.
                job.cancelled = True
                self._send_worker(job.worker, p.Cancel([job_id]))

    def status(self) -> p.StatusReport:
        now = time.monotonic()
        workers = [p.WorkerStatus(
            worker_id=w.worker_id, models=w.models, host=w.host, device=w.device, slots=w.slots, free=w.free,
            dispatched=w.dispatched, done=w.done, draining=w.draining,
            last_heard=round(self.liveness - (w.expires - now), 3), tasks=list(w.tasks),
        ) for w in self.workers.values()]
        models = {model: p.ModelStatus(workers=len(ws), slots=sum(w.slots for w in ws),
                                       free=sum(w.free for w in ws), queued=len(self.queues.get(model, ())),
                                       max_model_len=min(w.max_model_len for w in ws))
                  for model, ws in self.serving.items()}
        return p.StatusReport(self.policy.name, workers, models)

    # -- dispatch -----------------------------------------------------------------------------

    def dispatch(self, model: str) -> None:
        """Hand queued jobs of `model` to workers while any has a free slot, each job in order to
        a worker that serves its task (a job no free worker serves waits, and those behind it
        that one does go first)."""
        queue = self.queues.get(model)
        while queue:
            free = [w for w in self.serving.get(model, ()) if w.free > 0 and not (w.draining or w.stuck)]
            if not free:
                return
            job = next((j for j in queue.values() if any(j.task in w.tasks for w in free)), None)
            if job is None:
                return
            del queue[job.id]
            worker = self.policy.pick([w for w in free if job.task in w.tasks])
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

    def _unqueue(self, job: Job) -> None:
        """Forget a job that was never dispatched, and its model's queue once it is empty
        and no worker serves the model (a peer must not grow the broker's memory by naming models)."""
        queue = self.queues[job.model]
        del queue[job.id]
        del self.jobs[job.id]
        self._forget_model_if_unused(job.model)

    def _forget_model_if_unused(self, model: str) -> None:
        if not self.queues.get(model) and not self.serving.get(model):
            self.queues.pop(model, None)
            self.serving.pop(model, None)
            self.orphaned.pop(model, None)

    # -- workers ------------------------------------------------------------------------------

    def process_worker(self, identity: bytes, message: p.Message) -> None:
        if isinstance(message, p.Ready):
            return self.worker_ready(identity, message)
        worker = self.workers.get(identity)
        if worker is None:
            # A worker we do not know (we restarted, or purged it): make it announce itself.
            self.backend.send_multipart([identity, *p.encode(p.Disconnect("unknown worker"))])
            return
        worker.expires = time.monotonic() + self.liveness
        self.worker_handlers[type(message)](worker, message)

    def worker_ready(self, identity: bytes, ready: p.Ready) -> None:
        old = self.workers.get(identity)
        if old is not None:
            self.remove_worker(old, "announced itself again")
        models = list(dict.fromkeys(ready.models))  # a model named twice is served once
        worker = Worker(identity, ready.worker_id, models, ready.slots, ready.slots, ready.host, ready.device,
                        time.monotonic() + self.liveness, max_model_len=ready.max_model_len,
                        tasks=tuple(dict.fromkeys(ready.tasks)))
        self.workers[identity] = worker
        for model in models:
            self.serving[model].append(worker)
            self.serving[model].sort(key=lambda w: w.worker_id)
            self.orphaned.pop(model, None)
        log.info("worker %s joined: models %s for %s, %d slots, %s on %s",
                 worker.worker_id, models, " and ".join(worker.tasks), worker.slots, worker.device, worker.host)
        for model in models:
            self.dispatch(model)

    def worker_disconnect(self, worker: Worker, disconnect: p.Disconnect) -> None:
        if not disconnect.drain:
            return self.remove_worker(worker, disconnect.reason or "disconnect")
        worker.draining = True
        log.info("worker %s is draining: it finishes %d jobs and gets no new ones",
                 worker.worker_id, len(worker.jobs))

    def remove_worker(self, worker: Worker, reason: str) -> None:
        del self.workers[worker.identity]
        for model in worker.models:
            self.serving[model].remove(worker)
            if not self.serving[model]:
                del self.serving[model]
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
                self._fail(job, ErrorCode.WORKER_LOST, f"the worker generating this response was lost ({reason})")
        log.info("worker %s left (%s); %d jobs requeued", worker.worker_id, reason, requeued)
        for model in worker.models:
            self.dispatch(model)
            if model not in self.serving and self.queues.get(model):
                grace = self.config.no_worker_grace
                log.warning("no worker serves %s any more; its %d queued jobs wait %.0f s for one",
                            model, len(self.queues[model]), grace)
                self.orphaned[model] = time.monotonic() + grace
            self._forget_model_if_unused(model)

    def worker_step(self, worker: Worker, step: p.Step) -> None:
        """Send each output to the frontend of its job, one STEP per frontend; a finished
        output frees its job's slot."""
        by_frontend: dict[bytes, list[p.Output]] = {}
        freed = worker.stuck  # output proves its engine runs: it may take jobs again
        worker.stuck = False
        for output in step.outputs:
            job = self.jobs.get(output.id)
            if job is None or job.worker is not worker:
                continue  # stale: the job was failed, cancelled or requeued elsewhere
            if output.finish is not None:
                log.debug("request %s: done", job.id)
                self.release(job)
                freed = True
            else:
                job.started = True
            if not job.cancelled:
                by_frontend.setdefault(job.frontend, []).append(output)
        for frontend, outputs in by_frontend.items():
            self._send_frontend(frontend, p.Step(outputs))
        if freed:
            for model in worker.models:
                self.dispatch(model)

    def worker_error(self, worker: Worker, error: p.Error) -> None:
        job = self.jobs.get(error.id)
        if job is None or job.worker is not worker:
            return
        self.release(job)
        if not job.cancelled:
            self._send_frontend(job.frontend, error)
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
                self.cancel(identity, p.Cancel(orphans))

    def expire_queued(self, now: float) -> None:
        for model, queue in list(self.queues.items()):
            for job in [j for j in queue.values() if j.expires < now]:
                self._unqueue(job)
                self._fail(job, ErrorCode.TIMEOUT, f"no worker for model '{model}' became free before the deadline")

    def expire_dispatched(self, now: float) -> None:
        """A job its worker held past the deadline without a word of output ends with an error
        now, and the worker, presumed stuck, gets no more jobs until it sends output again."""
        for job in [j for j in self.jobs.values() if j.worker and not (j.started or j.cancelled) and j.expires < now]:
            worker = job.worker
            if not worker.stuck:
                log.warning("worker %s holds request %s past its deadline without output: presumed stuck",
                            worker.worker_id, job.id)
                worker.stuck = True
            self._fail(job, ErrorCode.TIMEOUT, f"the worker given this request ({worker.worker_id}) did not "
                                               "start it before its deadline")
            job.cancelled = True  # its slot stays taken until the worker confirms the cancel
            self._send_worker(worker, p.Cancel([job.id]))

    def give_up_orphans(self, now: float) -> None:
        """Jobs of a model whose last worker left, and none came back in the grace period, fail."""
        for model in [m for m, deadline in self.orphaned.items() if deadline < now]:
            for job in list(self.queues.get(model, {}).values()):
                self._unqueue(job)
                self._fail(job, ErrorCode.NO_WORKER, f"no worker serves model '{model}' any more")

    def check_keys(self) -> None:
        """Admit and revoke CURVE keys as the folder changes (or at once on SIGHUP)."""
        if self.gatekeeper is not None and self.gatekeeper.reload(force=self.reload_keys):
            for role, keys in self.peer_keys.items():
                for identity in [i for i, key in keys.items() if key not in self.gatekeeper.admitted[role]]:
                    self.revoke(role, identity)
        self.reload_keys = False

    def revoke(self, role: str, identity: bytes) -> None:
        """Silence a connection whose key is no longer admitted: a worker leaves (its jobs rerun
        or fail), a frontend's jobs are cancelled. A new connection with the key is refused by ZAP."""
        del self.peer_keys[role][identity]
        self.banned.add(identity)
        log.warning("a %s's CURVE key was revoked: dropping its connection %s", role[:-1], identity.hex())
        if role == "workers" and identity in self.workers:
            self.remove_worker(self.workers[identity], "its key was revoked")
        elif role == "frontends":
            self.frontends.pop(identity, None)
            self.cancel(identity, p.Cancel([job.id for job in self.jobs.values() if job.frontend == identity]))

    def send_heartbeats(self) -> None:
        for worker in self.workers.values():
            self._send_worker(worker, p.Heartbeat())


def run(config: BrokerConfig) -> None:
    hosts = [address.split("://", 1)[-1].rsplit(":", 1)[0] for address in (config.frontend, config.backend)
             if address.startswith("tcp://")]
    check_exposure("the broker", hosts, protected=config.curve is not None, insecure=config.insecure)
    broker = Broker(config)
    signal.signal(signal.SIGTERM, broker.stop)
    signal.signal(signal.SIGINT, broker.stop)
    signal.signal(signal.SIGHUP, broker.hang_up)
    broker.run()
    log.info("broker stopped")
