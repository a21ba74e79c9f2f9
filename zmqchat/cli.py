"""The `zmqchat` command line: click parses options into a role's config and calls its run().

Every option can also be set by a ZMQCHAT_<COMMAND>_<OPTION> variable, e.g.
ZMQCHAT_WORKER_BROKER=tcp://10.0.0.1:5556 (shown in each command's --help).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from zmqchat import config as c
from zmqchat.config import APIConfig, BrokerConfig, ServeConfig, WorkerConfig
from zmqchat.curve import from_folder
from zmqchat.policy import POLICIES
from zmqchat.protocol import MAX_TIMEOUT, TASKS
from zmqchat.tools import PARSERS as TOOL_PARSERS

LOG_LEVELS = click.Choice(["debug", "info", "warning", "error"], case_sensitive=False)

policy_option = click.option("--policy", type=click.Choice(list(POLICIES)), default=c.POLICY,
                             show_default=True, help="How the broker picks a worker for each job.")
device_option = click.option("--device", default="auto", show_default=True,
                             help="auto (all GPUs through accelerate, else CPU), cpu, cuda, cuda:N.")
dtype_option = click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
                            default="auto", show_default=True, help="auto: bfloat16 on GPU, float32 on CPU.")
quantize_option = click.option("--quantize", type=click.Choice(c.QUANTIZE_METHODS), default="auto",
                               show_default=True, help="Linear weights in float16 (float32 arithmetic), 8 bits "
                               "(weights and activations), 4 bits (groups of 32; with --compile the fastest at few "
                               "streams) or bfloat16 (CPUs with AMX; fastest with --compile); CPU only. auto: "
                               "fp16 for a float32 model on an x86 CPU, else none. See README, Performance.")
max_batch_option = click.option("--max-batch", type=click.IntRange(1, 1024), default=None,
                                help="Sequences a worker runs at once (its slots) [default: as many as "
                                f"its KV memory holds at {c.SLOT_TOKENS} tokens each, at most "
                                f"{c.MAX_SLOTS_FROM_MEMORY}; {c.SLOTS} for --fake].")
max_tokens_option = click.option("--max-tokens-in-flight", type=click.IntRange(16), default=None,
                                 help="Tokens of KV cache a worker holds [default: half its GPU's free memory; "
                                 "on a CPU, half its free memory up to 4 GiB].")
step_tokens_option = click.option("--step-tokens", type=click.IntRange(16), default=c.STEP_TOKENS, show_default=True,
                                  help="Tokens one step runs at most: a token for each decoding sequence, prompts "
                                  "in chunks in the rest. Fewer: steadier streams while prompts arrive; more: "
                                  "faster first tokens.")
compile_option = click.option("--compile", "compile_step", is_flag=True,
                               help="Compile the model's step with torch.compile at start, and on a CPU steps of "
                               "decodes only ahead of time too (minutes on a CPU; eager if it fails). See README, "
                               "Performance.")
model_name_option = click.option("--model-name", help="Name clients use for the model [default: the folder's name].")
fake_option = click.option("--fake", is_flag=True, help="Serve a fake engine that echoes the user (tests, benchmarks).")
fake_delay_option = click.option("--fake-delay", type=float, default=c.FAKE_DELAY, show_default=True,
                                 help="Seconds per step of the fake engine.")
drain_option = click.option("--drain-timeout", type=click.FloatRange(0), default=None,
                            help="Seconds work in flight gets to finish after SIGTERM "
                            f"[worker {c.WORKER_DRAIN_TIMEOUT:.0f}, api {c.API_DRAIN_TIMEOUT:.0f}].")
curve_option = click.option("--curve", "curve_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                            help="Turn CURVE on with the keys in this folder (see `zmqchat keys`) [default: off].")


def curve_name_option(default: str):
    return click.option("--curve-name", default=default, help="Whose key pair in the --curve folder to use.")


def set_log_level(ctx: click.Context, param, value: str) -> str:
    c.configure_logging(value)
    return value.lower()


log_level_option = click.option("--log-level", type=LOG_LEVELS, default=c.LOG_LEVEL, callback=set_log_level,
                                is_eager=True, help="Least severe log level printed.")
api_key_option = click.option("--api-key", "api_keys", multiple=True,
                              help="Require this Bearer key on every route but /, /web/ and /health (repeatable).")
api_key_file_option = click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                                   default=None, help="Also accept the keys in this file, one per line "
                                   "(# starts a comment). Keeps keys off the command line.")

response_store_option = click.option(
    "--response-store", "response_store_size", type=click.IntRange(0), default=c.RESPONSE_STORE_SIZE,
    help="Finished Responses-API responses kept in memory for previous_response_id and GET /v1/responses/{id} "
    "(the most recently used); 0 keeps none.")


def api_guard_options(command):
    """The options of `api` and `serve` that guard the API (who may reach what, and how long and how
    many clients may hold it), and how it reads tool calls. Each is named as its APIConfig field: a
    command passes them on as **guards."""
    options = [
        click.option("--header-timeout", type=click.FloatRange(0.1), default=c.HEADER_TIMEOUT,
                     help="Seconds a client gets to send a request's headers; then its connection is closed."),
        click.option("--body-timeout", type=click.FloatRange(0.1), default=c.BODY_TIMEOUT,
                     help="Seconds a client gets to send a request's whole body; then it gets 408."),
        click.option("--max-connections", type=click.IntRange(1), default=c.MAX_CONNECTIONS,
                     help="Open HTTP connections served at once; a request on one more gets 503. "
                     "Keep it under the open-files limit (ulimit -n)."),
        click.option("--public-metrics", is_flag=True,
                     help="Serve /metrics without a key when API keys are set (the API docs still need one)."),
        click.option("--insecure", is_flag=True, help="Listen on a non-loopback --host without API keys "
                     "(with serve, the broker's addresses without CURVE too): anyone who reaches it may use it."),
        click.option("--tool-parser", type=click.Choice(sorted(TOOL_PARSERS)), default="auto", show_default=True,
                     help="The format of the models' tool calls: auto reads Hermes' <tool_call>, Mistral's "
                     "[TOOL_CALLS] and Llama 3's JSON alike."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def api_config(**fields) -> APIConfig:
    """The API's config, unless it listens beyond loopback without API keys and --insecure is not set."""
    from zmqchat.api import exposure

    config = APIConfig(**fields)
    if not config.insecure and (exposed := exposure(config)):
        raise click.UsageError(f"{exposed}. Set --api-key or --api-key-file, listen on a loopback --host "
                               "(127.0.0.1), or pass --insecure to serve it so all the same.")
    return config


