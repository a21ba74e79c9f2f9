"""CURVE on the cluster's links: who may join, in which role, revocation without a restart,
the secret keys' permissions, and what an eavesdropper sees."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
from conftest import Relay, chat, wait_for

from zmqchat.curve import admit, create_keys


@pytest.fixture
def keys(tmp_path):
    """The broker's folder: its own pair and the pairs of the parts it admits, each in its role."""
    folder = tmp_path / "keys"
    for name, role in (("broker", None), ("worker", "worker"), ("api", "frontend"), ("status", "frontend")):
        create_keys(name, folder, role)
    return folder


def curve(folder, name) -> tuple[str, ...]:
    return ("--curve", str(folder), "--curve-name", name)


def test_only_workers_with_admitted_keys_get_jobs(cluster, keys, tmp_path):
    strangers = tmp_path / "strangers"
    create_keys("intruder", strangers)
    shutil.copy(keys / "broker.key", strangers / "broker.key")  # it knows the broker's public key
    cluster.broker("--curve", str(keys))
    intruder = cluster.spawn("worker", "worker", "--fake", "--broker", cluster.backend, "--log-level", "debug",
                             *curve(strangers, "intruder"))
    plaintext = cluster.spawn("worker", "worker", "--fake", "--broker", cluster.backend, "--log-level", "debug")
    cluster.worker(*curve(keys, "worker"), wait=False)
    cluster.api(*curve(keys, "api"))
    status = lambda: httpx.get(f"{cluster.url}/v1/models").json()["data"]  # noqa: E731
    wait_for(lambda: status(), 30, "the admitted worker")
    for i in range(10):
        body = httpx.post(f"{cluster.url}/v1/chat/completions", json=chat(content=f"job {i}"), timeout=10).json()
        assert body["choices"][0]["message"]["content"] == f"job {i}"
    for stranger in (intruder, plaintext):
        assert stranger.process.poll() is None  # still trying, never let in
        assert "accepted" not in stranger.output()
    assert "refused this worker's handshake" in intruder.output()  # it says why
    assert "CURVE on" in cluster.parts[0].output()
    for stranger in (intruder, plaintext):  # and, refused, it still stops at once on SIGTERM
        started = time.monotonic()
        assert stranger.stop(signal.SIGTERM, timeout=10) == 0
        assert time.monotonic() - started < 5


def test_a_frontend_key_cannot_join_as_a_worker_nor_a_worker_key_ask_status(cluster, keys):
    cluster.broker("--curve", str(keys))
    impostor = cluster.spawn("worker", "worker", "--fake", "--broker", cluster.backend, *curve(keys, "api"))
    cluster.worker(*curve(keys, "worker"), wait=False)
    cluster.api(*curve(keys, "api"))
    wait_for(lambda: httpx.get(f"{cluster.url}/v1/models").json()["data"], 30, "the admitted worker")
    time.sleep(2)  # time enough for the impostor to have joined, were it let in
    assert len(status_as(cluster, keys, "status")["workers"]) == 1
    assert "refused this worker's handshake" in impostor.output()
    with pytest.raises(subprocess.CalledProcessError):
        status_as(cluster, keys, "worker")


def status_as(cluster, keys, name: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-m", "zmqchat", "status", "--json", "--broker", cluster.frontend,
                          *curve(keys, name)], capture_output=True, text=True, timeout=30, check=True).stdout
    return json.loads(out)


def test_keys_are_admitted_and_revoked_without_a_restart(cluster, keys):
    create_keys("late", keys)  # its pair, not yet admitted
    cluster.broker("--curve", str(keys))
    cluster.api(*curve(keys, "api"))
    late = cluster.spawn("worker", "worker", "--fake", "--broker", cluster.backend, *curve(keys, "late"))
    workers = lambda: status_as(cluster, keys, "status")["workers"]  # noqa: E731
    wait_for(lambda: "refused this worker's handshake" in late.output(), 20, "the refusal")
    assert workers() == []
    admit(keys / "late.key", keys, "worker")
    wait_for(workers, 20, "the newly admitted worker to join")
    body = httpx.post(f"{cluster.url}/v1/chat/completions", json=chat(content="let in"), timeout=10).json()
    assert body["choices"][0]["message"]["content"] == "let in"
    (keys / "workers" / "late.key").unlink()
    wait_for(lambda: not workers(), 20, "the revoked worker to be dropped")
    response = httpx.post(f"{cluster.url}/v1/chat/completions", json=chat(), timeout=10)
    assert response.status_code == 503  # no worker: the revoked one gets no more prompts


def test_secret_keys_are_private_and_others_readable_ones_refused(cluster, keys):
    assert oct(keys.stat().st_mode & 0o777) == "0o700"
    assert oct((keys / "worker.key_secret").stat().st_mode & 0o777) == "0o600"
    (keys / "worker.key_secret").chmod(0o644)
    cluster.broker("--curve", str(keys))
    worker = cluster.spawn("worker", "worker", "--fake", "--broker", cluster.backend, *curve(keys, "worker"))
    assert worker.process.wait(timeout=60) != 0
    assert "can be read by others" in worker.output()


def test_a_frontend_without_an_admitted_key_is_refused(cluster, keys):
    cluster.broker("--curve", str(keys))
    cluster.worker(*curve(keys, "worker"), wait=False)
    cluster.api()  # plaintext: the broker never answers it
    response = httpx.post(f"{cluster.url}/v1/chat/completions", json=chat(), timeout=10)
    assert response.status_code == 503


@pytest.mark.parametrize("encrypted", [True, False])
def test_what_crosses_the_wire(cluster, keys, encrypted):
    secret = "zebra-secret-4217"
    cluster.broker(*(("--curve", str(keys)) if encrypted else ()))
    cluster.worker(*(curve(keys, "worker") if encrypted else ()), wait=False)
    relay = Relay(int(cluster.frontend.rsplit(":", 1)[1]))
    try:
        cluster.api(*(curve(keys, "api") if encrypted else ()), broker=f"tcp://127.0.0.1:{relay.port}")
        wait_for(lambda: httpx.get(f"{cluster.url}/v1/models", timeout=5).status_code == 200, 30, "the cluster")
        wait_for(lambda: httpx.get(f"{cluster.url}/v1/models").json()["data"], 30, "the worker")
        body = httpx.post(f"{cluster.url}/v1/chat/completions", json=chat(content=secret), timeout=10).json()
        assert body["choices"][0]["message"]["content"] == secret
        assert len(relay.captured) > 0
        assert (secret.encode() in relay.captured) is not encrypted
    finally:
        relay.close()


def test_keys_command_writes_a_pair(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "zmqchat", "keys", "worker7", "--dir", str(tmp_path)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert (tmp_path / "worker7.key").exists() and (tmp_path / "worker7.key_secret").exists()
    assert "secret key" in out
