"""The next token of each row of a batch's logits, and its logprobs.

The model runner hands over one step's logits (a row per sequence, in the batch's order) and
the sequences; out come token ids and, for the sequences that asked, logprobs. Penalties
first (OpenAI's presence and frequency penalties and logit_bias, and, below a sequence's
min_tokens, a ban on its stop tokens), then each constrained sequence's grammar mask (rows
without a constraint cost nothing), then greedy decoding at temperature 0, otherwise sampling
from the tempered distribution cut to top_k and top_p, with a sequence's own generator where
it asked for a seed. `prompt_logprobs` gives, where a job asked, how likely the model found
each prompt token.
"""

from __future__ import annotations

import numpy as np
import torch

from zmqchat.engine.sequence import Sequence
from zmqchat.grammar import fill_bitmask
from zmqchat.protocol import SamplingParams
from zmqchat.ranking import argmax_rows

GREEDY_BELOW = 1e-5  # temperatures under this mean greedy decoding
NUCLEUS_CANDIDATES = (64, 1024)  # likeliest tokens looked at for top_p, before sorting a whole vocabulary


def sample(logits, seqs: list[Sequence], generators: list, stop_token_ids: set[int]) -> tuple[list[int], list]:
    """Each sequence's next token from its row of `logits`, and its logprobs where it asked
    (see `token_logprobs`). `generators`: each row's own, or None."""
    logits = apply_grammars(apply_biases(apply_penalties(logits, seqs), seqs, stop_token_ids), seqs)
    tokens = sample_batch(logits, [s.params for s in seqs], generators)
    return tokens, token_logprobs(logits, tokens, [s.params.logprobs for s in seqs])


def seeded_generator(seed: int | None, device) -> torch.Generator | None:
    """A sequence's own random stream where it asked for a seed; None shares the global one."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def sample_batch(logits, params: list[SamplingParams], generators: list) -> list[int]:
    """The next token of each row: greedy at temperature 0, otherwise nucleus sampling from
    the tempered distribution, with the row's own generator where it has one."""
    greedy = argmax_rows(logits) if logits.device.type == "cpu" else logits.argmax(-1)  # see ranking
    temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
    sampling = temperatures >= GREEDY_BELOW
    if not bool(sampling.any()):
        return greedy.tolist()
    logits = top_k_only(logits.float(), [p.top_k for p in params])
    probs = torch.softmax(logits / temperatures.clamp(min=GREEDY_BELOW)[:, None], dim=-1)
    weights, tokens = nucleus(probs, torch.tensor([p.top_p for p in params], device=logits.device))
    choice = draw(weights, generators)
    sampled = choice if tokens is None else tokens.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(sampling, sampled, greedy).tolist()


def draw(weights, generators: list):
    """An index of each row of `weights` (not normalised), drawn in proportion to them: where a
    uniform draw falls in the row's running sum, with the row's own generator where it has one.
    PyTorch's CPU multinomial takes ~1.6 ms a row over the default model's 49,152 tokens (25 ms
    for 16 rows, as long as the model's step), the running sum and its search ~0.03 ms a row (README,
    Performance, run AF). A token of weight 0 is never drawn: its running sum is its predecessor's."""
    sums = weights.float().cumsum(-1)
    uniform = torch.empty(len(generators), 1, device=weights.device)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        uniform[shared] = torch.rand(len(shared), 1, device=weights.device)
    for i, generator in enumerate(generators):
        if generator is not None:
            uniform[i] = torch.rand(1, generator=generator, device=weights.device)
    drawn = torch.searchsorted(sums, uniform * sums[:, -1:], right=True).squeeze(-1)
    return drawn.clamp(max=weights.shape[-1] - 1)  # a sum short of its last entry by rounding


def token_logprobs(logits, tokens: list[int], wanted: list[int | None]) -> list:
    """Per row, None where `wanted` is None, else the logprob of the row's sampled token and
    its `wanted` likeliest tokens with theirs: the model's own distribution (after the
    penalties, before temperature and top_p/top_k), as vLLM reports it."""
    rows = [i for i, k in enumerate(wanted) if k is not None]
    result: list = [None] * len(wanted)
    if not rows:
        return result
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor([[tokens[i]] for i in rows], device=logits.device))[:, 0].tolist()
    top_values, top_ids = logprobs.topk(max(wanted[i] for i in rows), dim=-1)
    for j, i in enumerate(rows):
        k = wanted[i]
        result[i] = (chosen[j], list(zip(top_ids[j, :k].tolist(), top_values[j, :k].tolist())))
    return result


