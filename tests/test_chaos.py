"""Chaos: real processes on loopback under load while workers die, the broker restarts, a
link is cut, queues fill and parts are drained. Every request must end, with its answer or a
clear error, within its deadline; none may be lost or answered twice.

Run with -s to see the counts (the README's reliability section quotes them).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass

import httpx
from conftest import Relay, chat, wait_for

DEADLINE = 20.0  # the API's --timeout in these tests
WORDS = " ".join(f"w{i}" for i in range(8))


@dataclass
class Outcome:
    index: int
    status: int  # 0: the request raised (a hang cut by the client's own timeout, a reset)
    content: str
    error: str
    started: float
    ended: float
    retry_after: str | None = None


async def load(url: str, requests: int, concurrency: int, words: str = WORDS, pace: float = 0.0) -> list[Outcome]:
    """`requests` chat requests at `concurrency`; request i says "req-i <words>"."""
    outcomes: list[Outcome] = []
    next_index = 0

    async def user(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < requests:
            i = next_index
            next_index += 1
            started = time.monotonic()
            try:
                response = await client.post("/v1/chat/completions", json=chat(content=f"req-{i} {words}"))
                body = response.json()
                content = body["choices"][0]["message"]["content"] if response.status_code == 200 else ""
                error = body.get("error", {}).get("message", "") if response.status_code != 200 else ""
                outcomes.append(Outcome(i, response.status_code, content, error, started, time.monotonic(),
                                        response.headers.get("retry-after")))
            except (httpx.HTTPError, ValueError) as exc:
                outcomes.append(Outcome(i, 0, "", repr(exc), started, time.monotonic()))
            await asyncio.sleep(pace)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE + 10, limits=limits) as client:
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
    return outcomes


def tally(name: str, outcomes: list[Outcome], requests: int) -> Counter:
    """Check the invariants every chaos test shares, print the counts and return them."""
    by_index = Counter(o.index for o in outcomes)
    counts = Counter(
        completed=sum(o.status == 200 for o in outcomes),
        failed_clearly=sum(o.status >= 400 and bool(o.error) for o in outcomes),
        lost=requests - len(by_index) + sum(o.status == 0 for o in outcomes),
        duplicated=sum(n - 1 for n in by_index.values())
        + sum(o.status == 200 and o.content != f"req-{o.index} {WORDS}" for o in outcomes),
    )
    slowest = max(o.ended - o.started for o in outcomes)
    statuses = dict(Counter(o.status for o in outcomes))
    print(f"\n{name}: {requests} requests: {dict(counts)}; statuses {statuses}; slowest {slowest:.1f} s")
    assert counts["lost"] == 0 and counts["duplicated"] == 0, [o for o in outcomes if o.status in (0,)][:3]
    assert counts["completed"] + counts["failed_clearly"] == requests
    assert slowest < DEADLINE + 2
    return counts


def api_args() -> tuple[str, ...]:
    return ("--timeout", str(DEADLINE))


def test_2000_requests_at_concurrency_64_none_lost_none_duplicated(cluster):
    cluster.broker()
    cluster.worker("--fake-delay", "0.005", "--max-batch", "32")
    cluster.worker("--fake-delay", "0.005", "--max-batch", "32")
    cluster.api(*api_args())
    outcomes = asyncio.run(load(cluster.url, 2000, 64))
    counts = tally("load", outcomes, 2000)
    assert counts["completed"] == 2000


def test_worker_killed_mid_load_every_request_ends(cluster):
    cluster.broker()
    doomed = cluster.worker("--fake-delay", "0.05", "--max-batch", "4")
    cluster.worker("--fake-delay", "0.05", "--max-batch", "4")
    cluster.api(*api_args())
    killer = threading.Timer(1.5, doomed.process.kill)  # SIGKILL: no goodbye
    killer.start()
    outcomes = asyncio.run(load(cluster.url, 80, 16))
    killer.join()
    counts = tally("kill -9 a worker", outcomes, 80)
    # Only the jobs the dead worker was streaming fail (it had 4 slots); the rest, those
    # it had not started included, complete on the survivor.
    assert counts["failed_clearly"] <= 4
    assert {o.status for o in outcomes} <= {200, 502}
    assert len(cluster.workers()) == 1


def test_broker_restart_mid_load_service_resumes_by_itself(cluster):
    broker = cluster.broker()
    cluster.worker("--fake-delay", "0.02")
    cluster.api(*api_args())
    restarted_at = []

    def restart():
        broker.process.kill()
        time.sleep(1.0)
        restarted_at.append(time.monotonic())
        cluster.broker()

    threading.Timer(1.0, restart).start()
    outcomes = asyncio.run(load(cluster.url, 150, 4, pace=0.05))
    counts = tally("broker restart", outcomes, 150)
    assert {o.status for o in outcomes} <= {200, 502, 503}
    after = [o for o in outcomes if o.started > restarted_at[0] + 8]
    assert after and all(o.status == 200 for o in after), "service did not resume by itself"
    assert counts["completed"] >= len(after)


def test_partition_between_broker_and_a_worker_is_detected_and_heals(cluster):
    cluster.broker()
    relay = Relay(int(cluster.backend.rsplit(":", 1)[1]))
    try:
        cluster.spawn("worker", "worker", "--fake", "--fake-delay", "0.05", "--max-batch", "4",
                      "--broker", f"tcp://127.0.0.1:{relay.port}")
        wait_for(lambda: len(cluster.workers()) == 1, 30, "the relayed worker")
        cluster.worker("--fake-delay", "0.05", "--max-batch", "4")
        cluster.api(*api_args())
        cut_at = []

        def cut():
            relay.forwarding = False
            cut_at.append(time.monotonic())

        threading.Timer(1.0, cut).start()
        outcomes = asyncio.run(load(cluster.url, 80, 16))
        detected = time.monotonic() - cut_at[0]
        counts = tally("partition", outcomes, 80)
        assert len(cluster.workers()) == 1, "the cut-off worker is still counted"
        assert counts["failed_clearly"] <= 4  # only what the cut-off worker was streaming
        relay.forwarding = True
        healed = time.monotonic()
        wait_for(lambda: len(cluster.workers()) == 2, 20, "the partitioned worker to come back")
        print(f"partition: load finished {detected:.1f} s after the cut; rejoined {time.monotonic() - healed:.1f} s "
              "after the heal")
        done = lambda: sorted(w["done"] for w in cluster.workers())  # noqa: E731
        before = done()
        asyncio.run(load(cluster.url, 40, 8))
        assert all(after > was for after, was in zip(done(), before)), "capacity did not return"
    finally:
        relay.close()


def test_partition_between_api_and_broker_fails_fast_and_heals(cluster):
    cluster.broker()
    cluster.worker("--fake-delay", "0.2", "--max-batch", "8")
    relay = Relay(int(cluster.frontend.rsplit(":", 1)[1]))
    try:
        cluster.api(*api_args(), broker=f"tcp://127.0.0.1:{relay.port}")
        long_words = " ".join(f"x{i}" for i in range(100))  # 20 s of output: still running at the cut
        threading.Timer(1.0, setattr, args=(relay, "forwarding", False)).start()
        cut = asyncio.run(load(cluster.url, 4, 4, words=long_words))
        assert all(o.status == 503 and o.ended - o.started < 8 for o in cut), cut
        started = time.monotonic()
        refused = httpx.post(f"{cluster.url}/v1/chat/completions", json=chat(), timeout=10)
        assert refused.status_code == 503 and time.monotonic() - started < 1.0
        # The broker cancels the jobs of the frontend it no longer hears: the slots come back.
        wait_for(lambda: cluster.status()["models"]["fake"]["free"] == 8, 20, "the orphaned jobs' slots")
        relay.forwarding = True
        wait_for(lambda: httpx.get(f"{cluster.url}/health").json()["status"] == "ok", 10, "the API to hear the broker")
        healed = asyncio.run(load(cluster.url, 20, 4))
        tally("partition API-broker, after the heal", healed, 20)
        assert all(o.status == 200 for o in healed)
    finally:
        relay.close()


def test_full_queue_gets_503_with_retry_after(cluster):
    cluster.broker("--max-queue", "2")
    cluster.worker("--fake-delay", "0.2", "--max-batch", "1")
    cluster.api(*api_args())
    outcomes = asyncio.run(load(cluster.url, 12, 12))  # one runs, two wait, the rest are refused
    refused = [o for o in outcomes if o.status == 503]
    assert len(refused) >= 6 and sum(o.status == 200 for o in outcomes) >= 3
    assert all("queue" in o.error and int(o.retry_after) >= 1 for o in refused)


def test_sigterm_drains_a_worker_without_failing_its_requests(cluster):
    cluster.broker()
    draining = cluster.worker("--fake-delay", "0.05", "--max-batch", "4")
    cluster.worker("--fake-delay", "0.05", "--max-batch", "4")
    cluster.api(*api_args())
    threading.Timer(1.0, draining.process.send_signal, args=(signal.SIGTERM,)).start()
    outcomes = asyncio.run(load(cluster.url, 60, 8))
    counts = tally("drain a worker", outcomes, 60)
    assert counts["completed"] == 60
    assert draining.process.wait(10) == 0
    assert "drain" in draining.output()


def test_sigterm_on_the_api_lets_open_streams_finish(cluster):
    cluster.broker()
    cluster.worker("--fake-delay", "0.1")
    api = cluster.api(*api_args())
    words = " ".join(f"s{i}" for i in range(20))  # 2 s of streaming
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=chat(content=words, stream=True)) as response:
            lines = response.iter_lines()
            next(lines)
            api.process.send_signal(signal.SIGTERM)
            rest = list(lines)
    assert "data: [DONE]" in rest
    # uvicorn re-raises the SIGTERM once its graceful shutdown is done.
    assert api.process.wait(10) in (0, -signal.SIGTERM)
    assert "Finished server process" in api.output()
