"""Dispatch policies: which of the workers with a free slot gets the next job.

A policy is a pure object: it sees the candidates (workers serving the model that have at
least one free slot, sorted by worker_id) and returns one. No sockets, no clocks,
so each is unit-tested on its own. The broker keeps the counts a policy reads:
`slots` (capacity), `free` (slots not running a job) and `dispatched` (jobs sent so far).
"""

from __future__ import annotations

import random
from typing import Protocol, Sequence


class Candidate(Protocol):
    worker_id: str
    slots: int
    free: int
    dispatched: int


class ShortestQueue:
    """The worker with the most free slots; ties go to the one that got fewest jobs so far.

    FastChat's SHORTEST_QUEUE sends every tie to the first worker; breaking ties by the
    number of jobs dispatched spreads an idle cluster's work evenly instead.
    """

    name = "shortest-queue"

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        return max(candidates, key=lambda w: (w.free, -w.dispatched))


class Lottery:
    """A random worker, weighted by its capacity (FastChat's LOTTERY weights by speed)."""

    name = "lottery"

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        return self.rng.choices(candidates, weights=[w.slots for w in candidates])[0]


class RoundRobin:
    """Each worker in turn, skipping those with no free slot."""

    name = "round-robin"

    def __init__(self):
        self.last: str | None = None

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        chosen = next((w for w in candidates if self.last is not None and w.worker_id > self.last),
                      candidates[0])
        self.last = chosen.worker_id
        return chosen


class RandomChoice:
    """A uniformly random worker."""

    name = "random"

    def __init__(self, rng: random.Random | None = None):
        self.rng = rng or random.Random()

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        return self.rng.choice(candidates)


POLICIES = {p.name: p for p in (ShortestQueue, Lottery, RoundRobin, RandomChoice)}


def make_policy(name: str):
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
