"""The broker in-process on a private context, on free loopback ports, driven over real sockets
by test peers speaking the protocol."""

from __future__ import annotations

import time

import msgspec
import pytest
from conftest import RECV_TIMEOUT, Peer, Running, free_port, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmqchat import protocol as p


@pytest.fixture
def broker():
    started = []

    def start(**config) -> Running:
        started.append(Running(**config))
        return started[-1]
    yield start
    for running in started:
        running.stop()


def ready(worker: Peer, slots: int = 2, model: str = "m", worker_id: str = "w") -> None:
    worker.send(p.Ready(worker_id=worker_id, models=[model], slots=slots, host="h", device="cpu"))
    worker.send(p.Heartbeat())


def output(job_id: str, text: str = "", finish: str | None = None, usage=(1, 1)) -> p.Output:
    return p.Output(job_id, text, finish=finish, usage=p.Usage(*usage) if finish else None)


def submit(frontend: Peer, job_id: str, model: str = "m", timeout: float = 30.0) -> None:
    frontend.send(p.Submit(id=job_id, model=model, timeout=timeout, messages=[p.ChatMessage("user", "hi")]))


def status(frontend: Peer) -> p.StatusReport:
    frontend.send(p.Status("s"))
    return frontend.recv().report


def wait_for_workers(frontend: Peer, n: int) -> p.StatusReport:
    deadline = time.monotonic() + RECV_TIMEOUT
    while time.monotonic() < deadline:
        report = status(frontend)
        if len(report.workers) == n:
            return report
        time.sleep(0.05)
    raise AssertionError(f"expected {n} workers, status says {report}")


def test_outputs_go_back_to_the_frontend_that_submitted(broker):
    peer = broker()
    worker, alice, bob = peer("worker"), peer("frontend"), peer("frontend")
    ready(worker)
    wait_for_workers(alice, 1)
    submit(alice, "a1")
    submit(bob, "b1")
    assert {worker.recv().id, worker.recv().id} == {"a1", "b1"}
    # One STEP for the whole engine step is split by frontend.
    worker.send(p.Step([output("a1", "for alice"), output("b1", "for bob")]))
    assert alice.recv() == p.Step([output("a1", "for alice")])
    assert bob.recv() == p.Step([output("b1", "for bob")])
    worker.send(p.Step([output("b1", "!", "stop", (3, 2)), output("a1", "", "length", (3, 9))]))
    assert alice.recv() == p.Step([output("a1", "", "length", (3, 9))])
    assert bob.recv() == p.Step([output("b1", "!", "stop", (3, 2))])
    report = status(alice)
    assert report.models["m"] == p.ModelStatus(workers=1, slots=2, free=2, queued=0)
    assert report.workers[0].done == 2


def test_jobs_wait_for_a_free_slot(broker):
    peer = broker()
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker, slots=1)
    wait_for_workers(frontend, 1)
    submit(frontend, "j1")
    submit(frontend, "j2")
    assert worker.recv().id == "j1"
    assert worker.recv(timeout=0.5) is None  # no credit left: j2 waits in the broker
    assert status(frontend).models["m"].queued == 1
    worker.send(p.Step([output("j1", "x")]))  # not finished: the slot stays taken
    assert frontend.recv() == p.Step([output("j1", "x")])
    assert worker.recv(timeout=0.5) is None
    worker.send(p.Step([output("j1", "", "stop")]))
    assert frontend.recv().outputs[0].finish == "stop"
    assert worker.recv().id == "j2"


def test_a_job_waiting_for_a_busy_task_does_not_hold_up_another_tasks(broker):
    peer = broker()
    generator, embedder, frontend = peer("worker"), peer("worker"), peer("frontend")
    generator.send(p.Ready(worker_id="g", models=["m"], slots=1, tasks=["generate"]))
    embedder.send(p.Ready(worker_id="e", models=["m"], slots=4, tasks=["embed"]))
    wait_for_workers(frontend, 2)
    submit(frontend, "chat1")
    submit(frontend, "chat2")  # waits: the only generating worker is busy
    frontend.send(p.Submit(id="emb", model="m", timeout=30.0, embed=p.Embed(["hi"])))
    assert generator.recv().id == "chat1" and generator.recv(timeout=0.5) is None
    assert embedder.recv(beat=True).id == "emb"  # past chat2, to the worker that embeds
    assert embedder.recv(timeout=0.5) is None  # and never a chat
    generator.send(p.Step([output("chat1", "", "stop")]))
    assert generator.recv(beat=True).id == "chat2"


