"""Embedding jobs in the engine: which inputs run each step, and their vectors as sent. Pure:
no torch, no I/O.

The engine turns a protocol.Submit with `embed` into an EmbedJob (its inputs tokenised, on the
worker's preparing thread) and queues it. Each step, `take_inputs()` picks the inputs to embed,
in arrival order across the queued jobs, within a budget of padded tokens so that a large
request never stalls the running decodes for long; the runner embeds them in one forward pass
and `packed()` turns each vector into what the wire carries: cut to the job's dimensions,
normalised to unit length, as little-endian float32. A job leaves once all its inputs have.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

# Padded tokens (inputs x the longest of them) one step embeds at most: what a prefill of one long
# prompt costs, so that the decodes stall no longer for it (about 2 s on two CPU cores, a few ms
# on a GPU); an input longer than this runs alone.
EMBED_TOKENS_PER_STEP = 512
# Bytes of vectors one step sends at most: a quarter of a frame, the rest of the STEP left to text.
EMBED_BYTES_PER_STEP = 2 * 1024 * 1024


@dataclass(eq=False)
class EmbedJob:
    id: str
    inputs: list[list[int]]  # each input's tokens
    dimensions: int | None  # None: the model's own size
    done: int = 0  # inputs embedded so far (they leave in order)

    @property
    def prompt_tokens(self) -> int:
        return sum(map(len, self.inputs))

    @property
    def finished(self) -> bool:
        return self.done == len(self.inputs)


@dataclass
class EmbedBatch:
    """One step's inputs, in order: per job taking part, how many of its next inputs."""

    taken: list[tuple[EmbedJob, int]] = field(default_factory=list)

    @property
    def inputs(self) -> list[list[int]]:
        return [tokens for job, count in self.taken for tokens in job.inputs[job.done:job.done + count]]


def take_inputs(jobs: list[EmbedJob], max_inputs: int, budget: int = EMBED_TOKENS_PER_STEP) -> EmbedBatch:
    """The next inputs of `jobs`, first come first served, at most `max_inputs` of them and while
    the batch padded to its longest input stays within `budget` tokens; at least one, however long."""
    batch, rows, widest = EmbedBatch(), 0, 0
    for job in jobs:
        count = 0
        for tokens in job.inputs[job.done:]:
            wider = max(widest, len(tokens))
            if rows and (rows == max_inputs or (rows + 1) * wider > budget):
                break
            rows, widest, count = rows + 1, wider, count + 1
        if count:
            batch.taken.append((job, count))
        if count < len(job.inputs) - job.done:
            break  # the budget is full
    return batch


def packed(vector: list[float], dimensions: int | None) -> bytes:
    """`vector` cut to its first `dimensions` values and scaled to unit length (as Matryoshka
    models are used), as little-endian float32: the bytes OpenAI's base64 encoding holds."""
    kept = vector[:dimensions] if dimensions else vector
    norm = math.sqrt(sum(x * x for x in kept)) or 1.0
    return struct.pack(f"<{len(kept)}f", *(x / norm for x in kept))
