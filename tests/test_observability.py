"""What an operator sees: Prometheus metrics after real requests, and request ids in logs."""

from __future__ import annotations

import httpx
from conftest import chat
from prometheus_client.parser import text_string_to_metric_families

from zmqchat.api.errors import LOGGED_MESSAGE


def scrape(url: str) -> dict:
    """{(sample name, sorted labels): value} from /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_what_happened(cluster):
    cluster.broker()
    cluster.worker("--fake-delay", "0.01", "--max-batch", "3")
    cluster.api()
    usage = []
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        for words in ("one two three", "four five"):
            usage.append(client.post("/v1/chat/completions", json=chat(content=words)).json()["usage"])
        usage.append(client.post("/v1/chat/completions", json=chat(content="a b c d e", max_tokens=2)).json()["usage"])
        with client.stream("POST", "/v1/chat/completions", json=chat(content="six seven", stream=True)) as r:
            r.read()
        assert client.post("/v1/chat/completions", json=chat(model="nope")).status_code == 404
    m = scrape(cluster.url)
    fake = (("model", "fake"),)
    assert m[("zmqchat:requests_total", (("model", "fake"), ("outcome", "stop")))] == 3
    assert m[("zmqchat:requests_total", (("model", "fake"), ("outcome", "length")))] == 1
    assert m[("zmqchat:requests_total", (("model", "unknown"), ("outcome", "model_not_found")))] == 1
    assert m[("zmqchat:prompt_tokens_total", fake)] == sum(u["prompt_tokens"] for u in usage) + 2
    assert m[("zmqchat:generation_tokens_total", fake)] == sum(u["completion_tokens"] for u in usage) + 3
    assert m[("zmqchat:time_to_first_token_seconds_count", fake)] == 4
    assert m[("zmqchat:e2e_request_latency_seconds_count", fake)] == 4
    assert 0 < m[("zmqchat:e2e_request_latency_seconds_sum", fake)] < 10
    assert m[("zmqchat:inter_token_latency_seconds_count", fake)] == 2 + 1 + 1 + 1  # gaps between words
    assert m[("zmqchat:num_workers", fake)] == 1
    assert m[("zmqchat:num_free_slots", fake)] == 3
    assert m[("zmqchat:num_requests_running", fake)] == 0
    assert m[("zmqchat:num_requests_waiting", fake)] == 0
    assert m[("zmqchat:broker_up", ())] == 1


def test_client_chosen_model_names_are_no_labels(cluster):
    cluster.broker()
    cluster.worker()
    part = cluster.api()
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        assert client.post("/v1/chat/completions", json=chat()).status_code == 200
        before = len(client.get("/metrics").text)
        for i in range(300):
            assert client.post("/v1/chat/completions", json=chat(model=f"no-such-model-{i}")).status_code == 404
        assert client.post("/v1/chat/completions", json=chat(model="x" * 256)).status_code == 404
        assert client.post("/v1/chat/completions", json=chat(model="y" * 300)).status_code == 400
        text = client.get("/metrics").text
    assert "no-such-model" not in text and "xxx" not in text and "yyy" not in text
    assert len(text) < before + 1000  # a few series for model="unknown", not 300
    m = scrape(cluster.url)
    unknown = lambda outcome: m[("zmqchat:requests_total", (("model", "unknown"), ("outcome", outcome)))]  # noqa: E731
    assert unknown("model_not_found") == 301 and unknown("invalid_request") == 1
    assert m[("zmqchat:requests_total", (("model", "fake"), ("outcome", "stop")))] == 1
    logged = part.output()
    assert "x" * 40 in logged and "x" * LOGGED_MESSAGE not in logged  # the 256 characters, cut short


def test_a_request_id_follows_the_request_through_every_log(cluster):
    cluster.broker("--log-level", "debug")
    cluster.worker("--log-level", "debug")
    cluster.api("--log-level", "debug")
    body = httpx.post(f"{cluster.url}/v1/chat/completions", json=chat(), timeout=10).json()
    request_id = body["id"].removeprefix("chatcmpl-")
    for part in cluster.parts:
        lines = [line for line in part.output().splitlines() if request_id in line]
        assert lines, f"{part.name} never logged request {request_id}"
    broker_log = cluster.parts[0].output()
    assert "joined" in broker_log


def test_interleaved_choices_are_timed_each_against_itself():
    from zmqchat.metrics import Metrics, RequestMetrics

    metrics = Metrics()
    timing = RequestMetrics(metrics, "m")
    for choice in (0, 1, 2, 0, 1, 2):  # n=3, two pieces each, interleaved
        timing.output(choice)
    samples = {s.name: s.value for family in metrics.registry.collect() for s in family.samples}
    assert samples["zmqchat:time_to_first_token_seconds_count"] == 1  # one request, one first token
    assert samples["zmqchat:inter_token_latency_seconds_count"] == 3  # one gap per choice, not five
