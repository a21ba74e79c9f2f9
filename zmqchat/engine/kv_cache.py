"""Who owns which block of the KV cache, and which blocks hold a known prefix. Pure: no torch.

The runner keeps every layer's keys and values in one preallocated pool of slots, cut into
blocks of `block_size` tokens (vLLM's paged KV cache). A sequence's block table, `seq.blocks`,
lists its blocks in order: token i of the sequence lives in slot
`blocks[i // block_size] * block_size + i % block_size`. Joining and leaving the batch move
no tensor: they only change which blocks are whose.

Automatic prefix caching, as vLLM's: once a block is full and its KV computed, it is keyed by
a hash of its tokens and of all the tokens before it (BLAKE2, as vLLM moved to SHA-256: with
Python's own hash a client could craft a prompt that collides with another's and read its KV).
A new prompt takes over the longest run of its leading blocks that are cached, from running
sequences or from finished ones, and its prefill starts after them. A finished sequence's
blocks stay cached until a block is needed and none is free: then the least recently released
goes (blocks without a hash first, and a sequence's last blocks before its first ones, which
other prompts are likelier to share).

Admission reserves every block a sequence may need (its prompt and max_tokens), so a running
sequence never waits for memory and none is ever preempted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Protocol


class Cached(Protocol):
    prompt_ids: list[int]
    reserved_tokens: int  # prompt tokens + the most tokens it may generate
    blocks: list[int]  # its block table
    block_hashes: list[bytes]  # of its full, computed blocks, in order
    computed_tokens: int  # tokens whose KV is in its blocks
    cached_tokens: int  # of those, the prompt tokens it found cached
    reserved_blocks: int  # blocks promised to it that it has not taken yet

    def token_ids(self, start: int, end: int) -> list[int]: ...


NULL_BLOCK = 0  # never handed out: its zeros stand in for keys a row does not have


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError("a KV cache needs at least two blocks (one is kept empty)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks  # sequences holding each block
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding those tokens
        # Blocks no sequence holds, the next to be taken first; cached ones among them may be taken back.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self.promised = 0  # blocks reserved by running sequences and not taken yet

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def in_use(self) -> int:
        """Blocks held by running sequences."""
        return self.usable_blocks - len(self.free)

    def can_admit(self, seq: Cached, reuse: bool = True) -> bool:
        return self._fits(seq, self._cached_prefix(seq) if reuse else [])

    def admit(self, seq: Cached, reuse: bool = True) -> bool:
        """Give `seq` its cached leading blocks and fresh ones for the rest of its prompt, and
        promise it the blocks its output may need; or, where they do not fit, nothing (False)."""
        hits = self._cached_prefix(seq) if reuse else []
        if not self._fits(seq, hits):
            return False
        for block in hits:
            self.free.pop(block, None)
            self.refs[block] += 1
        seq.blocks = hits + [self._take_free() for _ in range(self.blocks_for(len(seq.prompt_ids)) - len(hits))]
        seq.block_hashes = [self.hash_of[block] for block in hits]
        seq.cached_tokens = seq.computed_tokens = len(hits) * self.block_size
        seq.reserved_blocks = self.blocks_for(seq.reserved_tokens) - len(seq.blocks)
        self.promised += seq.reserved_blocks
        return True

    def grow(self, seq: Cached, tokens: int) -> None:
        """Make `seq`'s blocks hold `tokens` tokens, from the blocks promised to it."""
        while len(seq.blocks) * self.block_size < tokens:
            if seq.reserved_blocks == 0:
                raise RuntimeError("a sequence outgrew the blocks reserved for it")
            seq.reserved_blocks -= 1
            self.promised -= 1
            seq.blocks.append(self._take_free())

    def computed(self, seq: Cached, tokens: int) -> None:
        """`seq`'s KV is now computed up to `tokens`: its blocks filled so far become cached."""
        seq.computed_tokens = tokens
        size = self.block_size
        while (len(seq.block_hashes) + 1) * size <= tokens:
            index = len(seq.block_hashes)
            previous = seq.block_hashes[-1] if seq.block_hashes else b""
            key = block_hash(previous, seq.token_ids(index * size, (index + 1) * size))
            seq.block_hashes.append(key)
            block = seq.blocks[index]
            if key not in self.cached:  # else the same tokens are cached in another block already
                self.cached[key], self.hash_of[block] = block, key

    def release(self, seq: Cached) -> None:
        """`seq` left: its blocks are free, and those cached stay so until they are needed."""
        for block in reversed(seq.blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
                if self.hash_of[block] is None:  # nothing to keep: taken before the cached ones
                    self.free.move_to_end(block, last=False)
        self.promised -= seq.reserved_blocks
        seq.blocks, seq.reserved_blocks = [], 0

    def _fits(self, seq: Cached, hits: list[int]) -> bool:
        """Whether the free blocks, less those promised, hold all `seq` may need beyond `hits`
        (the cached blocks it would take, some of them free ones taken back)."""
        taken_back = sum(1 for block in hits if self.refs[block] == 0)
        needed = self.blocks_for(seq.reserved_tokens) - len(hits)
        return needed + taken_back <= len(self.free) - self.promised

    def _cached_prefix(self, seq: Cached) -> list[int]:
        """The cached blocks of the prompt's leading full blocks, as long as they all are. The
        prompt's last token is never taken from the cache: its logits start the reply."""
        size, hits, previous = self.block_size, [], b""
        for index in range((len(seq.prompt_ids) - 1) // size):
            previous = block_hash(previous, seq.prompt_ids[index * size:(index + 1) * size])
            block = self.cached.get(previous)
            if block is None:
                break
            hits.append(block)
        return hits

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.hash_of[block] is not None:  # evicted: its tokens are no longer cached
            del self.cached[self.hash_of[block]]
            self.hash_of[block] = None
        self.refs[block] = 1
        return block


def blocks_holding(tokens: int, block_size: int) -> int:
    """Blocks of a cache of `tokens` tokens: at least one usable, and the null block."""
    return max(1, tokens // block_size) + 1


def block_hash(previous: bytes, tokens: list[int]) -> bytes:
    """The key of a block holding `tokens` after the block whose key is `previous`."""
    return hashlib.blake2b(previous + array("q", tokens).tobytes(), digest_size=16).digest()
