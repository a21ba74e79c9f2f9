"""The worker's own faults: an engine that dies, a broker that is gone when it is told to
stop, a prompt so large that tokenising it could stall everyone else's stream; and how many
sequences it takes at once."""

from __future__ import annotations

import json
import platform
import signal
import threading
import time

import httpx
import pytest
from conftest import DEVICE, Running, chat, free_port, wait_for

from zmqchat import protocol as p
from zmqchat.config import MAX_SLOTS_FROM_MEMORY, SLOT_TOKENS, WorkerConfig
from zmqchat.engine import Engine, FakeRunner
from zmqchat.engine.model_runner import keep_freed_memory, slots_from_memory
from zmqchat.worker import Worker


def start_worker(running: Running, engine: Engine,
                 kind: type[Worker] = Worker) -> tuple[Worker, threading.Thread, list]:
    """A worker of `kind` on `engine`, joined to `running`'s broker and run on a thread of its
    own: the worker, the thread, and a list that gets run()'s exit status when it returns."""
    worker = kind(WorkerConfig(broker=running.config.backend, fake=True), engine, "fake", running.context)
    status = []
    thread = threading.Thread(target=lambda: status.append(worker.run()), daemon=True)
    thread.start()
    return worker, thread, status


class CancelBreaks(Engine):
    """An engine with a bug where the worker applies cancels, outside any step."""

    def cancel(self, job_id: str):
        raise RuntimeError("a bug in the cancel path")


def test_a_dead_engine_thread_fails_its_jobs_leaves_the_broker_and_exits_non_zero():
    running = Running()
    try:
        _, thread, status = start_worker(running, CancelBreaks(FakeRunner(delay=0.05)))
        frontend = running("frontend")
        wait_for(lambda: running.broker.workers, 5, "the worker to join")
        words = " ".join(["word"] * 200)
        for job_id in ("doomed", "bystander"):
            frontend.send(p.Submit(id=job_id, model="fake", timeout=30.0, messages=[p.ChatMessage("user", words)]))
        wait_for(lambda: isinstance(frontend.recv(), p.Step), 5, "output")
        frontend.send(p.Cancel(["doomed"]))  # the engine thread dies applying it
        errors = {}
        while "bystander" not in errors:
            message = frontend.recv(skip=(p.Heartbeat, p.Step))
            assert message is not None, "the bystander never heard"
            errors[message.id] = message
        assert errors["bystander"].code == p.ErrorCode.ENGINE_ERROR
        thread.join(timeout=5)
        assert status == [1]
        wait_for(lambda: not running.broker.workers, 5, "the broker to let the worker go")
    finally:
        running.stop()


class ServeBreaks(Worker):
    """A worker with a bug in its socket loop, once it has joined the broker."""

    def _announce(self):
        super()._announce()
        raise RuntimeError("a bug in the socket loop")


def test_a_dead_socket_thread_stops_the_worker_with_status_one():
    running = Running()
    try:
        _, thread, status = start_worker(running, Engine(FakeRunner()), ServeBreaks)
        thread.join(timeout=10)
        assert status == [1]
        wait_for(lambda: not running.broker.workers, 5, "the broker to let the worker go")
    finally:
        running.stop()


class RecordsItsThreads(Engine):
    """An engine that notes each thread it steps on."""

    def __init__(self, *args):
        super().__init__(*args)
        self.threads: set[int] = set()

    def step(self):
        self.threads.add(threading.get_ident())
        return super().step()


def test_the_engine_steps_on_the_thread_that_runs_the_worker():
    """The thread that loaded the model computes with it (worker.py says why: OpenMP's pools)."""
    running = Running()
    try:
        engine = RecordsItsThreads(FakeRunner(), 4)
        worker, runner_thread, status = start_worker(running, engine)
        frontend = running("frontend")
        wait_for(lambda: running.broker.workers, 5, "the worker to join")
        frontend.send(p.Submit(id="one", model="fake", timeout=30.0, messages=[p.ChatMessage("user", "hello")]))
        finished = False
        while not finished:
            message = frontend.recv()
            assert isinstance(message, p.Step), f"the reply never finished: {message}"
            finished = any(output.finish for output in message.outputs)
        worker.stop()
        worker.stop()  # the second signal: stop now
        runner_thread.join(timeout=10)
        assert status == [0]
        assert engine.threads == {runner_thread.ident}
    finally:
        running.stop()


def test_sigterm_stops_a_worker_that_is_waiting_to_reconnect(cluster):
    nobody = f"tcp://127.0.0.1:{free_port()}"
    worker = cluster.spawn("worker", "worker", "--fake", "--broker", nobody)
    # Its second back-off (2 s; they grow to 8 s) starts as it says so: stop it right then.
    wait_for(lambda: "reconnecting in 2.0 s" in worker.output(), 20, "the worker's second back-off")
    started = time.monotonic()
    assert worker.stop(signal.SIGTERM, timeout=10) == 0
    assert time.monotonic() - started < 1.0
    assert worker.output().count("announced") == 2  # it did not announce itself again before leaving


def test_a_huge_prompt_is_refused_without_stalling_other_streams(cluster):
    cluster.broker()
    cluster.worker("--fake-delay", "0.02")
    cluster.api()
    gaps = []

    def stream_a_long_reply():
        body = chat(content=" ".join(["word"] * 300), stream=True)
        last = None
        with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                now = time.monotonic()
                if line.startswith("data: {") and last is not None:
                    gaps.append(now - last)
                last = now

    streamer = threading.Thread(target=stream_a_long_reply)
    streamer.start()
    time.sleep(1.0)  # the stream is flowing
    huge = chat(content="a " * 1_950_000, n=16)  # 3.9 MB, two million words for the fake tokenizer
    started = time.monotonic()
    response = httpx.post(f"{cluster.url}/v1/chat/completions", content=json.dumps(huge),
                          headers={"content-type": "application/json"}, timeout=60)
    refused_after = time.monotonic() - started
    streamer.join()
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert max(gaps) < 1.5, f"another stream stalled for {max(gaps):.1f} s"
    assert refused_after < 20


@pytest.mark.model
def test_a_model_workers_slots_follow_from_its_kv_memory(cluster):
    cluster.broker()
    cluster.worker("--max-tokens-in-flight", str(3 * SLOT_TOKENS), "--device", DEVICE, fake=False)
    cluster.worker("--max-tokens-in-flight", str(3 * SLOT_TOKENS), "--max-batch", "2", "--device", DEVICE, fake=False)
    assert sorted(w["slots"] for w in cluster.status()["workers"]) == [2, 3]  # --max-batch caps it


def test_slots_from_memory_are_bounded_both_ways():
    assert slots_from_memory(10 * SLOT_TOKENS + 5) == 10
    assert slots_from_memory(SLOT_TOKENS // 2) == 1
    assert slots_from_memory(10**9) == MAX_SLOTS_FROM_MEMORY


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc only")
def test_a_cpu_worker_keeps_freed_memory_with_settings_glibc_accepts():
    assert keep_freed_memory()  # each mallopt() setting taken
