"""Which sequences run in the next step. Pure: no torch, no I/O.

The scheduler is the one owner of batch membership: the waiting queue, the running batch (in
the order of the runner's KV-cache rows) and the index of every sequence by id. The engine
adds and removes sequences; `schedule()` returns the next step's Batch, which the runner
applies to its cache as it is: it drops the rows not kept, decodes the kept ones, prefills
the new ones and appends their rows, and returns one token per sequence in the batch's order.

Sequences wait in arrival order and join at any step while the batch has room: at most
`max_batch` sequences, and a padded KV cache that stays within `max_tokens` even if every
running sequence reaches its max_tokens. The batch is padded to its longest sequence, so its
worst case is len(batch) x the largest (prompt + max_tokens) in it. Admission is first come,
first served: a big request at the head is never starved by small ones behind it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    id: str
    reserved_tokens: int  # prompt tokens + the most tokens it may generate


S = TypeVar("S", bound=Schedulable)


@dataclass(frozen=True)
class Batch(Generic[S]):
    """One step's batch, in cache row order: the last step's rows in `kept`, then `new`."""

    sequences: list[S]
    kept: list[int]  # rows of the last step's batch that stay, in order
    new: list[S]  # admitted this step: to prefill

    @property
    def decoding(self) -> list[S]:
        """The sequences of the kept rows, which have tokens to decode."""
        return self.sequences[:len(self.kept)]


class Scheduler(Generic[S]):
    def __init__(self, max_batch: int, max_tokens: int):
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.waiting: deque[S] = deque()
        self.running: list[S] = []  # in cache row order
        self.by_id: dict[str, S] = {}  # every sequence, waiting or running
        self.rows: list[S] = []  # the last batch scheduled: what the runner's cache holds

    def fits_alone(self, seq: S) -> bool:
        return seq.reserved_tokens <= self.max_tokens

    def add(self, seq: S) -> None:
        self.by_id[seq.id] = seq
        self.waiting.append(seq)

    def remove(self, seq: S) -> None:
        """`seq` leaves: from the queue, or from the batch (its row goes at the next step)."""
        del self.by_id[seq.id]
        if seq in self.waiting:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)

    def get(self, seq_id: str) -> S | None:
        return self.by_id.get(seq_id)

    def schedule(self) -> Batch[S]:
        """The next step's batch: the running sequences, and those waiting that now fit."""
        kept = [i for i, seq in enumerate(self.rows) if self.by_id.get(seq.id) is seq]
        new = []
        widest = max((s.reserved_tokens for s in self.running), default=0)
        while self.waiting and len(self.running) < self.max_batch:
            wider = max(widest, self.waiting[0].reserved_tokens)
            if (len(self.running) + 1) * wider > self.max_tokens:
                break
            widest = wider
            new.append(self.waiting.popleft())
            self.running.append(new[-1])
        self.rows = list(self.running)
        return Batch(self.rows, kept, new)

    def __len__(self) -> int:
        return len(self.by_id)
