"""The broker as a real process, driven over real sockets by test peers speaking the protocol."""

from __future__ import annotations

import time

import pytest
import zmq

from zmqchat import protocol as p

RECV_TIMEOUT = 5.0


class Peer:
    """A DEALER speaking zmqchat, standing in for a worker or a frontend."""

    def __init__(self, address: str):
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def send(self, command: bytes, body) -> None:
        self.socket.send_multipart(p.encode(command, body))

    def recv(self, timeout: float = RECV_TIMEOUT, skip=(p.HEARTBEAT,), beat: bool = False):
        """The next message not in `skip`; with `beat`, heartbeat while waiting, as a live worker does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if beat:
                self.send(p.HEARTBEAT, {})
            if self.socket.poll(200):
                command, body = p.decode(self.socket.recv_multipart())
                if command not in skip:
                    return command, body
        return None

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def broker(cluster):
    def start(*args):
        cluster.broker(*args)
        peers = []

        def peer(kind: str) -> Peer:
            peers.append(Peer(cluster.frontend if kind == "frontend" else cluster.backend))
            return peers[-1]
        peer.cluster = cluster
        return peer
    return start


def ready(worker: Peer, slots: int = 2, model: str = "m", worker_id: str = "w") -> None:
    worker.send(p.READY, {"worker_id": worker_id, "models": [model], "slots": slots, "host": "h", "device": "cpu"})
    worker.send(p.HEARTBEAT, {})


def submit(frontend: Peer, job_id: str, model: str = "m", timeout: float = 30.0) -> None:
    frontend.send(p.SUBMIT, {"id": job_id, "model": model, "timeout": timeout,
                             "messages": [{"role": "user", "content": "hi"}], "params": {}})


def status(frontend: Peer) -> dict:
    frontend.send(p.STATUS, {"token": "s"})
    return frontend.recv()[1]


def wait_for_workers(frontend: Peer, n: int) -> dict:
    deadline = time.monotonic() + RECV_TIMEOUT
    while time.monotonic() < deadline:
        report = status(frontend)
        if len(report["workers"]) == n:
            return report
        time.sleep(0.05)
    raise AssertionError(f"expected {n} workers, status says {report}")


def test_chunks_go_back_to_the_frontend_that_submitted(broker):
    peer = broker()
    worker, alice, bob = peer("worker"), peer("frontend"), peer("frontend")
    ready(worker)
    wait_for_workers(alice, 1)
    submit(alice, "a1")
    submit(bob, "b1")
    got = {worker.recv()[1]["id"], worker.recv()[1]["id"]}
    assert got == {"a1", "b1"}
    # One CHUNK for the whole engine step is split by frontend.
    worker.send(p.CHUNK, [["a1", "for alice"], ["b1", "for bob"]])
    assert alice.recv() == (p.CHUNK, [["a1", "for alice"]])
    assert bob.recv() == (p.CHUNK, [["b1", "for bob"]])
    worker.send(p.DONE, [["b1", "!", "stop", 3, 2], ["a1", "", "length", 3, 9]])
    assert alice.recv() == (p.DONE, [["a1", "", "length", 3, 9]])
    assert bob.recv() == (p.DONE, [["b1", "!", "stop", 3, 2]])
    report = status(alice)
    assert report["models"]["m"] == {"workers": 1, "slots": 2, "free": 2, "queued": 0}
    assert report["workers"][0]["done"] == 2


def test_jobs_wait_for_a_free_slot(broker):
    peer = broker()
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker, slots=1)
    wait_for_workers(frontend, 1)
    submit(frontend, "j1")
    submit(frontend, "j2")
    assert worker.recv()[1]["id"] == "j1"
    assert worker.recv(timeout=0.5) is None  # no credit left: j2 waits in the broker
    assert status(frontend)["models"]["m"]["queued"] == 1
    worker.send(p.DONE, [["j1", "x", "stop", 1, 1]])
    assert frontend.recv()[0] == p.DONE
    assert worker.recv()[1]["id"] == "j2"


def test_unknown_model_is_404_and_no_worker_is_503(broker):
    peer = broker()
    frontend = peer("frontend")
    submit(frontend, "j1")
    command, body = frontend.recv()
    assert command == p.ERROR and body["status"] == 503 and body["id"] == "j1"
    worker = peer("worker")
    ready(worker, model="served")
    wait_for_workers(frontend, 1)
    submit(frontend, "j2", model="other")
    command, body = frontend.recv()
    assert (command, body["status"], body["type"]) == (p.ERROR, 404, "model_not_found")
    assert "served" in body["message"]


def test_a_full_queue_refuses_with_503(broker):
    peer = broker("--max-queue", "1")
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker, slots=1)
    wait_for_workers(frontend, 1)
    for job_id in ("running", "queued", "refused"):
        submit(frontend, job_id)
    command, body = frontend.recv()
    assert (command, body["id"], body["status"], body["type"]) == (p.ERROR, "refused", 503, "overloaded")


def test_queued_job_past_its_deadline_gets_504(broker):
    peer = broker()
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker, slots=1)
    wait_for_workers(frontend, 1)
    submit(frontend, "long")
    submit(frontend, "short", timeout=0.5)
    command, body = frontend.recv(beat=False)
    assert (command, body["id"], body["status"]) == (p.ERROR, "short", 504)


def test_dead_worker_is_removed_and_its_unstarted_jobs_rerun_elsewhere(broker):
    peer = broker()
    doomed, frontend = peer("worker"), peer("frontend")
    ready(doomed, slots=2, worker_id="doomed")
    wait_for_workers(frontend, 1)
    submit(frontend, "streaming")
    submit(frontend, "not-started")
    assert {doomed.recv()[1]["id"], doomed.recv()[1]["id"]} == {"streaming", "not-started"}
    doomed.send(p.CHUNK, [["streaming", "partial"]])
    assert frontend.recv()[0] == p.CHUNK
    survivor = peer("worker")
    ready(survivor, slots=2, worker_id="survivor")
    wait_for_workers(frontend, 2)
    silent_since = time.monotonic()  # `doomed` never speaks again
    command, body = survivor.recv(timeout=8.0, beat=True)
    detected = time.monotonic() - silent_since
    assert (command, body["id"]) == (p.SUBMIT, "not-started")
    assert detected < 5.0, f"took {detected:.1f} s to notice the dead worker"
    command, body = frontend.recv()
    assert (command, body["id"], body["status"]) == (p.ERROR, "streaming", 502)
    # Output from the dead worker that arrives late is dropped, never delivered twice.
    doomed.send(p.CHUNK, [["not-started", "stale"]])
    survivor.send(p.DONE, [["not-started", "fresh", "stop", 1, 1]])
    assert frontend.recv() == (p.DONE, [["not-started", "fresh", "stop", 1, 1]])
    assert [w["worker_id"] for w in status(frontend)["workers"]] == ["survivor"]


def test_cancel_reaches_the_worker_and_frees_the_slot(broker):
    peer = broker()
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker, slots=1)
    wait_for_workers(frontend, 1)
    submit(frontend, "running")
    submit(frontend, "queued")
    assert worker.recv()[1]["id"] == "running"
    frontend.send(p.CANCEL, {"ids": ["queued", "running"]})
    assert worker.recv() == (p.CANCEL, {"ids": ["running"]})
    assert status(frontend)["models"]["m"] == {"workers": 1, "slots": 1, "free": 0, "queued": 0}
    worker.send(p.DONE, [["running", "", "cancelled", 1, 0]])
    assert frontend.recv(timeout=0.5, skip=(p.HEARTBEAT, p.STATUS)) is None  # the client is gone
    assert status(frontend)["models"]["m"]["free"] == 1


def test_another_frontend_cannot_cancel_my_job(broker):
    peer = broker()
    worker, owner, stranger = peer("worker"), peer("frontend"), peer("frontend")
    ready(worker)
    wait_for_workers(owner, 1)
    submit(owner, "mine")
    assert worker.recv()[1]["id"] == "mine"
    stranger.send(p.CANCEL, {"ids": ["mine"]})
    assert worker.recv(timeout=0.5) is None


def test_garbage_is_dropped_and_the_broker_keeps_serving(broker):
    peer = broker()
    worker, frontend = peer("worker"), peer("frontend")
    ready(worker)
    wait_for_workers(frontend, 1)
    for sock in (worker.socket, frontend.socket):
        sock.send_multipart([b"GET / HTTP/1.1"])
        sock.send_multipart([b"ZMQCHAT/0", p.SUBMIT, b"\x80"])
        sock.send_multipart([p.PROTOCOL, p.SUBMIT, b"\xc1\xc1"])
        sock.send_multipart(p.encode(p.SUBMIT, {"id": ["not", "a", "string"], "model": 3, "timeout": "x"}))
        sock.send_multipart(p.encode(p.SUBMIT, {}))
        sock.send_multipart(p.encode(p.CHUNK, [[["unhashable"], "x"], [], 7]))
        sock.send_multipart(p.encode(p.DONE, [["nobody", "x", "stop", 1, 1]]))
        sock.send_multipart(p.encode(p.CANCEL, {"ids": 5}))
        sock.send_multipart(p.encode(p.READY, {"models": [], "slots": -1}))
    submit(frontend, "ok")
    assert worker.recv()[1]["id"] == "ok"
    assert len(status(frontend)["workers"]) == 1
    assert peer.cluster.parts[0].process.poll() is None


def test_an_unknown_worker_is_asked_to_announce_itself(broker):
    peer = broker()
    stranger = peer("worker")
    stranger.send(p.HEARTBEAT, {})
    assert stranger.recv() == (p.DISCONNECT, {"reason": "unknown worker"})