def comma_separated_ints(ctx: click.Context, param: click.Parameter, value: str) -> list[int]:
    try:
        numbers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise click.BadParameter("use comma-separated positive integers, e.g. 1,8,16")
    return numbers


def all_api_keys(api_keys: tuple[str, ...], api_key_file: Path | None) -> tuple[str, ...]:
    from zmqchat.api import read_api_keys

    try:
        keys = tuple(api_keys) + tuple(read_api_keys(api_key_file) if api_key_file else ())
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--api-key-file") from None
    if any(len(key.split()) != 1 for key in keys):
        raise click.BadParameter("an API key may not be empty or hold spaces", param_hint="--api-key")
    return keys


@click.group(context_settings={"auto_envvar_prefix": "ZMQCHAT", "show_default": True,
                               "help_option_names": ["-h", "--help"]})
def main() -> None:
    """zmqchat: serve chat models from a cluster, over ZeroMQ, behind an OpenAI API."""


@main.command()
@click.option("--frontend", default=c.FRONTEND, help="Address API frontends connect to.")
@click.option("--backend", default=c.BACKEND, help="Address workers connect to.")
@policy_option
@click.option("--max-queue", type=click.IntRange(1), default=c.MAX_QUEUE, help="Jobs waiting per model before 503.")
@click.option("--no-worker-grace", type=click.FloatRange(0), default=c.NO_WORKER_GRACE,
              help="Seconds the queued jobs of a model whose last worker left wait for another before 503.")
