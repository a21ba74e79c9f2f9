"""A frontend's connection to the broker: one asyncio DEALER shared by every request.

`submit()` sends one SUBMIT per choice of a request (n choices, or one per prompt of a
completion) and returns one Stream for them all; one reader task receives everything the
broker sends and puts each STEP output and ERROR on its request's stream, marked with its
choice's index, so that the choices arrive interleaved as they are generated. `status()`
asks the broker for its STATUS. A heartbeat task pings the broker; while it is silent for
HEARTBEAT_LIVENESS intervals the client counts it as down: new requests fail at once and
requests in flight end with an error instead of waiting for their deadline. The broker's
id, in each heartbeat reply, tells a restarted broker from the one the requests in flight
went to: they end with the same error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import zmq
import zmq.asyncio

from zmqchat import protocol as p
from zmqchat.config import HEARTBEAT_INTERVAL, HEARTBEAT_LIVENESS
from zmqchat.curve import Curve, secure_client
from zmqchat.protocol import ErrorCode

log = logging.getLogger("zmqchat.client")


class BrokerError(Exception):
    """A request that ended without an answer, with the code that says why."""

    def __init__(self, code: ErrorCode, message: str, param: str = ""):
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param  # the request parameter at fault, where the worker named one


@dataclass
class Event:
    """One choice's output of one engine step (its last has `output.finish` set), or the
    error that ends the request."""

    index: int  # the choice it belongs to
    output: p.Output | None = None
    error: BrokerError | None = None

    @property
    def finished(self) -> bool:
        return self.error is not None or self.output.finish is not None


class Stream:
    """The events of one request's choices, in order of arrival: an error event ends the
    request (finish() cancels the choices still running)."""

    def __init__(self, request_id: str, choices: int, deadline: float):
        self.id = request_id
        self.job_ids = [f"{request_id}-{i}" for i in range(choices)]
        self.deadline = deadline
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.running = set(range(choices))  # choices whose last event has not come

    @property
    def finished(self) -> bool:
        return not self.running

    async def next(self) -> Event:
        remaining = self.deadline - time.monotonic()
        try:
            event = await asyncio.wait_for(self.events.get(), max(remaining, 0.001))
        except asyncio.TimeoutError:
            # The choices still run somewhere, and finish() will cancel them.
            return Event(0, error=BrokerError(ErrorCode.TIMEOUT, "the request did not finish before its deadline"))
        if event.finished:
            self.running.discard(event.index)
        return event


class BrokerClient:
    def __init__(self, address: str, curve: Curve | None = None, heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 heartbeat_liveness: int = HEARTBEAT_LIVENESS):
        self.address = address
        self.curve = curve
        self.heartbeat_interval = heartbeat_interval
        self.liveness = heartbeat_interval * heartbeat_liveness
        self.jobs: dict[str, tuple[Stream, int]] = {}  # job id -> its request's stream, choice index
        self.status_waiters: dict[str, asyncio.Future] = {}
        self.last_heard = 0.0
        self.broker_id: str | None = None
        self.context = zmq.asyncio.Context.instance()
        self.socket: zmq.asyncio.Socket | None = None
        self.tasks: list[asyncio.Task] = []

    @property
    def broker_up(self) -> bool:
        return time.monotonic() - self.last_heard < self.liveness

    async def start(self) -> None:
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        # Queue nothing for a broker that is not connected: sends fail, requests get a 503.
        self.socket.setsockopt(zmq.IMMEDIATE, 1)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        self.socket.setsockopt(zmq.MAXMSGSIZE, p.MAX_BODY_BYTES)
        secure_client(self.socket, self.curve)
        self.socket.connect(self.address)
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._heartbeat())]

    async def wait_for_broker(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.broker_up and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.broker_up

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.socket.close()

    def _send(self, message: p.Message) -> None:
        self._send_frames(p.encode(message))

    def _send_frames(self, frames: list[bytes]) -> None:
        # A non-blocking send completes at once; its Future holds zmq.Again when no broker
        # is connected (IMMEDIATE), which becomes an error here rather than a queued message.
        sent = self.socket.send_multipart(frames, flags=zmq.NOBLOCK)
        if sent.done() and sent.exception() is not None:
            raise BrokerError(ErrorCode.BROKER_UNAVAILABLE, f"the broker at {self.address} is not reachable")

    # -- requests -----------------------------------------------------------------------------

    def submit(self, model: str, choices: list[dict], timeout: float) -> Stream:
        """Start a request: `choices` holds, per choice, the Submit fields of its prompt
        ("messages" or "prompt") and its "params", or of its inputs to embed ("embed"). A request
        that cannot be sent whole is not sent at all: the choices already sent are cancelled."""
        if not self.broker_up:
            raise BrokerError(ErrorCode.BROKER_UNAVAILABLE, f"the broker at {self.address} is not answering")
        stream = Stream(uuid.uuid4().hex, len(choices), time.monotonic() + timeout)
        try:
            for index, (job_id, choice) in enumerate(zip(stream.job_ids, choices)):
                frames = p.encode(p.Submit(id=job_id, model=model, timeout=timeout, **choice))
                p.decode(frames)  # checked as the broker will check it: it would drop a job that fails
                self._send_frames(frames)
                self.jobs[job_id] = (stream, index)
        except p.ProtocolError as exc:
            self.finish(stream)
            raise BrokerError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        except BrokerError:
            self.finish(stream)
            raise
        return stream

    def finish(self, stream: Stream) -> None:
        """The caller is done with `stream`; choices still running are cancelled."""
        running = []
        for job_id in stream.job_ids:
            if job_id in self.jobs:  # its last event has not come
                del self.jobs[job_id]
                running.append(job_id)
        stream.running.clear()
        if running:
            try:
                self._send(p.Cancel(ids=running))
            except BrokerError:
                pass  # the broker is gone, and the jobs with it

    async def status(self, timeout: float = 3.0) -> p.StatusReport:
        token = uuid.uuid4().hex
        waiter = asyncio.get_running_loop().create_future()
        self.status_waiters[token] = waiter
        try:
            self._send(p.Status(token=token))
            return await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            raise BrokerError(ErrorCode.BROKER_UNAVAILABLE, f"the broker at {self.address} did not answer") from None
        finally:
            self.status_waiters.pop(token, None)

    # -- background tasks ---------------------------------------------------------------------

    async def _read(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            try:
                message = p.decode(frames)
            except p.ProtocolError as exc:
                log.warning("dropped a bad message from the broker: %s", exc)
                continue
            self.last_heard = time.monotonic()
            self._dispatch(message)

    def _dispatch(self, message: p.Message) -> None:
        if isinstance(message, p.Step):
            for output in message.outputs:
                self._deliver(output.id, output.finish is not None, lambda index: Event(index, output))
        elif isinstance(message, p.Error):
            error = BrokerError(message.code, message.message, message.param)
            self._deliver(message.id, True, lambda index: Event(index, error=error))
        elif isinstance(message, p.Heartbeat):
            self._check_broker_id(message.broker_id)
        elif isinstance(message, p.Status):
            waiter = self.status_waiters.get(message.token)
            if waiter is not None and not waiter.done() and message.report is not None:
                waiter.set_result(message.report)

    def _check_broker_id(self, broker_id: str) -> None:
        if self.broker_id is not None and broker_id != self.broker_id:
            log.warning("the broker at %s restarted; failing the requests in flight", self.address)
            self._fail_all(BrokerError(ErrorCode.BROKER_UNAVAILABLE, "the broker restarted and lost this request"))
        self.broker_id = broker_id

    def _deliver(self, job_id: str, last: bool, event) -> None:
        route = self.jobs.get(job_id)
        if route is None:
            return  # its client left: the broker will see our CANCEL
        if last:
            del self.jobs[job_id]
        stream, index = route
        stream.events.put_nowait(event(index))

    async def _heartbeat(self) -> None:
        was_up = False
        while True:
            try:
                self._send(p.Heartbeat())
            except BrokerError:
                pass
            await asyncio.sleep(self.heartbeat_interval)
            up = self.broker_up
            if was_up and not up:
                log.warning("lost the broker at %s; failing the requests in flight", self.address)
                self._fail_all(BrokerError(ErrorCode.BROKER_UNAVAILABLE, "lost contact with the broker"))
            elif up and not was_up:
                log.info("in contact with the broker at %s", self.address)
            was_up = up

    def _fail_all(self, error: BrokerError) -> None:
        streams = {id(stream): stream for stream, _ in self.jobs.values()}
        self.jobs = {}
        for stream in streams.values():
            stream.events.put_nowait(Event(0, error=error))


def fetch_status(address: str, timeout: float = 3.0, curve: Curve | None = None) -> p.StatusReport:
    """The broker's STATUS, from outside an event loop (the CLI, `serve`)."""
    async def ask() -> p.StatusReport:
        client = BrokerClient(address, curve)
        await client.start()
        try:
            if not await client.wait_for_broker(timeout):
                raise BrokerError(ErrorCode.BROKER_UNAVAILABLE, f"no broker answers at {address}")
            return await client.status(timeout)
        finally:
            await client.close()

    return asyncio.run(ask())
