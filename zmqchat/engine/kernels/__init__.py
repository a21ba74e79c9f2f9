"""zmqchat's own CPU kernels (the .cpp files here), built with the machine's C++ compiler on first
use, as Inductor builds its own, and loaded as PyTorch operators (torch.ops.zmqchat_kernels).

Built for this CPU's instructions (-march=native) into a folder named after them and the
sources, so that machines sharing a home folder never load each other's builds, and a build is
made once per machine (about 15 s). Where no compiler is at hand the build fails once, is
logged, and callers take PyTorch's operators instead (`planned_attention()` is None). The int4
product is built only for CPUs with AVX-512 VNNI (`int4_linear()` is None elsewhere).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sysconfig
import time
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger("zmqchat.kernels")

SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]


def _cpu_flags() -> bytes:
    try:
        return next((line for line in Path("/proc/cpuinfo").read_bytes().splitlines() if line.startswith(b"flags")),
                    b"")
    except OSError:
        return b""


def build_folder() -> Path:
    """Where the kernels are built for these sources and this CPU's instructions (made if new)."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256(_cpu_flags() + b"".join(s.read_bytes() for s in SOURCES)).hexdigest()[:16]
    return Path(cpp_extension._get_build_directory(f"zmqchat_kernels_{digest}", verbose=False))


@cache
def load() -> bool:
    """Build (once per machine and source) and load the kernels; whether they are loaded."""
    from torch.utils import cpp_extension

    folder = build_folder()
    name = folder.name
    # PyTorch builds with ninja, which pip installs next to this interpreter: on PATH or not.
    os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")])
    started = time.perf_counter()
    try:
        with _building(folder):
            cpp_extension.load(name, [str(s) for s in SOURCES], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"],
                               build_directory=str(folder), is_python_module=False)
    except Exception as exc:  # no compiler, no ninja, a CPU the flags do not fit: PyTorch's operators still serve
        log.warning("zmqchat's CPU kernels did not build; attention runs on PyTorch's operators: %s", exc)
        return False
    # Their output's shape and dtype, for torch.compile
    torch.library.register_fake("zmqchat_kernels::planned_attention")(_planned_attention_shape)
    if hasattr(torch.ops.zmqchat_kernels, "int4_linear"):
        torch.library.register_fake("zmqchat_kernels::int4_linear")(_int4_linear_shape)
    if time.perf_counter() - started > 1:
        log.info("built zmqchat's CPU kernels in %.0f s (%s)", time.perf_counter() - started, folder)
    return True


@contextmanager
def _building(folder: Path):
    """One process at a time builds in `folder`. PyTorch's own lock is a file that a process
    killed while building (a worker stopped during its first start) leaves behind, and every
    later build then waits for it forever: this lock (flock) ends with its process, and whoever
    holds it removes a lock file left over."""
    with open(folder.with_name(folder.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (folder / "lock").unlink(missing_ok=True)
        yield


def decode_attention():
    """The decoding sequences' attention kernel (decode_attention.cpp), or None where it did not build."""
    return torch.ops.zmqchat_kernels.decode_attention.default if load() else None


def planned_attention():
    """A layer's attention for a step on a float32 pool (attention.attend_as_planned's work, in
    C++: decode_attention.cpp), or None where the kernels did not build."""
    return torch.ops.zmqchat_kernels.planned_attention.default if load() else None


def int4_linear():
    """A product with 4-bit weights in int4_linear.cpp's layout (quantize.Int4Linear), or None where
    the kernels did not build or the CPU has no AVX-512 VNNI."""
    return torch.ops.zmqchat_kernels.int4_linear.default \
        if load() and hasattr(torch.ops.zmqchat_kernels, "int4_linear") else None


def _int4_linear_shape(x, packed, _):
    """[..., N] of x [..., K] and packed [N/16, K/8, 64]."""
    return x.new_empty(*x.shape[:-1], packed.shape[0] * 16)


def _planned_attention_shape(query, *_):
    """Its output's shape and dtype, for torch.compile: [1, N, Hq, D] of query [1, Hq, N, D]."""
    return query.new_empty(1, query.shape[2], query.shape[1], query.shape[3])