@curve_option
@click.option("--insecure", is_flag=True, help="Listen beyond loopback without CURVE: anyone who reaches the "
              "ports may join as a worker and read prompts.")
@log_level_option
def broker(frontend: str, backend: str, policy: str, max_queue: int, no_worker_grace: float, curve_dir,
           insecure: bool, log_level) -> None:
    """Run the broker: it tracks workers and dispatches jobs to them.

    With --curve, SIGHUP (or any change to the key folders) reads the admitted keys again."""
    from zmqchat import broker as role

    role.run(BrokerConfig(frontend=frontend, backend=backend, policy=policy, max_queue=max_queue,
                          no_worker_grace=no_worker_grace, curve=from_folder(curve_dir, "broker"), insecure=insecure))


@main.command()
@click.argument("model_path", required=False)
@model_name_option
@click.option("--broker", default=c.BACKEND, help="The broker's worker address.")
@device_option
@dtype_option
@quantize_option
@max_batch_option
@max_tokens_option
@step_tokens_option
@compile_option
@drain_option
@click.option("--task", type=click.Choice(["all", *TASKS]), default="all", show_default=True,
              help="Serve the model for generation (chat, completions), for embeddings, or both.")
@fake_option
@fake_delay_option
@curve_option
@curve_name_option("worker")
@log_level_option
def worker(model_path, model_name, broker, device, dtype, quantize, max_batch, max_tokens_in_flight, step_tokens,
           compile_step, drain_timeout, task, fake, fake_delay, curve_dir, curve_name, log_level) -> None:
    """Run a worker serving MODEL_PATH (a model folder, a hub id or a GGUF file).

    With no MODEL_PATH it serves the embedded default model, SmolLM2-135M-Instruct.
    SIGTERM or Ctrl-C drains it (no new jobs, those in flight finish); a second one stops it."""
    from zmqchat import worker as role

    role.run(WorkerConfig(
        model_path=model_path, model_name=model_name, broker=broker, device=device, dtype=dtype, quantize=quantize,
        max_batch=max_batch, max_tokens_in_flight=max_tokens_in_flight, step_tokens=step_tokens,
        compile=compile_step, fake=fake, fake_delay=fake_delay, tasks=TASKS if task == "all" else (task,),
        drain_timeout=c.WORKER_DRAIN_TIMEOUT if drain_timeout is None else drain_timeout,
        curve=from_folder(curve_dir, curve_name)))


@main.command()
@click.option("--host", default=c.HOST, help="Interface to listen on.")
@click.option("--port", type=int, default=c.PORT, help="HTTP port.")
@click.option("--broker", default=c.FRONTEND, help="The broker's frontend address.")
@api_key_option
@api_key_file_option
@click.option("--timeout", "request_timeout", type=click.FloatRange(0.1, MAX_TIMEOUT), default=c.REQUEST_TIMEOUT,
              help="Seconds a request may take before it fails with 504.")
@response_store_option
@api_guard_options
@drain_option
@curve_option
@curve_name_option("api")
@log_level_option
def api(host, port, broker, api_keys, api_key_file, request_timeout, response_store_size, drain_timeout, curve_dir,
        curve_name, log_level, **guards) -> None:
    """Run the OpenAI-compatible HTTP API in front of the broker.

    SIGTERM stops taking connections and lets open requests finish (--drain-timeout)."""
    from zmqchat import api as role

    role.run(api_config(host=host, port=port, broker=broker, api_keys=all_api_keys(api_keys, api_key_file),
                        request_timeout=request_timeout, response_store_size=response_store_size,
                        log_level=log_level, drain_timeout=c.API_DRAIN_TIMEOUT if drain_timeout is None else drain_timeout,
                        curve=from_folder(curve_dir, curve_name), **guards))


