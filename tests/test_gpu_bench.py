"""bin/gpu-bench on the CPU with the tiny Llama shape: the path a GPU machine runs, in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from zmqchat.gpu_bench import joined_wheels, split

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_measures_the_engine_and_the_bare_decode_at_each_concurrency(tmp_path):
    out = tmp_path / "figures.json"
    run = subprocess.run([str(ROOT / "bin" / "gpu-bench"), "--device", "cpu", "--shapes", "tiny",
                          "--concurrency", "1,4", "--bare-batches", "1,4", "--max-tokens", "8",
                          "--prompt-tokens", "16", "--no-tests", "--out", str(out)],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 0, run.stdout + run.stderr
    table = run.stdout[run.stdout.index("shape  streams"):].splitlines()
    rows = [line.split() for line in table[1:3]]
    assert [row[:2] for row in rows] == [["tiny", "1"], ["tiny", "4"]]
    assert all(float(row[2]) > 0 and float(row[4]) > 0 for row in rows), table  # engine and bare tok/s
    shape = json.loads(out.read_text())["shapes"][0]
    # Every request ran to max_tokens (ignore_eos): 2 waves of clients at each concurrency.
    assert [(level["requests"], level["output_tokens"]) for level in shape["levels"]] == [(2, 16), (8, 64)]
    assert [b["batch"] for b in shape["bare"]] == [1, 4]


def test_a_split_wheel_is_joined_only_with_all_its_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr("zmqchat.gpu_bench.PART_BYTES", 4)
    wheel = tmp_path / "model-1.0-py3-none-any.whl"
    wheel.write_bytes(b"0123456789")
    first, second, joined = tmp_path / "a", tmp_path / "b", tmp_path / "joined"
    split(wheel, [first, second])
    joined.mkdir()
    assert joined_wheels([first], joined) == []  # half a wheel is no wheel
    (whole,) = joined_wheels([first, second], joined)
    assert whole.name == wheel.name and whole.read_bytes() == b"0123456789"