def test_unknown_model_and_no_worker_are_told_apart(broker):
    peer = broker()
    frontend = peer("frontend")
    submit(frontend, "j1")
    assert frontend.recv() == p.Error("j1", p.ErrorCode.NO_WORKER, "no worker is connected to the broker")
    worker = peer("worker")
    ready(worker, model="served")
    wait_for_workers(frontend, 1)
    submit(frontend, "j2", model="other")
    error = frontend.recv()
    assert (error.id, error.code) == ("j2", p.ErrorCode.MODEL_NOT_FOUND) and "served" in error.message


def test_a_full_queue_refuses(broker):
    peer = broker(max_queue=1)
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker, slots=1)
    wait_for_workers(frontend, 1)
    for job_id in ("running", "queued", "refused"):
        submit(frontend, job_id)
    error = frontend.recv()
    assert (error.id, error.code) == ("refused", p.ErrorCode.OVERLOADED)


def test_queued_job_past_its_deadline_times_out(broker):
    peer = broker()
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker, slots=1)
    wait_for_workers(frontend, 1)
    submit(frontend, "long")
    submit(frontend, "short", timeout=0.5)
    error = frontend.recv(beat=False)
    assert (error.id, error.code) == ("short", p.ErrorCode.TIMEOUT)


def test_dead_worker_is_removed_and_its_unstarted_jobs_rerun_elsewhere(broker):
    peer = broker()
    doomed, frontend = peer("worker"), peer("frontend")
    ready(doomed, slots=2, worker_id="doomed")
    wait_for_workers(frontend, 1)
    submit(frontend, "streaming")
    submit(frontend, "not-started")
    assert {doomed.recv().id, doomed.recv().id} == {"streaming", "not-started"}
    doomed.send(p.Step([output("streaming", "partial")]))
    assert isinstance(frontend.recv(), p.Step)
    survivor = peer("worker")
    ready(survivor, slots=2, worker_id="survivor")
    wait_for_workers(frontend, 2)
    silent_since = time.monotonic()  # `doomed` never speaks again
    rerun = survivor.recv(timeout=8.0, beat=True)
    detected = time.monotonic() - silent_since
    assert isinstance(rerun, p.Submit) and rerun.id == "not-started"
    assert detected < 5.0, f"took {detected:.1f} s to notice the dead worker"
    error = frontend.recv()
    assert (error.id, error.code) == ("streaming", p.ErrorCode.WORKER_LOST)
    # Output from the dead worker that arrives late is dropped, never delivered twice.
    doomed.send(p.Step([output("not-started", "stale")]))
    survivor.send(p.Step([output("not-started", "fresh", "stop")]))
    assert frontend.recv() == p.Step([output("not-started", "fresh", "stop")])
    assert [w.worker_id for w in status(frontend).workers] == ["survivor"]


def test_cancel_reaches_the_worker_and_frees_the_slot(broker):
    peer = broker()
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker, slots=1)
    wait_for_workers(frontend, 1)
    submit(frontend, "running")
    submit(frontend, "queued")
    assert worker.recv().id == "running"
    frontend.send(p.Cancel(["queued", "running"]))
    assert worker.recv() == p.Cancel(["running"])
    assert status(frontend).models["m"] == p.ModelStatus(workers=1, slots=1, free=0, queued=0)
    worker.send(p.Step([output("running", "", "cancelled", (1, 0))]))
    assert frontend.recv(timeout=0.5, skip=(p.Heartbeat, p.Status)) is None  # the client is gone
    assert status(frontend).models["m"].free == 1


def test_another_frontend_cannot_cancel_my_job(broker):
    peer = broker()
    worker, owner, stranger = peer("worker"), peer("frontend"), peer("frontend")
    ready(worker)
    wait_for_workers(owner, 1)
    submit(owner, "mine")
    assert worker.recv().id == "mine"
    stranger.send(p.Cancel(["mine"]))
    assert worker.recv(timeout=0.5) is None


def test_a_worker_error_reaches_the_client_as_sent_and_frees_the_slot(broker):
    peer = broker()
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker, slots=1)
    wait_for_workers(frontend, 1)
    submit(frontend, "j1")
    assert worker.recv().id == "j1"
    worker.send(p.Error("j1", p.ErrorCode.CONTEXT_LENGTH, "too long"))
    assert frontend.recv() == p.Error("j1", p.ErrorCode.CONTEXT_LENGTH, "too long")
    assert status(frontend).models["m"].free == 1


