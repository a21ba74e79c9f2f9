"""Attention over the paged KV cache, plugged into transformers models.

A step runs every sequence's chunk of new tokens as one flat row of N tokens (vLLM's layout):
the projections and MLPs see only real tokens, never padding. Only attention needs rows: each
layer writes the new tokens' keys and values into their slots of the pool (PagedKV) in place,
then gathers each sequence's keys from its block table and attends, and hands the real tokens
back as one flat row again. The decoding sequences (one token each, first in the row) attend
as one group, one query each; the prompt chunks as another, padded to their longest chunk: a
prompt joining a step of decodes does not pad them all to its length.

The step's layout (StepPlan: slots to write, keys to read, masks) is built once per step and
shared by every layer; transformers passes it through the model's forward to `paged_attention`,
registered as the attention implementation "zmqchat_paged". A layer's attention is one operator
of its own. On a CPU, where zmqchat's kernels built, it is C++ (kernels/decode_attention.cpp:
the decodes' group reads each slot's keys once, in place, for every head; the prompts' group
gathers as below), eager or compiled. Elsewhere it is `attend_as_planned` (PyTorch's operators:
each group gathers its keys and runs SDPA), an operator of its own (`zmqchat::planned_attention`)
to a step being compiled, the function itself to an eager one. A forward without a plan (the
embeddings' padded batch, transformers' own generate) is plain SDPA with transformers' masks.
Sliding-window layers get a windowed mask; layers with soft-capped logits (Gemma 2) are
computed without SDPA, which has no soft cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from zmqchat.engine import kernels
from zmqchat.engine.kv_cache import NULL_BLOCK

ATTENTION = "zmqchat_paged"
STEP_ARGUMENT = "zmqchat_step"  # the model forward's keyword argument that carries the StepPlan


def kv_shape(config) -> tuple[int, int, int]:
    """Layers, key-value heads and head size of a model's KV cache."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


class PagedKV:
    """Each layer's keys and values together, [slots, 2, kv_heads, head_dim], slots = blocks x
    block_size: a step writes a layer's new keys and values with one copy and reads them with
    one gather."""

    def __init__(self, config, num_blocks: int, block_size: int, dtype, device):
        layers, kv_heads, head_dim = kv_shape(config)
        self.block_size = block_size
        # zmqchat's C++ attention where it applies (a float32 pool on a CPU) and built (the build,
        # once per machine, ~15 s, happens here: not in the first request); else None.
        self.kernel = kernels.planned_attention() if torch.device(device).type == "cpu" and dtype == torch.float32 \
            else None
        # Never written, so never touched in memory until used (torch.empty): only the null
        # block is zeroed, as the keys and values that padding reads.
        self.layers = [torch.empty(num_blocks * block_size, 2, kv_heads, head_dim, dtype=dtype, device=device)
                       for _ in range(layers)]
        for pool in self.layers:
            pool[NULL_BLOCK * block_size:(NULL_BLOCK + 1) * block_size].zero_()


@dataclass
class Attending:
    """Chunks of a step that attend together: B chunks padded to Tq queries and Lk keys."""

    query_index: torch.Tensor  # [B, Tq]: the index of each chunk's t-th token among the group's (0 for padding)
    query_positions: torch.Tensor  # [B, Tq]: its position (0 for padding, which attends to a null key)
    key_slots: torch.Tensor  # [B, Lk]: the slot of each sequence's j-th key (the null block's past its end)
    token_rows: torch.Tensor  # [n]: each of the group's tokens' row among the B x Tq padded queries
    masks: dict = field(default_factory=dict)  # by sliding window (0: none), once per step: [B, 1, Tq, Lk]

    @classmethod
    def empty(cls, device) -> Attending:
        """A group of no chunks, one column: the strides of [0, 1] are those of any [B, L] group,
        and each field its own tensor, so that torch.compile's guards see no new layout and no aliasing."""
        grids = [torch.zeros(0, 1, dtype=torch.long, device=device) for _ in range(3)]
        return cls(*grids, torch.zeros(0, dtype=torch.long, device=device))

    def mask(self, window: int) -> torch.Tensor:
        """Causal, and within `window` of the query where a layer slides (q - k < window)."""
        if window not in self.masks:
            key_positions = torch.arange(self.key_slots.shape[1], device=self.key_slots.device)
            query = self.query_positions[..., None]
            allowed = key_positions <= query
            if window:
                allowed &= key_positions > query - window
            self.masks[window] = allowed[:, None]
        return self.masks[window]


