"""`zmqchat bench`: load for any OpenAI-compatible server (zmqchat, FastChat, vLLM), measured.

For each concurrency level it keeps that many chat requests in flight, drawn in turn from a
fixed built-in prompt set, until `requests` have been sent; then it reports requests/s,
output tokens/s, end-to-end latency, time to first token and inter-token latency (p50 and
p99), and failures. Output tokens are the server's own `usage.completion_tokens`. With a
`json_schema_fraction`, each level runs a second time with that fraction of its requests
under a JSON schema (structured output), spread evenly: the cost of constraints, measured
against the same load with none. With `answers`, it then asks each prompt once at temperature
0 and keeps the replies in its report; with `agreement_with` another report, it says how many
replies are the same as that report's: servers or weight formats compared on what they answer,
not only on how fast.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

from zmqchat import models

PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
    "What is 17 times 23? Show your working.",
    "Describe a cat to someone who has never seen one.",
    "Give me a short recipe for pancakes.",
    "What are the planets of the solar system?",
    "Translate 'good morning' into Spanish, French and German.",
    "Why do leaves change colour in autumn?",
    "Write a limerick about a programmer.",
    "What is the difference between weather and climate?",
    "Suggest a name for a small bakery.",
    "How does a bicycle stay upright?",
    "Summarise the story of Cinderella in three sentences.",
    "What should I pack for a weekend of hiking?",
]
# What constrained requests must answer in: open strings, so the model writes as much as it likes.
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"topic": {"type": "string"}, "answer": {"type": "string"},
                   "facts": {"type": "array", "items": {"type": "string"}}},
    "required": ["topic", "answer", "facts"],
    "additionalProperties": False,
}


@dataclass
class BenchConfig:
    base_url: str
    model: str
    concurrency: list[int] = field(default_factory=lambda: [1, 8])
    requests: int | None = None  # per level; default 4 x concurrency, at least 8
    max_tokens: int = 64
    temperature: float = 1.0  # sent with every request, so every server gets the same work
    ignore_eos: bool = False  # ask for exactly max_tokens (vLLM's extension; zmqchat has it)
    stream: bool = True
    json_schema_fraction: float = 0.0  # >0: each level again, with this fraction under ANSWER_SCHEMA
    api_key: str | None = None
    timeout: float = 600.0
    output: str | None = None
    ceiling: bool = False  # also time the bare model in this process, after the load
    ceiling_model: str | None = None  # default: the embedded default model
    ceiling_device: str = "auto"
    answers: bool = False  # also keep each prompt's reply at temperature 0 in the report
    agreement_with: str | None = None  # a report with answers: how many of ours are the same (implies answers)


@dataclass
class Result:
    ok: bool
    latency: float
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


@dataclass
class LevelReport:
    concurrency: int
    json_schema_fraction: float
    requests: int
    failures: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    itl_p99_s: float | None
    itl_max_s: float | None  # the worst gap between two tokens of a stream: what chunked prefill bounds
    errors: list[str]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def constrained(index: int, fraction: float) -> bool:
    """Whether request `index` is under the schema: `fraction` of them, spread evenly."""
    return int((index + 1) * fraction) > int(index * fraction)


def server_client(config: BenchConfig, connections: int) -> httpx.AsyncClient:
    """A client of the server under test, with its key if it wants one, and one connection per
    request in flight."""
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    return httpx.AsyncClient(base_url=config.base_url.rstrip("/"), headers=headers, timeout=config.timeout,
                             limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections))


async def one_request(client: httpx.AsyncClient, config: BenchConfig, prompt: str, schema: bool = False) -> Result:
    body = {"model": config.model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": config.max_tokens, "temperature": config.temperature, "stream": config.stream}
    if schema:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA}}
    if config.ignore_eos:
        body["ignore_eos"] = True
    if config.stream:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    try:
        if not config.stream:
            response = await client.post("/chat/completions", json=body)
            if response.status_code != 200:
                return Result(False, time.perf_counter() - started, error=f"{response.status_code} {response.text[:200]}")
            return Result(True, time.perf_counter() - started,
                          output_tokens=response.json()["usage"]["completion_tokens"])
        return await read_stream(client, body, started)
    except (httpx.HTTPError, KeyError, ValueError) as exc:
        return Result(False, time.perf_counter() - started, error=repr(exc)[:200])


async def read_stream(client: httpx.AsyncClient, body: dict, started: float) -> Result:
    result = Result(True, 0.0)
    last = None
    async with client.stream("POST", "/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            return Result(False, time.perf_counter() - started, error=f"{response.status_code} {text[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return Result(False, time.perf_counter() - started, error=str(chunk["error"])[:200])
            if chunk.get("usage"):
                result.output_tokens = chunk["usage"]["completion_tokens"]
            if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                now = time.perf_counter()
                if last is None:
                    result.ttft = now - started
                else:
                    result.gaps.append(now - last)
                last = now
    result.latency = time.perf_counter() - started
    return result


async def run_level(config: BenchConfig, concurrency: int, fraction: float = 0.0) -> LevelReport:
    total = config.requests or max(8, 4 * concurrency)
    results: list[Result] = []
    next_index = 0

    async def user(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < total:
            index, next_index = next_index, next_index + 1
            results.append(await one_request(client, config, PROMPTS[index % len(PROMPTS)],
                                             constrained(index, fraction)))

    async with server_client(config, concurrency) as client:
        started = time.perf_counter()
        await asyncio.gather(*(user(client) for _ in range(concurrency)))
        duration = time.perf_counter() - started
    ok = [r for r in results if r.ok]
    latencies = [r.latency for r in ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    return LevelReport(
        concurrency=concurrency, json_schema_fraction=fraction, requests=total, failures=total - len(ok), duration_s=round(duration, 3),
        requests_per_s=len(ok) / duration, output_tokens_per_s=sum(r.output_tokens for r in ok) / duration,
        latency_p50_s=percentile(latencies, 50), latency_p99_s=percentile(latencies, 99),
        ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile(gaps, 50), itl_p99_s=percentile(gaps, 99), itl_max_s=max(gaps, default=None),
        errors=sorted({r.error for r in results if not r.ok})[:5],
    )


async def greedy_answers(config: BenchConfig) -> list[str | None]:
    """Each of PROMPTS answered once at temperature 0, all asked at once (a batch, as the
    weight formats' agreement is measured); None where the server gave no answer."""

    async def ask(client: httpx.AsyncClient, prompt: str) -> str | None:
        body = {"model": config.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": config.max_tokens, "temperature": 0}
        try:
            response = await client.post("/chat/completions", json=body)
            return response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            return None

    async with server_client(config, len(PROMPTS)) as client:
        return list(await asyncio.gather(*(ask(client, prompt) for prompt in PROMPTS)))


def agreement(answers: list[str | None], reference: list[str | None]) -> dict:
    """How many answers are the same as the reference's, and their mean common prefix in
    characters (an answer missing on either side counts as differing from its first character)."""
    prefixes = [0 if a is None or r is None else next((i for i, (x, y) in enumerate(zip(a, r)) if x != y),
                                                      min(len(a), len(r)))
                for a, r in zip(answers, reference)]
    identical = sum(a is not None and a == r for a, r in zip(answers, reference))
    return {"identical": identical, "prompts": len(prefixes), "mean_prefix_chars": statistics.mean(prefixes)}


def format_table(reports: list[LevelReport]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    rows = [("conc", "schema", "reqs", "fail", "req/s", "out tok/s", "lat p50", "lat p99", "ttft p50", "ttft p99",
             "itl p50", "itl p99", "itl max")]
    for r in reports:
        rows.append((str(r.concurrency), f"{r.json_schema_fraction:.0%}", str(r.requests), str(r.failures), f"{r.requests_per_s:.2f}",
                     f"{r.output_tokens_per_s:.1f}", ms(r.latency_p50_s), ms(r.latency_p99_s),
                     ms(r.ttft_p50_s), ms(r.ttft_p99_s), ms(r.itl_p50_s), ms(r.itl_p99_s),
                     ms(r.itl_max_s)))
    return "\n".join(right_aligned(rows)) + "\n(latencies in ms)"


def right_aligned(rows: list[tuple[str, ...]]) -> list[str]:
    """The rows as lines of a table, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]


def measure_ceiling(loaded, batch: int, max_tokens: int, prompts: list[list[int]] | None = None) -> dict:
    """What the bare model (`loaded`, a models.LoadedModel) does with no serving around it: the
    mean prefill time of one prompt (the floor for time to first token) and a plain batched
    greedy decode loop at `batch` over the same prompts (the ceiling for output tokens/s), with
    each row's tokens. The prompts are token ids; by default PROMPTS in the model's chat template."""
    import torch
    from transformers import DynamicCache

    from zmqchat.quantize import step_rows

    model, tokenizer, dev = loaded.model, loaded.tokenizer, loaded.device
    cache_arg = models.cache_argument(model)
    prompts = prompts or [
        tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                add_generation_prompt=True), add_special_tokens=False).input_ids
        for p in PROMPTS]

    def forward(ids, mask, cache):
        step_rows(ids.numel())  # int4's layers, as in the engine: the few rows' format or the many's
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{cache_arg: cache})
        return out.logits[:, -1].argmax(-1, keepdim=True)

    def sync():
        if dev.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        prefill_times = []
        for ids in [prompts[0]] + prompts:  # the first call warms up
            started = time.perf_counter()
            forward(torch.tensor([ids], device=dev), torch.ones(1, len(ids), dtype=torch.long, device=dev),
                    DynamicCache())
            sync()
            prefill_times.append(time.perf_counter() - started)
        rows = [prompts[i % len(prompts)] for i in range(batch)]
        width = max(map(len, rows))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rows], device=dev)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=dev)
        cache = DynamicCache()
        tokens = [forward(ids, mask, cache)]
        sync()
        started = time.perf_counter()
        for _ in range(max_tokens - 1):
            mask = torch.nn.functional.pad(mask, (0, 1), value=1)
            tokens.append(forward(tokens[-1], mask, cache))
        sync()
        decode = time.perf_counter() - started
    return {"model": loaded.name, "device": loaded.description, "batch": batch,
            "prefill_ms_mean": 1000 * statistics.mean(prefill_times[1:]),
            "decode_step_ms": 1000 * decode / (max_tokens - 1),
            "decode_tokens_per_s": batch * (max_tokens - 1) / decode,
            "tokens": torch.cat(tokens, 1).tolist()}


def compare_weights(model_path: str | None, formats: list[str], batches: list[int], max_tokens: int,
                    device: str = "auto") -> list[dict]:
    """Per weight format: the bare model's decode tokens/s at each batch size, and its greedy
    agreement with the first format over the built-in prompts (prompts whose first
    `max_tokens` tokens are identical, and the mean length of the identical prefix)."""
    rows, reference = [], None
    for weights in formats:
        loaded = models.load(model_path, device=device, quantize=weights)  # once per format
        runs = {batch: measure_ceiling(loaded, batch, max_tokens)
                for batch in sorted(set(batches) | {len(PROMPTS)})}
        answers = runs[len(PROMPTS)]["tokens"]
        reference = reference or answers
        prefixes = [next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), max_tokens)
                    for mine, theirs in zip(answers, reference)]
        rows.append({"weights": weights, "device": runs[len(PROMPTS)]["device"],
                     "tokens_per_s": {b: runs[b]["decode_tokens_per_s"] for b in batches},
                     "identical": sum(p == max_tokens for p in prefixes), "prompts": len(prefixes),
                     "mean_prefix": statistics.mean(prefixes)})
        print(format_weights_row(rows[-1], formats[0], max_tokens), flush=True)
    return rows


def format_weights_row(row: dict, reference: str, max_tokens: int) -> str:
    speeds = ", ".join(f"batch {b}: {v:.1f} tok/s" for b, v in row["tokens_per_s"].items())
    return (f"{row['weights']:>5} ({row['device']}): {speeds}; greedy agreement with {reference} over "
            f"{max_tokens} tokens: {row['identical']}/{row['prompts']} prompts identical, "
            f"mean identical prefix {row['mean_prefix']:.1f} tokens")


def run(config: BenchConfig) -> dict:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    reports = []
    fractions = [0.0] + ([config.json_schema_fraction] if config.json_schema_fraction else [])
    for concurrency in config.concurrency:
        for fraction in fractions:
            print(f"concurrency {concurrency}, {fraction:.0%} under a JSON schema: running...", flush=True)
            reports.append(asyncio.run(run_level(config, concurrency, fraction)))
    print(format_table(reports))
    if len(fractions) == 2:  # each level's report without, then with the schema
        for plain, schema in zip(reports[::2], reports[1::2]):
            print(f"concurrency {plain.concurrency}: {schema.output_tokens_per_s:.1f} tok/s with "
                  f"{schema.json_schema_fraction:.0%} under a JSON schema, {plain.output_tokens_per_s:.1f} with none "
                  f"({schema.output_tokens_per_s / max(plain.output_tokens_per_s, 1e-9):.2f}x)")
    result = {"config": asdict(config), "levels": [asdict(r) for r in reports]}
    if config.answers or config.agreement_with:
        print(f"each of the {len(PROMPTS)} prompts at temperature 0, all at once...", flush=True)
        result["answers"] = asyncio.run(greedy_answers(config))
        print(f"answered {sum(a is not None for a in result['answers'])} of {len(PROMPTS)}")
    if config.agreement_with:
        with open(config.agreement_with) as file:
            reference = json.load(file)["answers"]
        same = result["agreement"] = agreement(result["answers"], reference)
        print(f"replies the same as {config.agreement_with}'s: {same['identical']}/{same['prompts']}; "
              f"mean common prefix {same['mean_prefix_chars']:.0f} characters")
    if config.ceiling:
        batch = max(config.concurrency)
        print(f"bare model: prefill and batched decode at batch {batch}...", flush=True)
        loaded = models.load(config.ceiling_model, device=config.ceiling_device, quantize="auto")  # as a worker does
        ceiling = result["ceiling"] = measure_ceiling(loaded, batch, config.max_tokens)
        print(f"bare model {ceiling['model']} on {ceiling['device']}: prefill {ceiling['prefill_ms_mean']:.0f} ms "
              f"per prompt; decode at batch {batch}: {ceiling['decode_step_ms']:.0f} ms/step, "
              f"{ceiling['decode_tokens_per_s']:.1f} tokens/s")
        top = next(r for r in reports if r.concurrency == batch and not r.json_schema_fraction)
        print(f"served / bare at {batch} streams: {top.output_tokens_per_s / ceiling['decode_tokens_per_s']:.2f}")
        single = next((r for r in reports if r.concurrency == 1 and not r.json_schema_fraction and r.ttft_p50_s), None)
        if single:
            print(f"TTFT p50 at concurrency 1 minus bare prefill: "
                  f"{single.ttft_p50_s * 1000 - ceiling['prefill_ms_mean']:+.0f} ms")
        if len(reports) > 1 and reports[0].concurrency == 1:
            print(f"served tokens/s at {batch} streams / at 1: {top.output_tokens_per_s / reports[0].output_tokens_per_s:.1f}x")
    if config.output:
        with open(config.output, "w") as out:
            json.dump(result, out, indent=2)
        print(f"wrote {config.output}")
    return result