def test_a_model_is_forgotten_when_its_last_worker_leaves(broker):
    peer = broker()
    frontend = peer("frontend")
    for i in range(3):
        worker = peer("worker")
        ready(worker, model=f"model-{i}", worker_id=f"w{i}")
        wait_for_workers(frontend, 1)
        worker.send(p.Disconnect("bye"))
        wait_for_workers(frontend, 0)
    assert status(frontend).models == {}


def garbage(kind: str) -> list[list[bytes]]:
    """Frames no peer should send: not zmqchat, another version, broken msgpack, bodies that
    break the rules, and messages sent the wrong way."""
    submit_frames = p.encode(p.Submit(id="x", model="m", timeout=1.0, prompt="hi"))
    return [
        [b"GET / HTTP/1.1"],
        [b"ZMQCHAT/1", submit_frames[1], b"\x80"],
        [p.PROTOCOL, submit_frames[1], b"\xc1\xc1"],
        [p.PROTOCOL, submit_frames[1], msgspec.msgpack.encode({"id": ["not", "a", "string"], "model": 3})],
        [p.PROTOCOL, p.encode(p.Step([output("x")]))[1], msgspec.msgpack.encode({"outputs": [[]]})],
        p.encode(p.Step([output("nobody", "x", "stop")])),
        p.encode(p.Error("nobody", p.ErrorCode.ENGINE_ERROR, "x")),
        [p.PROTOCOL, p.encode(p.Cancel([]))[1], msgspec.msgpack.encode({"ids": 5})],
        [p.PROTOCOL, p.encode(p.Ready(worker_id="w", models=["m"], slots=1))[1],
         msgspec.msgpack.encode({"worker_id": "w", "models": [], "slots": -1})],
        p.encode(p.Ready(worker_id="w", models=["m"], slots=1) if kind == "frontend" else p.Status("s")),
    ]


def test_garbage_is_dropped_and_the_broker_keeps_serving(broker):
    peer = broker()
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker)
    wait_for_workers(frontend, 1)
    for sender, kind in ((worker, "worker"), (frontend, "frontend")):
        for frames in garbage(kind):
            sender.socket.send_multipart(frames)
    submit(frontend, "ok")
    assert worker.recv().id == "ok"
    assert len(status(frontend).workers) == 1
    assert peer.alive


def test_an_unknown_worker_is_asked_to_announce_itself(broker):
    peer = broker()
    stranger = peer("worker")
    stranger.send(p.Heartbeat())
    assert stranger.recv() == p.Disconnect("unknown worker")


BODIES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=16)
    | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "ids", "model", "timeout", "prompt", "messages", "params", "outputs", "code",
                         "message", "models", "slots", "worker_id", "token", "drain", "reason"]) | st.text(max_size=8),
        children, max_size=6),
    max_leaves=24,
)


# Longer than any model name the fuzz can make, so a stranger the fuzz turns into a worker never
# serves it.
FUZZED_MODEL = "the-model-of-the-fuzzed-broker"


@pytest.fixture(scope="module")
def fuzzed():
    """One broker, a worker with one slot, and a frontend, shared by every fuzz example. The fuzz
    tests bodies, not liveness: on a slow, busy machine a gap between examples outlasted the 3 s
    liveness and the broker rightly purged our worker, so here workers live 10 minutes."""
    running = Running(heartbeat_liveness=600)
    worker, frontend = running("worker"), running("frontend")
    ready(worker, slots=1, model=FUZZED_MODEL)
    wait_for_workers(frontend, 1)
    yield running, worker, frontend
    running.stop()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(p.COMMANDS)), body=BODIES, from_worker=st.booleans())
def test_any_body_of_any_command_from_either_side_harms_nothing(fuzzed, command, body, from_worker):
    running = fuzzed[0]
    sender = running("worker") if from_worker else running("frontend")  # a stranger: the fuzz is theirs
    sender.socket.send_multipart([p.PROTOCOL, command, msgspec.msgpack.encode(body)])
    sender.socket.close()