@dataclass
class StepPlan:
    """Where one step's N tokens go and what they attend to. The chunks of one token that lead
    the step (the decoding sequences, which the scheduler puts first) attend as one group, one
    query each; the rest (prompt chunks) as another, padded to their longest: a prompt joining
    the step does not pad every decoding sequence to its length."""

    kv: PagedKV
    positions: torch.Tensor  # [N]: each new token's position in its sequence
    write_slots: torch.Tensor  # [N]: each new token's slot in the pool
    decodes: Attending  # the leading one-token chunks (Tq = 1)
    prompts: Attending  # the others, their tokens after the decodes' in the flat row


def plan_step(kv: PagedKV, chunks: list[tuple[list[int], int, int]], device) -> StepPlan:
    """The plan of a step of `chunks`: each a sequence's block table and the [start, end) of its tokens to run."""
    singles = next((i for i, (_, start, end) in enumerate(chunks) if end - start != 1), len(chunks))
    (decodes, decode_positions, decode_slots), (prompts, prompt_positions, prompt_slots) = (
        _attending(kv, chunks[:singles], device), _attending(kv, chunks[singles:], device))
    return StepPlan(kv, torch.cat([decode_positions, prompt_positions]), torch.cat([decode_slots, prompt_slots]),
                    decodes, prompts)


def _attending(kv: PagedKV, chunks: list[tuple[list[int], int, int]], device) -> tuple[Attending, torch.Tensor,
                                                                                         torch.Tensor]:
    """The chunks' group, and their tokens' positions and slots to write, in order."""
    size = kv.block_size
    if not chunks:
        group = Attending.empty(device)
        return group, group.query_index[:, 0], group.query_positions[:, 0]
    starts = torch.tensor([start for _, start, _ in chunks], device=device)
    ends = torch.tensor([end for _, _, end in chunks], device=device)
    lengths = ends - starts
    t = torch.arange(int(lengths.max()), device=device)
    query_valid = t < lengths[:, None]
    query_index = torch.where(query_valid, (lengths.cumsum(0) - lengths)[:, None] + t, 0)
    query_positions = torch.where(query_valid, starts[:, None] + t, 0)
    widest = max(len(blocks) for blocks, _, _ in chunks)
    table = torch.tensor([blocks + [NULL_BLOCK] * (widest - len(blocks)) for blocks, _, _ in chunks], device=device)
    slots = (table[..., None] * size + torch.arange(size, device=device)).flatten(1)[:, :int(ends.max())]
    key_slots = torch.where(torch.arange(slots.shape[1], device=device) < ends[:, None], slots, NULL_BLOCK * size)
    group = Attending(query_index, query_positions, key_slots, query_valid.flatten().nonzero()[:, 0])
    return group, query_positions[query_valid], key_slots.gather(1, query_positions)[query_valid]


def paged_attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None, softcap=None,
                    **kwargs):
    """transformers' attention interface: query [1, Hq, N, D], key and value [1, Hkv, N, D] of the
    step's new tokens; returns [1, N, Hq, D]."""
    step: StepPlan | None = kwargs.pop(STEP_ARGUMENT, None)
    if step is None:
        if softcap is not None:  # which SDPA does not have
            mask = attention_mask if attention_mask is not None else _causal_mask(query, key)
            return _softcapped_attention(query, key, value, mask, scaling, softcap).transpose(1, 2), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      sliding_window=sliding_window, **kwargs)
    # Compiled, the PyTorch path is an operator of its own; eager, the function itself, which saves
    # the operator's dispatch.
    attend = step.kv.kernel or (planned_attention if torch.compiler.is_compiling() else attend_as_planned)
    window, decodes, prompts = sliding_window or 0, step.decodes, step.prompts
    return attend(query, key, value, step.kv.layers[module.layer_idx], step.write_slots, decodes.key_slots,
                  decodes.mask(window), prompts.query_index, prompts.key_slots, prompts.token_rows,
                  prompts.mask(window), scaling or query.shape[-1] ** -0.5, softcap or 0.0), None


