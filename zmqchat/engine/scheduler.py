"""Which tokens run in the next step. Pure: no torch, no I/O.

The scheduler is the one owner of batch membership: the waiting queue, the running sequences
and the index of every sequence by id, and through its BlockManager, of the KV cache's blocks.
The engine adds and removes sequences; `schedule()` returns the next step's Batch: a Chunk of
tokens per sequence to run through the model, and after the runner has run it, `computed()`
notes that their KV is in the cache.

Chunked prefill with a per-step token budget (`step_tokens`, vLLM's max_num_batched_tokens):
every sequence past its prompt decodes its one token each step, and the budget's remainder
goes to prompts, in arrival order, a chunk at a time; so a long prompt arriving never stalls
the streams for longer than one step of the budget. Sequences wait in arrival order and join
while there is a slot (`max_batch`) and the cache holds all they may need: a big request at
the head is never overtaken by small ones behind it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from zmqchat.engine.kv_cache import BlockManager, Cached


class Schedulable(Cached, Protocol):
    id: str
    wants_prompt_logprobs: bool  # scores every prompt token: nothing of its prompt may come from the cache

    @property
    def num_tokens(self) -> int: ...  # prompt and output so far


S = TypeVar("S", bound=Schedulable)


@dataclass(frozen=True)
class Chunk(Generic[S]):
    """Tokens [start, end) of a sequence, to run through the model this step."""

    seq: S
    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start

    @property
    def samples(self) -> bool:
        """It reaches the sequence's last token, so the step gives the sequence its next one."""
        return self.end == self.seq.num_tokens


@dataclass(frozen=True)
class Batch(Generic[S]):
    chunks: list[Chunk[S]]

    @property
    def sequences(self) -> list[S]:
        """Those getting a token this step, in the batch's order."""
        return [chunk.seq for chunk in self.chunks if chunk.samples]


class Scheduler(Generic[S]):
    def __init__(self, max_batch: int, blocks: BlockManager, step_tokens: int):
        self.max_batch = max_batch
        self.blocks = blocks
        self.step_tokens = step_tokens
        self.waiting: deque[S] = deque()
        self.running: list[S] = []  # in arrival order
        self.by_id: dict[str, S] = {}  # every sequence, waiting or running

    @property
    def max_tokens(self) -> int:
        """The most tokens one sequence may hold: the whole cache."""
        return self.blocks.usable_blocks * self.blocks.block_size

    def fits_alone(self, seq: S) -> bool:
        return seq.reserved_tokens <= self.max_tokens

    def add(self, seq: S) -> None:
        self.by_id[seq.id] = seq
        self.waiting.append(seq)

    def remove(self, seq: S) -> None:
        """`seq` leaves: from the queue, or from the batch, freeing its blocks."""
        del self.by_id[seq.id]
        if seq in self.waiting:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
            self.blocks.release(seq)

    def get(self, seq_id: str) -> S | None:
        return self.by_id.get(seq_id)

    def schedule(self) -> Batch[S]:
        """The next step: a token for each decoding sequence, then prompt chunks within the budget."""
        decoding = [s for s in self.running if s.computed_tokens >= len(s.prompt_ids)]
        chunks = []
        for seq in decoding:
            self.blocks.grow(seq, seq.num_tokens)
            chunks.append(Chunk(seq, seq.num_tokens - 1, seq.num_tokens))
        # Prompts always get some room, however many sequences decode.
        budget = max(self.step_tokens - len(decoding), self.blocks.block_size)
        for seq in self.running:
            if budget and seq.computed_tokens < len(seq.prompt_ids):
                chunks.append(self._prompt_chunk(seq, budget))
                budget -= len(chunks[-1])
        while budget and self.waiting and len(self.running) < self.max_batch and self._admit(self.waiting[0]):
            seq = self.waiting.popleft()
            self.running.append(seq)
            chunks.append(self._prompt_chunk(seq, budget))
            budget -= len(chunks[-1])
        return Batch(chunks)

    def computed(self, batch: Batch[S]) -> None:
        """The runner ran `batch`: its chunks' KV is in the cache."""
        for chunk in batch.chunks:
            self.blocks.computed(chunk.seq, chunk.end)

    def _admit(self, seq: S) -> bool:
        return self.blocks.admit(seq, reuse=not seq.wants_prompt_logprobs)

    @staticmethod
    def _prompt_chunk(seq: S, budget: int) -> Chunk[S]:
        return Chunk(seq, seq.computed_tokens, min(len(seq.prompt_ids), seq.computed_tokens + budget))

    def __len__(self) -> int:
        return len(self.by_id)