@main.command()
@click.argument("model_path", required=False)
@model_name_option
@click.option("--workers", type=click.IntRange(1), default=1, help="Workers to start, each with its own copy.")
@click.option("--host", default=c.HOST, help="Interface the API listens on.")
@click.option("--port", type=int, default=c.PORT, help="HTTP port of the API.")
@click.option("--frontend", default=c.FRONTEND, help="Broker address for the API.")
@click.option("--backend", default=c.BACKEND, help="Broker address for the workers.")
@policy_option
@device_option
@dtype_option
@quantize_option
@max_batch_option
@max_tokens_option
@step_tokens_option
@compile_option
@api_key_option
@api_key_file_option
@response_store_option
@api_guard_options
@fake_option
@fake_delay_option
@click.option("--curve", "curve_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Turn CURVE on between the parts, with keys in this folder (created if missing).")
@log_level_option
def serve(model_path, model_name, workers, host, port, frontend, backend, policy, device, dtype, quantize,
          max_batch, max_tokens_in_flight, step_tokens, compile_step, api_keys, api_key_file, response_store_size, fake,
          fake_delay, curve_dir, log_level, **guards) -> None:
    """Run broker, workers and API on this machine; Ctrl-C stops them all."""
    from zmqchat import serve as role

    sys.exit(role.run(ServeConfig(
        broker=BrokerConfig(frontend=frontend, backend=backend, policy=policy, insecure=guards["insecure"]),
        worker=WorkerConfig(model_path=model_path, model_name=model_name, device=device, dtype=dtype,
                            quantize=quantize, max_batch=max_batch, max_tokens_in_flight=max_tokens_in_flight,
                            step_tokens=step_tokens, compile=compile_step, fake=fake, fake_delay=fake_delay),
        api=api_config(host=host, port=port, api_keys=all_api_keys(api_keys, api_key_file),
                       response_store_size=response_store_size, **guards),
        workers=workers, curve_dir=curve_dir, log_level=log_level)))