def attend_as_planned(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pool: torch.Tensor,
                      write_slots: torch.Tensor, decode_key_slots: torch.Tensor, decode_mask: torch.Tensor,
                      query_index: torch.Tensor, key_slots: torch.Tensor, token_rows: torch.Tensor,
                      mask: torch.Tensor, scaling: float, softcap: float) -> torch.Tensor:
    """One layer's attention for a step (see StepPlan) over its `pool` (PagedKV): the decodes'
    group, then the prompts'; softcap 0 for none. (planned_attention in decode_attention.cpp is
    the same on a CPU.)"""
    pool.index_copy_(0, write_slots, torch.stack([key[0], value[0]]).permute(2, 0, 1, 3))
    queries = query[0].transpose(0, 1)  # [N, Hq, D]
    decodes = decode_key_slots.shape[0]
    outs = []
    if decodes:  # one query each: no padding, no re-indexing
        outs.append(_attend(queries[:decodes, :, None], pool, decode_key_slots, decode_mask, scaling, softcap))
    if query_index.shape[0]:
        q = queries[decodes:][query_index].transpose(1, 2)  # [B, Hq, Tq, D]
        outs.append(_attend(q, pool, key_slots, mask, scaling, softcap)[token_rows])
    return (outs[0] if len(outs) == 1 else torch.cat(outs))[None]


def _attend(q: torch.Tensor, pool: torch.Tensor, key_slots: torch.Tensor, mask: torch.Tensor, scaling: float,
            softcap: float) -> torch.Tensor:
    """Queries [B, Hq, Tq, D] over the keys and values at `key_slots` [B, Lk]: [B x Tq, Hq, D]."""
    # index_select, not pool[key_slots]: on a CPU it gathers 2 to 5 times faster.
    k, v = pool.index_select(0, key_slots.flatten()).unflatten(0, key_slots.shape).permute(2, 0, 3, 1, 4)
    batch, heads, queries, head_dim = q.shape
    if queries == 1:
        # One query each (decodes): the query heads sharing a key-value head become that head's
        # queries (the mask is the same for all), so SDPA need not repeat the keys for each: 1.2x
        # faster at 16 to 64 streams on a CPU.
        q = q.reshape(batch, k.shape[1], -1, head_dim)
    if softcap:
        out = _softcapped_attention(q, k, v, mask, scaling, softcap)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling,
                                             enable_gqa=q.shape[1] != k.shape[1])
    return out.reshape(batch, heads, queries, head_dim).transpose(1, 2).flatten(0, 1)


# An operator of its own, opaque to torch.compile (as vLLM's attention is): the compiled graph
# around it depends only on the step's token count, not on its chunks' layout, which would make
# every new layout a new graph. Defined with torch.library.Library rather than custom_op, whose
# Python wrapper for an operator that writes an argument (the pool) costs ~0.1 ms a call.
_LIBRARY = torch.library.Library("zmqchat", "FRAGMENT")
_LIBRARY.define("planned_attention(Tensor query, Tensor key, Tensor value, Tensor(a!) pool, Tensor write_slots, "
                "Tensor decode_key_slots, Tensor decode_mask, Tensor query_index, Tensor key_slots, "
                "Tensor token_rows, Tensor mask, float scaling, float softcap) -> Tensor")
_LIBRARY.impl("planned_attention", attend_as_planned, "CompositeExplicitAutograd")
planned_attention = torch.ops.zmqchat.planned_attention.default


@torch.library.register_fake("zmqchat::planned_attention")
def _(query, key, value, pool, write_slots, decode_key_slots, decode_mask, query_index, key_slots, token_rows, mask,
      scaling, softcap):
    return query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])


def _causal_mask(query, key):
    """Each of the last queries sees the keys up to its own position (the keys before the queries are the past)."""
    queries, keys = query.shape[-2], key.shape[-2]
    return torch.ones(queries, keys, dtype=torch.bool, device=query.device).tril(keys - queries)


def _softcapped_attention(q, k, v, mask, scaling, softcap):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.tanh(q @ k.transpose(-1, -2) * (scaling or q.shape[-1] ** -0.5) / softcap) * softcap
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)
    return weights @ v


AttentionInterface.register(ATTENTION, paged_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # for forwards without a plan
