"""Whole clusters of real processes on the fake engine: load spread, serve, status."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest
from conftest import chat, free_port, wait_for

from zmqchat.policy import POLICIES


def load(url: str, requests: int, concurrency: int) -> list[str]:
    def one(i: int) -> str:
        response = httpx.post(f"{url}/v1/chat/completions", json=chat(content=f"request {i} of the load"),
                              timeout=60)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(requests)))


@pytest.mark.parametrize("policy", list(POLICIES))
def test_two_workers_both_get_work_under_every_policy(cluster, policy):
    cluster.broker("--policy", policy)
    cluster.worker("--fake-delay", "0.02", "--max-batch", "4")
    cluster.worker("--fake-delay", "0.02", "--max-batch", "4")
    cluster.api()
    answers = load(cluster.url, requests=48, concurrency=8)
    assert answers == [f"request {i} of the load" for i in range(48)]
    report = cluster.status()
    done = {w["worker_id"]: w["done"] for w in report["workers"]}
    print(f"{policy}: jobs per worker {sorted(done.values())}")
    assert len(done) == 2 and sum(done.values()) == 48
    assert min(done.values()) >= 8, f"{policy} starved a worker: {done}"
    assert report["models"]["fake"] == {"workers": 2, "slots": 8, "free": 8, "queued": 0, "max_model_len": 4096}


def test_jobs_go_only_to_workers_that_serve_their_task(cluster):
    cluster.broker()
    cluster.worker("--task", "embed", "--fake-delay", "0.02")
    cluster.api()
    client = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:  # at once: no worker generates with the model
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    assert info.value.param == "model" and "generate" in info.value.message
    cluster.worker("--task", "generate", "--fake-delay", "0.02")
    with ThreadPoolExecutor(8) as pool:
        embeddings = [pool.submit(client.embeddings.create, model="fake", input=[f"text {i}", "more"])
                      for i in range(12)]
        answers = load(cluster.url, requests=12, concurrency=4)
        assert all(len(e.result().data) == 2 for e in embeddings)
    assert answers == [f"request {i} of the load" for i in range(12)]
    done = {tuple(w["tasks"]): w["done"] for w in cluster.status()["workers"]}
    assert done == {("embed",): 12, ("generate",): 12}


def test_shortest_queue_spreads_even_one_request_at_a_time(cluster):
    # FastChat's SHORTEST_QUEUE sends every request to worker 0 while the cluster is idle.
    cluster.broker()
    cluster.worker()
    cluster.worker()
    cluster.api()
    load(cluster.url, requests=10, concurrency=1)
    assert sorted(w["done"] for w in cluster.status()["workers"]) == [5, 5]


def test_status_command_prints_a_table_and_json(cluster):
    cluster.broker()
    cluster.worker("--model-name", "echo", "--max-batch", "3")
    zmqchat = [sys.executable, "-m", "zmqchat", "status", "--broker", cluster.frontend]
    table = subprocess.run(zmqchat, capture_output=True, text=True, timeout=30, check=True).stdout
    assert "WORKER" in table and "QUEUED" in table and "echo" in table
    report = json.loads(subprocess.run([*zmqchat, "--json"], capture_output=True, text=True, timeout=30,
                                       check=True).stdout)
    assert report["models"]["echo"] == {"workers": 1, "slots": 3, "free": 3, "queued": 0, "max_model_len": 4096}
    assert report["workers"][0]["device"] == "fake"


def test_status_without_a_broker_fails_clearly(cluster):
    result = subprocess.run([sys.executable, "-m", "zmqchat", "status", "--broker", cluster.frontend],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "no broker answers" in result.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_runs_everything_and_stops_everything(cluster, sig):
    port = free_port()
    serve = cluster.spawn("serve", "serve", "--fake", "--workers", "2", "--port", str(port),
                          "--frontend", cluster.frontend, "--backend", cluster.backend)
    wait_for(lambda: "is serving" in serve.output() or serve.process.poll() is not None, 60, "serve to be ready")
    children = psutil.Process(serve.process.pid).children(recursive=True)
    assert len(children) == 4  # broker, two workers, API
    body = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat(), timeout=10).json()
    assert body["choices"][0]["message"]["content"] == "hello there world"
    assert serve.stop(sig, timeout=30) == 0
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left running: {alive}"


def test_serve_guards_the_api_with_keys_it_keeps_off_command_lines(cluster, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("from-the-file\n")
    port = free_port()
    serve = cluster.spawn("serve", "serve", "--fake", "--port", str(port), "--frontend", cluster.frontend,
                          "--backend", cluster.backend, "--api-key", "from-the-flag", "--api-key-file", str(keys))
    wait_for(lambda: "is serving" in serve.output() or serve.process.poll() is not None, 60, "serve to be ready")
    url = f"http://127.0.0.1:{port}/v1/models"
    assert httpx.get(url, timeout=10).status_code == 401
    for key in ("from-the-flag", "from-the-file"):
        assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=10).status_code == 200
    for child in psutil.Process(serve.process.pid).children(recursive=True):
        assert not any("from-the" in arg for arg in child.cmdline())
    assert serve.stop(signal.SIGTERM, timeout=30) == 0


def test_bench_reports_every_level_as_a_table_and_json(cluster, tmp_path):
    cluster.broker()
    cluster.worker("--fake-delay", "0.01")
    cluster.api()
    report_path = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "zmqchat", "bench", "--base-url", f"{cluster.url}/v1",
                          "--model", "fake", "--concurrency", "1,4", "--requests", "8", "--max-tokens", "5",
                          "--output", str(report_path)], capture_output=True, text=True, timeout=120, check=True)
    assert "out tok/s" in out.stdout and "ttft p50" in out.stdout and "itl max" in out.stdout
    levels = json.loads(report_path.read_text())["levels"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    for level in levels:
        assert level["requests"] == 8 and level["failures"] == 0, level["errors"]
        assert level["output_tokens_per_s"] > 0 and level["ttft_p50_s"] > 0 and level["itl_p50_s"] > 0
        assert level["itl_max_s"] >= level["itl_p99_s"] >= level["itl_p50_s"]
    assert sum(w["done"] for w in cluster.status()["workers"]) == 16


def test_bench_runs_each_level_again_with_a_fraction_under_a_json_schema(cluster, tmp_path):
    cluster.broker()
    cluster.worker()
    cluster.api()
    report_path = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "zmqchat", "bench", "--base-url", f"{cluster.url}/v1",
                          "--model", "fake", "--concurrency", "2", "--requests", "8", "--max-tokens", "5",
                          "--json-schema-fraction", "0.5", "--output", str(report_path)],
                         capture_output=True, text=True, timeout=120, check=True)
    assert "under a JSON schema" in out.stdout
    plain, schema = json.loads(report_path.read_text())["levels"]
    assert (plain["json_schema_fraction"], plain["failures"]) == (0.0, 0)
    # The fake cannot follow a grammar, and says so: so exactly half the requests carried the schema.
    assert schema["json_schema_fraction"] == 0.5 and schema["failures"] == 4
    assert "fake engine cannot constrain" in schema["errors"][0]


def test_bench_keeps_greedy_answers_and_compares_another_run_with_them(cluster, tmp_path):
    cluster.broker()
    cluster.worker()
    cluster.api()
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    command = [sys.executable, "-m", "zmqchat", "bench", "--base-url", f"{cluster.url}/v1", "--model", "fake",
               "--concurrency", "1", "--requests", "1", "--max-tokens", "5"]
    subprocess.run([*command, "--answers", "--output", str(first)], capture_output=True, text=True, timeout=120,
                   check=True)
    answers = json.loads(first.read_text())["answers"]
    assert len(answers) == 16 and answers[0] != answers[1] and all(answers)  # the fake echoes each prompt
    out = subprocess.run([*command, "--agreement-with", str(first), "--output", str(second)], capture_output=True,
                         text=True, timeout=120, check=True)
    assert f"replies the same as {first}'s: 16/16" in out.stdout
    assert json.loads(second.read_text())["agreement"]["identical"] == 16


def test_bench_agreement_counts_a_missing_answer_as_different_from_its_first_character():
    from zmqchat.bench import agreement

    assert agreement(["Paris is", "abc", None], ["Paris was", "abc", "x"]) == {
        "identical": 1, "prompts": 3, "mean_prefix_chars": (6 + 3 + 0) / 3}


def test_bench_spreads_the_constrained_requests_evenly():
    from zmqchat.bench import constrained

    assert [constrained(i, 0.5) for i in range(6)] == [False, True] * 3
    assert sum(constrained(i, 0.25) for i in range(16)) == 4
    assert all(constrained(i, 1.0) for i in range(5)) and not any(constrained(i, 0.0) for i in range(5))


def test_bench_counts_failures_with_their_reason(cluster, tmp_path):
    cluster.broker()
    cluster.worker()
    cluster.api()
    report_path = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "zmqchat", "bench", "--base-url", f"{cluster.url}/v1",
                    "--model", "no-such-model", "--concurrency", "2", "--requests", "4",
                    "--output", str(report_path)], capture_output=True, text=True, timeout=120, check=True)
    level = json.loads(report_path.read_text())["levels"][0]
    assert level["failures"] == 4 and "404" in level["errors"][0]