@main.command()
@click.option("--broker", default=c.FRONTEND, help="The broker's frontend address.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
@click.option("--watch", type=float, default=None, help="Refresh every this many seconds.")
@curve_option
@curve_name_option("status")
@log_level_option
def status(broker: str, as_json: bool, watch: float | None, curve_dir, curve_name, log_level) -> None:
    """Show workers, models, free slots and queue depth."""
    import msgspec

    from zmqchat.client import BrokerError, fetch_status

    curve = from_folder(curve_dir, curve_name)
    while True:
        try:
            report = fetch_status(broker, curve=curve)
        except BrokerError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(json.dumps(msgspec.to_builtins(report), indent=2) if as_json else format_status(report))
        if not watch:
            return
        time.sleep(watch)
        click.clear()


def format_status(report) -> str:
    rows = [("WORKER", "MODELS", "DEVICE", "BUSY", "FREE", "DONE", "HEARD")]
    for w in report.workers:
        rows.append((w.worker_id, ",".join(w.models), w.device, str(w.slots - w.free),
                     str(w.free), str(w.done), f"{w.last_heard:.1f}s ago"))
    rows.append(("", "", "", "", "", "", ""))
    rows.append(("MODEL", "WORKERS", "SLOTS", "FREE", "QUEUED", "", ""))
    for name, m in sorted(report.models.items()):
        rows.append((name, str(m.workers), str(m.slots), str(m.free), str(m.queued), "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return f"policy: {report.policy}\n" + "\n".join(lines)


@main.command()
@click.option("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
@click.option("--model", required=True, help="Model name to request.")
@click.option("--concurrency", default="1,8", callback=comma_separated_ints, help="Comma-separated concurrency levels.")
@click.option("--requests", type=click.IntRange(1), default=None,
              help="Requests per level [default: 4 x concurrency, at least 8].")
@click.option("--max-tokens", type=click.IntRange(1), default=64)
@click.option("--temperature", type=click.FloatRange(0, 2), default=1.0, help="Sent with every request.")
@click.option("--ignore-eos", is_flag=True, help="Ask for exactly --max-tokens tokens per request "
              "(vLLM's `ignore_eos` extension, which zmqchat serves too).")
@click.option("--stream/--no-stream", default=True, help="Stream responses (needed for TTFT and ITL).")
@click.option("--json-schema-fraction", type=click.FloatRange(0, 1), default=0.0,
              help="Also run each level with this fraction of the requests under a JSON schema "
                   "(response_format), after the same level with none: the cost of constraints.")
@click.option("--api-key", default=None, help="Bearer key, if the server wants one.")
@click.option("--output", type=click.Path(dir_okay=False), default=None, help="Write the report as JSON here.")
@click.option("--ceiling", is_flag=True, help="Also time the bare model here, in a worker's default weights: "
              "prefill, and batched decode at the highest concurrency (run it on the server's machine).")
@click.option("--ceiling-model", default=None, help="Model for --ceiling [default: the embedded default model].")
@click.option("--answers", is_flag=True, help="Then ask each prompt once at temperature 0, all at once, and keep "
              "the replies in the report (--output).")
@click.option("--agreement-with", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A report written with --answers: say how many of this server's replies are the same "
                   "(implies --answers).")
@device_option
@log_level_option
def bench(base_url, model, concurrency, requests, max_tokens, temperature, ignore_eos, stream, json_schema_fraction,
          api_key, output, ceiling, ceiling_model, answers, agreement_with, device, log_level) -> None:
    """Load an OpenAI-compatible server and report throughput and latencies."""
    from zmqchat import bench as role

    role.run(role.BenchConfig(base_url=base_url, model=model, concurrency=concurrency, requests=requests,
                              max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos,
                              stream=stream, json_schema_fraction=json_schema_fraction, api_key=api_key, output=output,
                              ceiling=ceiling, ceiling_model=ceiling_model, ceiling_device=device, answers=answers,
                              agreement_with=agreement_with))


@main.command("bench-weights")
@click.argument("model_path", required=False)
@click.option("--weights", default=",".join(m for m in c.QUANTIZE_METHODS if m != "auto"), show_default=True,
              callback=lambda ctx, param, value: [w.strip() for w in value.split(",") if w.strip()],
              help="Comma-separated weight formats; the first is the reference for agreement.")
@click.option("--batch", default="1,16", callback=comma_separated_ints, help="Comma-separated batch sizes.")
@click.option("--max-tokens", type=click.IntRange(2), default=64, show_default=True)
@device_option
@log_level_option
def bench_weights(model_path, weights, batch, max_tokens, device, log_level) -> None:
    """Time the bare model's batched greedy decode in each weight format (--quantize), and
    report each format's greedy agreement with the first over the benchmark prompts."""
    from zmqchat import bench as role

    if unknown := sorted(set(weights) - set(c.QUANTIZE_METHODS)):
        raise click.BadParameter(f"unknown {', '.join(unknown)}; choose from {', '.join(c.QUANTIZE_METHODS)}",
                                 param_hint="--weights")
    role.compare_weights(model_path, weights, batch, max_tokens, device)


@main.command()
@click.argument("name")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=Path("keys"),
              help="Folder to write the keys in.")
@click.option("--role", type=click.Choice(["worker", "frontend"]), default=None,
              help="Also admit the public key, in the folder's workers/ or frontends/ (for a broker's folder).")
def keys(name: str, folder: Path, role: str | None) -> None:
    """Write a CURVE key pair, NAME.key (public) and NAME.key_secret (owner-only), for a broker,
    worker or frontend.

    Name the broker's pair `broker`. The broker's folder holds broker.key_secret, and the public
    keys it admits: workers' in workers/, frontends' (APIs, `zmqchat status`) in frontends/.
    Each worker and frontend holds its own pair and broker.key. Removing a key from the broker's
    folder revokes it at the broker's next heartbeat."""
    from zmqchat.curve import create_keys

    public, secret = create_keys(name, folder, role)
    click.echo(f"public key: {public}\nsecret key: {secret} (keep it on this machine only)")


@main.command("prepare-model")
@click.argument("model_path", required=False)
@log_level_option
def prepare_model(model_path: str | None, log_level: str) -> None:
    """Convert and cache a model (default: the embedded one) so workers start in seconds."""
    from zmqchat import models

    source, name = models.resolve(model_path, None)
    click.echo(f"{name}: {source}")
