"""Attention over the paged KV cache, plugged into transformers models.

A step runs every sequence's chunk of new tokens as one flat row of N tokens (vLLM's layout):
the projections and MLPs see only real tokens, never padding. Only attention needs rows: each
layer writes the new tokens' keys and values into their slots of the pool (PagedKV) in place,
then gathers each sequence's keys from its block table and attends, padded to the step's
longest chunk and longest context, and hands the real tokens back as one flat row again.

The step's layout (StepPlan: slots to write, keys to read, masks) is built once per step and
shared by every layer; transformers passes it through the model's forward to `paged_attention`,
registered as the attention implementation "zmqchat_paged". A forward without a plan (the
embeddings' padded batch, transformers' own generate) is plain SDPA with transformers' masks. Sliding-window layers get a windowed mask; layers with
soft-capped logits (Gemma 2) are computed without SDPA, which has no soft cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from zmqchat.engine.kv_cache import NULL_BLOCK

ATTENTION = "zmqchat_paged"
STEP_ARGUMENT = "zmqchat_step"  # the model forward's keyword argument that carries the StepPlan


def kv_shape(config) -> tuple[int, int, int]:
    """Layers, key-value heads and head size of a model's KV cache."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


class PagedKV:
    """Each layer's keys and values, [slots, kv_heads, head_dim], slots = blocks x block_size."""

    def __init__(self, config, num_blocks: int, block_size: int, dtype, device):
        layers, kv_heads, head_dim = kv_shape(config)
        self.block_size = block_size
        # Never written, so never touched in memory until used (torch.empty): only the null
        # block is zeroed, as the keys and values that padding reads.
        self.keys = [torch.empty(num_blocks * block_size, kv_heads, head_dim, dtype=dtype, device=device)
                     for _ in range(layers)]
        self.values = [torch.empty_like(k) for k in self.keys]
        null = slice(NULL_BLOCK * block_size, (NULL_BLOCK + 1) * block_size)
        for pool in self.keys + self.values:
            pool[null].zero_()


@dataclass
class StepPlan:
    """Where one step's tokens go and what they attend to: B chunks, padded to Tq queries and Lk keys."""

    kv: PagedKV
    positions: torch.Tensor  # [N]: each new token's position in its sequence
    write_slots: torch.Tensor  # [N]: each new token's slot in the pool
    query_index: torch.Tensor  # [B, Tq]: the flat index of each chunk's t-th token (0 for padding)
    query_valid: torch.Tensor  # [B, Tq]: whether it is a token, not padding
    query_positions: torch.Tensor  # [B, Tq]: its position (0 for padding, which attends to a null key)
    key_slots: torch.Tensor  # [B, Lk]: the slot of each sequence's j-th key (the null block's past its end)
    masks: dict = field(default_factory=dict)  # by sliding window (None: full): [B, 1, Tq, Lk]

    def mask(self, window: int | None) -> torch.Tensor:
        """Causal, and within `window` of the query where a layer slides (as transformers: q - k < window)."""
        if window not in self.masks:
            keys = torch.arange(self.key_slots.shape[1], device=self.key_slots.device)
            query = self.query_positions[..., None]
            allowed = keys <= query
            if window is not None:
                allowed &= keys > query - window
            self.masks[window] = allowed[:, None]
        return self.masks[window]


def plan_step(kv: PagedKV, chunks: list[tuple[list[int], int, int]], device) -> StepPlan:
    """The plan of a step of `chunks`: each a sequence's block table and the [start, end) of its tokens to run."""
    size = kv.block_size
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
    return StepPlan(kv, query_positions[query_valid], key_slots.gather(1, query_positions)[query_valid],
                    query_index, query_valid, query_positions, key_slots)


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
    keys, values = step.kv.keys[module.layer_idx], step.kv.values[module.layer_idx]
    keys.index_copy_(0, step.write_slots, key[0].transpose(0, 1))
    values.index_copy_(0, step.write_slots, value[0].transpose(0, 1))
    q = query[0].transpose(0, 1)[step.query_index].transpose(1, 2)  # [B, Hq, Tq, D]
    k = keys[step.key_slots].transpose(1, 2)  # [B, Hkv, Lk, D]
    v = values[step.key_slots].transpose(1, 2)
    mask = step.mask(sliding_window)
    if softcap is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=q.shape[1] != k.shape[1])
    else:
        out = _softcapped_attention(q, k, v, mask, scaling, softcap)
    return out.transpose(1, 2)[step.query_valid][None], None


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
