import random
from collections import Counter
from dataclasses import dataclass

import pytest

from zmqchat.policy import POLICIES, Lottery, RandomChoice, RoundRobin, ShortestQueue, make_policy


@dataclass
class W:
    worker_id: str
    slots: int = 4
    free: int = 4
    dispatched: int = 0


def simulate(policy, workers, jobs):
    """Dispatch `jobs` jobs that never finish; how many each worker got."""
    got = Counter()
    for _ in range(jobs):
        candidates = [w for w in workers if w.free > 0]
        w = policy.pick(candidates)
        w.free -= 1
        w.dispatched += 1
        got[w.worker_id] += 1
    return got


def test_shortest_queue_prefers_most_free_slots():
    busy, idle = W("a", free=1), W("b", free=3)
    assert ShortestQueue().pick([busy, idle]) is idle


def test_shortest_queue_breaks_ties_fairly():
    # FastChat's SHORTEST_QUEUE sends every tie to the first worker; ours alternates.
    workers = [W("a", free=8, slots=8), W("b", free=8, slots=8)]
    picks = []
    for _ in range(6):
        w = ShortestQueue().pick(workers)
        w.dispatched += 1
        picks.append(w.worker_id)  # free stays: each job finishes at once
    assert picks == ["a", "b", "a", "b", "a", "b"]


def test_shortest_queue_fills_by_capacity():
    assert simulate(ShortestQueue(), [W("a", 2, 2), W("b", 6, 6)], 8) == {"a": 2, "b": 6}


def test_lottery_is_weighted_by_capacity():
    small, big = W("small", slots=1, free=1), W("big", slots=3, free=3)
    policy = Lottery(random.Random(7))
    got = Counter(policy.pick([small, big]).worker_id for _ in range(4000))
    assert 0.70 < got["big"] / 4000 < 0.80  # expected 0.75


def test_round_robin_cycles_and_skips_full_workers():
    a, b, c = W("a"), W("b"), W("c")
    policy = RoundRobin()
    assert [policy.pick([a, b, c]).worker_id for _ in range(4)] == ["a", "b", "c", "a"]
    # b is full: it is not a candidate, and the turn goes on to c.
    assert [policy.pick([a, c]).worker_id for _ in range(2)] == ["c", "a"]


def test_round_robin_survives_the_last_worker_leaving():
    policy = RoundRobin()
    policy.pick([W("a"), W("z")])
    policy.pick([W("a"), W("z")])  # last = z
    assert policy.pick([W("a"), W("b")]).worker_id == "a"


def test_random_reaches_every_worker_evenly():
    workers = [W("a"), W("b"), W("c")]
    policy = RandomChoice(random.Random(3))
    got = Counter(policy.pick(workers).worker_id for _ in range(3000))
    assert set(got) == {"a", "b", "c"} and min(got.values()) > 850


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_only_picks_a_candidate(name):
    policy = make_policy(name)
    candidates = [W("a", free=1), W("b", free=2)]
    for _ in range(20):
        assert policy.pick(candidates) in candidates


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="shortest-queue"):
        make_policy("fastest")