def prompt_logprobs(logits, targets, top: int) -> list[list[tuple[float, int, list[tuple[int, float]]]]]:
    """For each row and position of `logits` [rows, positions, vocabulary], the logprob of
    that position's `targets` token (the one that came next), its rank (1 + the tokens the
    model found likelier) and the `top` likeliest tokens with theirs: the model's own
    distribution, untouched by the job's sampling parameters."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, targets[..., None])
    ranks = (logprobs > chosen).sum(-1) + 1
    top_values, top_ids = logprobs.topk(top, dim=-1)
    rows = zip(chosen[..., 0].tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist())
    return [[(lp, rank, list(zip(ids, values))) for lp, rank, ids, values in zip(*row)] for row in rows]


def apply_penalties(logits, seqs: list[Sequence]):
    """OpenAI's penalties: a token already generated loses presence_penalty once and
    frequency_penalty for each time it was generated."""
    rows = [i for i, s in enumerate(seqs) if s.output_ids and (s.params.presence_penalty or s.params.frequency_penalty)]
    if not rows:
        return logits
    logits = logits.float().clone()
    for i in rows:
        params = seqs[i].params
        counts = torch.bincount(torch.tensor(seqs[i].output_ids, device=logits.device),
                                minlength=logits.shape[-1])[:logits.shape[-1]].float()
        logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return logits


def apply_biases(logits, seqs: list[Sequence], stop_token_ids: set[int]):
    """Each row's logit_bias added; a row short of its min_tokens cannot end (its stop tokens
    get -inf), as vLLM does it, unless a grammar decides where it ends."""
    rows = [i for i, s in enumerate(seqs) if s.params.logit_bias or s.must_go_on]
    if not rows:
        return logits
    logits = logits.float().clone()
    for i in rows:
        params = seqs[i].params
        if params.logit_bias:
            ids = torch.tensor(list(params.logit_bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device)
        if seqs[i].must_go_on and stop_token_ids:
            logits[i, list(stop_token_ids)] = float("-inf")
    return logits


def apply_grammars(logits, seqs: list[Sequence]):
    """Each constrained row's logits outside the tokens its grammar allows set to -inf."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not rows:
        return logits
    bitmask = torch.zeros(len(rows), (logits.shape[-1] + 31) // 32, dtype=torch.int32)
    fill_bitmask([seqs[i].grammar for i in rows], bitmask)
    return mask_rows(logits, rows, bitmask)


def mask_rows(logits, rows: list[int], bitmask):
    """`logits` with row rows[j]'s tokens not allowed by bitmask[j] set to -inf."""
    allowed = unpack_bitmask(bitmask, logits.shape[-1]).to(logits.device)
    logits = logits.float().clone()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits


def unpack_bitmask(bitmask, vocab_size: int):
    """A packed token bitmask (int32 words on the CPU, bit j of word w allowing token 32 w + j,
    the layout every grammar library writes) as a bool tensor [rows, vocab_size]. numpy's
    unpackbits does it in a tenth of the time of torch's shifts."""
    words = bitmask.numpy().view(np.uint8)
    return torch.from_numpy(np.unpackbits(words, axis=-1, count=vocab_size, bitorder="little").view(bool))


def top_k_only(logits, top_k: list[int]):
    """Each row's logits outside its top_k likeliest tokens set to -inf (0: no limit)."""
    if not any(top_k):
        return logits
    widest = min(max(top_k), logits.shape[-1])
    kth = logits.topk(widest, dim=-1).values  # [rows, widest], descending
    index = torch.tensor([min(k, widest) - 1 if k else widest - 1 for k in top_k], device=logits.device)
    threshold = kth.gather(-1, index[:, None])
    unlimited = torch.tensor([k == 0 for k in top_k], device=logits.device)[:, None]
    return torch.where(unlimited | (logits >= threshold), logits, torch.full_like(logits, float("-inf")))


def nucleus(probs, top_p):
    """Each row's candidate weights and, where they are not the whole vocabulary in order,
    their token ids: the smallest set of likeliest tokens whose mass reaches the row's top_p.
    The top 64, or else the top 1024, tokens nearly always hold that mass (at temperature 1
    and top_p 0.9 the default model needs a few hundred), and finding them costs far less
    than sorting the vocabulary every step; only when they do not is it sorted."""
    if bool((top_p >= 1.0).all()):
        return probs, None
    for k in NUCLEUS_CANDIDATES:
        if k < probs.shape[-1]:
            weights, tokens = probs.topk(k, dim=-1)
            if bool(((weights.sum(-1) >= top_p) & (top_p < 1.0)).all()):
                break
    else:
        weights, tokens = probs.sort(dim=-1, descending=True)
    weights[(weights.cumsum(-1) - weights) >= top_p[:, None]] = 0.0
    return weights, tokens
