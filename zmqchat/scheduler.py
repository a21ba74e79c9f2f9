"""The engine's scheduler: which sequences run in the next step. Pure: no torch, no I/O.

Sequences wait in arrival order and join the running batch at any step while the batch has
room: at most `max_batch` sequences, and a padded KV cache that stays within `max_tokens`
even if every running sequence reaches its max_tokens. The batch is padded to its longest
sequence, so its worst case is len(batch) x the largest (prompt + max_tokens) in it.
Admission is first come, first served: a big request at the head is never starved by small
ones behind it.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class Schedulable(Protocol):
    reserved_tokens: int  # prompt tokens + the most tokens it may generate


class Scheduler:
    def __init__(self, max_batch: int, max_tokens: int):
        self.max_batch = max_batch
        self.max_tokens = max_tokens
        self.waiting: deque[Schedulable] = deque()
        self.running: list[Schedulable] = []

    def fits_alone(self, seq: Schedulable) -> bool:
        return seq.reserved_tokens <= self.max_tokens

    def add(self, seq: Schedulable) -> None:
        self.waiting.append(seq)

    def schedule(self) -> list[Schedulable]:
        """Move the sequences that fit from waiting to running; return them."""
        admitted = []
        widest = max((s.reserved_tokens for s in self.running), default=0)
        while self.waiting and len(self.running) < self.max_batch:
            head = self.waiting[0]
            wider = max(widest, head.reserved_tokens)
            if (len(self.running) + 1) * wider > self.max_tokens:
                break
            widest = wider
            self.running.append(self.waiting.popleft())
            admitted.append(head)
        return admitted

    def remove(self, seq: Schedulable) -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)
