"""Paged attention on its own: a step of chunks over the block pool computes, for every token,
what plain attention over its own sequence's keys computes, whatever the step's other chunks."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from zmqchat.engine import kernels
from zmqchat.engine.attention import PagedKV, _attend, paged_attention, plan_step

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 8, 4
CONFIG = SimpleNamespace(num_hidden_layers=1, num_key_value_heads=KV_HEADS, head_dim=DIM,
                         num_attention_heads=HEADS, hidden_size=HEADS * DIM)
LAYER = SimpleNamespace(layer_idx=0)


def reference(q, k, v, window, softcap):
    """Each position of one sequence attending to itself and those before it (within `window`)."""
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 0), v.repeat_interleave(HEADS // KV_HEADS, 0)
    scores = q @ k.transpose(-1, -2) * DIM ** -0.5
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    n = q.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()
    if window:
        allowed &= ~torch.ones(n, n, dtype=torch.bool).tril(-window)
    return (torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1) @ v).transpose(0, 1)  # [n, H, D]


def run_step(kv, chunks, qkv, **layer_args):
    """One step of `chunks` (name, blocks, start, end): their tokens' attention outputs, in order."""
    step = plan_step(kv, [(blocks, start, end) for _, blocks, start, end in chunks], "cpu")
    q, k, v = (torch.cat([qkv[name][i][:, start:end] for name, _, start, end in chunks], 1)[None] for i in range(3))
    out, _ = paged_attention(LAYER, q, k, v, None, scaling=DIM ** -0.5, zmqchat_step=step, **layer_args)
    return out[0].split([end - start for _, _, start, end in chunks])


@pytest.fixture(params=["kernel", "pytorch"])
def attention_path(request, monkeypatch):
    """Attention on zmqchat's own CPU kernels (which must build here) or on PyTorch's operators."""
    if request.param == "kernel":
        assert kernels.planned_attention() is not None, "zmqchat's CPU kernels did not build (see the log)"
    else:
        monkeypatch.setattr(kernels, "planned_attention", lambda: None)
    return request.param


@pytest.mark.parametrize("window, softcap", [(None, None), (3, None), (None, 5.0)], ids=["full", "sliding", "softcap"])
def test_each_token_attends_to_its_own_sequence_as_if_alone(window, softcap, attention_path):
    torch.manual_seed(0)
    lengths = {"a": 9, "b": 5, "c": 6, "d": 4}
    qkv = {name: (torch.randn(HEADS, n, DIM), torch.randn(KV_HEADS, n, DIM), torch.randn(KV_HEADS, n, DIM))
           for name, n in lengths.items()}
    kv = PagedKV(CONFIG, num_blocks=12, block_size=BLOCK, dtype=torch.float32, device="cpu")
    assert (kv.kernel is not None) == (attention_path == "kernel")
    blocks = {"a": [3, 1, 7], "b": [2, 5], "c": [9, 4], "d": [10]}  # scattered, as a pool hands them out
    for pool in kv.layers:  # stale values in the blocks must not matter
        pool[BLOCK:].fill_(1e4)
    outputs = {name: [] for name in lengths}
    # a's prompt in two chunks, while b joins whole and c decodes token by token after a prefix, its
    # token first (as the scheduler puts decodes), and d's prompt ends in a chunk of one after others.
    steps = [[("a", 0, 4), ("c", 0, 3), ("d", 0, 2)], [("c", 3, 4), ("a", 4, 8), ("b", 0, 5), ("d", 2, 3)],
             [("c", 4, 5), ("a", 8, 9), ("d", 3, 4)], [("c", 5, 6)]]
    for chunks in steps:
        for (name, *_), out in zip(chunks, run_step(kv, [(n, blocks[n], s, e) for n, s, e in chunks], qkv,
                                                      sliding_window=window, softcap=softcap)):
            outputs[name].append(out)
    for name, (q, k, v) in qkv.items():
        assert torch.allclose(torch.cat(outputs[name]), reference(q, k, v, window, softcap), atol=1e-5), name


@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (8, 8, 72), (4, 1, 20)])
def test_the_decode_kernel_computes_what_pytorchs_attention_does(heads, kv_heads, dim):
    """Head sizes on and off the kernel's vector width, query heads grouped or not, sequences of
    different lengths whose block tables are padded with the null block, a window."""
    torch.manual_seed(0)
    kernel = kernels.decode_attention()
    assert kernel is not None, "zmqchat's CPU kernels did not build (see the log)"
    pool = torch.randn(128 * BLOCK, 2, kv_heads, dim)
    lengths = torch.tensor([1, 7, 30, 64, 13])
    slots = torch.randperm(127 * BLOCK)[:5 * 64].reshape(5, 64) + BLOCK  # past the null block
    keys = torch.arange(64)
    for window in (0, 5):
        mask = keys < lengths[:, None]
        if window:
            mask &= keys >= lengths[:, None] - window
        slots_padded = torch.where(keys < lengths[:, None], slots, 0)
        q = torch.randn(5, heads, dim)
        expected = _attend(q[:, :, None], pool, slots_padded, mask[:, None, None], dim ** -0.5, 0.0)
        got = kernel(q, pool, slots_padded, mask[:, None, None], dim ** -0.5, 0.0)
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_without_a_compiler_the_kernel_is_left_out_and_says_why(tmp_path):
    """A machine with no C++ compiler still serves, on PyTorch's operators, and its log says why."""
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from zmqchat.engine import kernels\n"
            "print('kernel:', kernels.decode_attention())")
    env = {**os.environ, "PATH": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "builds")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "kernel: None" in done.stdout
    assert "zmqchat's CPU kernels did not build; attention runs on PyTorch's operators" in done.stderr


def test_a_build_killed_halfway_does_not_stop_the_next(tmp_path):
    """PyTorch's lock file, left by a process killed while it built the kernels, is cleared by the
    next build instead of being waited on forever."""
    code = ("from zmqchat.engine import kernels\n"
            "(kernels.build_folder() / 'lock').touch()\n"
            "print('built:', kernels.load())")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "builds")}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "built: True" in done.stdout, done.stderr