def test_after_the_fuzz_the_broker_is_alive_its_slot_free_and_a_request_succeeds(fuzzed):
    running, worker, frontend = fuzzed
    assert running.alive
    # Strangers the fuzz made workers may still be listed, but none serves our model.
    assert status(frontend).models[FUZZED_MODEL] == p.ModelStatus(workers=1, slots=1, free=1, queued=0)
    submit(frontend, "after-the-fuzz", model=FUZZED_MODEL)
    assert worker.recv(beat=True).id == "after-the-fuzz"
    worker.send(p.Step([output("after-the-fuzz", "fine", "stop")]))
    assert frontend.recv() == p.Step([output("after-the-fuzz", "fine", "stop")])


def test_queued_jobs_of_a_model_whose_last_worker_left_fail_after_the_grace(broker):
    peer = broker(no_worker_grace=1.0)
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker, slots=1)
    wait_for_workers(frontend, 1)
    for job_id in ("running", "queued-1", "queued-2"):
        submit(frontend, job_id)
    assert worker.recv().id == "running"
    worker.send(p.Disconnect("crashed"))  # "running" had no output: it is queued again too
    submit(frontend, "during-the-grace")  # a replacement may be starting: it waits with the rest
    errors = [frontend.recv(timeout=3.0, beat=True) for _ in range(4)]
    assert sorted(e.id for e in errors) == ["during-the-grace", "queued-1", "queued-2", "running"]
    assert {e.code for e in errors} == {p.ErrorCode.NO_WORKER}
    assert status(frontend).models == {}


def test_a_replacement_worker_within_the_grace_takes_the_queued_jobs(broker):
    peer = broker(no_worker_grace=5.0)
    old, frontend = peer("worker"), peer("frontend")
    ready(old, slots=1, worker_id="old")
    wait_for_workers(frontend, 1)
    submit(frontend, "j1")
    assert old.recv().id == "j1"
    old.send(p.Disconnect("crashed"))
    new = peer("worker")
    ready(new, slots=1, worker_id="new")
    assert new.recv().id == "j1"


def test_a_worker_holding_a_job_past_its_deadline_is_presumed_stuck(broker):
    peer = broker()
    stuck, frontend = peer("worker"), peer("frontend")
    ready(stuck, slots=4, worker_id="stuck")
    wait_for_workers(frontend, 1)
    submit(frontend, "forgotten", timeout=0.5)
    assert stuck.recv().id == "forgotten"
    error = frontend.recv(beat=False)
    assert (error.id, error.code) == ("forgotten", p.ErrorCode.TIMEOUT)
    assert stuck.recv(beat=True) == p.Cancel(["forgotten"])
    healthy = peer("worker")
    ready(healthy, slots=1, worker_id="healthy")
    wait_for_workers(frontend, 2)
    submit(frontend, "next")  # the stuck worker has more free slots, but gets nothing more
    assert healthy.recv(beat=True).id == "next"
    stuck.send(p.Step([output("forgotten", "", "cancelled", (1, 0))]))  # it proves it is alive
    healthy.send(p.Step([output("next", "ok", "stop")]))
    assert frontend.recv().outputs[0].id == "next"
    submit(frontend, "after")
    assert stuck.recv(beat=True).id == "after"


@pytest.mark.parametrize("args,refused", [
    (["--frontend", "tcp://0.0.0.0:{port}"], True),
    (["--backend", "tcp://*:{port}"], True),
    (["--backend", "tcp://*:{port}", "--insecure"], False),
    (["--frontend", "tcp://localhost:{port}"], False),
])
def test_a_broker_beyond_loopback_without_curve_needs_insecure(cluster, args, refused):
    part = cluster.spawn("broker", "broker", *[a.format(port=free_port()) for a in args])
    if refused:
        assert part.process.wait(timeout=30) != 0
        assert "refusing to expose the broker" in part.output()
    else:
        wait_for(lambda: "broker up" in part.output(), 30, "the broker to start")
        assert ("INSECURE" in part.output()) == ("--insecure" in args)


def test_a_message_over_the_size_limit_is_never_read(broker):
    peer = broker()
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker)
    wait_for_workers(frontend, 1)
    huge = p.Submit(id="huge", model="m", timeout=30.0, prompt="x" * (p.MAX_BODY_BYTES + 1))
    frontend.socket.send_multipart(p.encode(huge))  # the broker drops the connection, unread
    assert worker.recv(timeout=1.0, beat=True) is None
    submit(frontend, "small")  # the frontend's socket reconnects by itself
    assert worker.recv(beat=True).id == "small"
