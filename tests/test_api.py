"""The OpenAI API over a real broker and fake-engine workers: responses, streams, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from conftest import chat, free_port, wait_for

LONG = " ".join(f"w{i}" for i in range(200))


@pytest.fixture(scope="module")
def api(module_cluster):
    """Broker, one fast fake worker and the API; returns an HTTP client on the API."""
    module_cluster.broker()
    module_cluster.worker("--fake-delay", "0.005")
    module_cluster.api()
    with httpx.Client(base_url=module_cluster.url, timeout=30) as client:
        yield client


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def test_chat_completion(api):
    body = api.post("/v1/chat/completions", json=chat(content="hello there world")).json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "hello there world"}
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["completion_tokens"] == 4  # three words and the end-of-sequence token
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_stream_follows_openai_chunk_format(api):
    with api.stream("POST", "/v1/chat/completions",
                    json=chat(content="one two three four", stream=True,
                              stream_options={"include_usage": True})) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    with_choices = [c for c in chunks if c["choices"]]
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices if c["choices"][0]["finish_reason"]]
    assert finishes == ["stop"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in with_choices)
    assert text == "one two three four"
    usage = chunks[-1]["usage"]  # include_usage: a last chunk with no choices carries usage
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 5


def test_max_tokens_ends_with_length(api):
    body = api.post("/v1/chat/completions", json=chat(content=LONG, max_tokens=3)).json()
    assert body["choices"][0]["message"]["content"] == "w0 w1 w2 "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_sampling_options_are_accepted(api):
    body = api.post("/v1/chat/completions", json=chat(content="a b c", temperature=0.7, top_p=0.5, top_k=5,
                                                       presence_penalty=0.5, frequency_penalty=-0.5, seed=3)).json()
    assert body["choices"][0]["message"]["content"] == "a b c"


def test_stop_string_ends_the_reply_and_is_not_echoed(api):
    body = api.post("/v1/chat/completions", json=chat(content="alpha beta gamma delta", stop=["gam"])).json()
    assert body["choices"][0]["message"]["content"] == "alpha beta "
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("payload,param", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "fake", "messages": []}, "messages"),
    ({"model": "fake", "messages": "hi"}, "messages"),
    ({"model": "fake", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "fake", "messages": [{"role": "user"}]}, "messages.0.content"),
    (chat(temperature="hot"), "temperature"),
    (chat(temperature=5), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=-5), "max_tokens"),
    (chat(n=0), "n"),
    (chat(n=17), "n"),
    (chat(presence_penalty=3), "presence_penalty"),
    (chat(frequency_penalty=-2.5), "frequency_penalty"),
    (chat(top_k=-5), "top_k"),
    (chat(tools=[{"type": "function"}]), "tools.0.function"),
    (chat(stream="yes please"), "stream"),
])
def test_invalid_requests_get_400_in_openai_shape(api, payload, param):
    assert_openai_error(api.post("/v1/chat/completions", json=payload), 400, param)


@pytest.mark.parametrize("path,payload,param", [
    ("/v1/chat/completions", chat(max_tokens=True), "max_tokens"),
    ("/v1/chat/completions", chat(max_tokens="5"), "max_tokens"),
    ("/v1/chat/completions", chat(max_tokens=5.0), "max_tokens"),
    ("/v1/chat/completions", chat(max_completion_tokens=False), "max_completion_tokens"),
    ("/v1/chat/completions", chat(n=True), "n"),
    ("/v1/chat/completions", chat(seed=True), "seed"),
    ("/v1/chat/completions", chat(top_k="5"), "top_k"),
    ("/v1/chat/completions", chat(stream="yes"), "stream"),
    ("/v1/chat/completions", chat(stream=1), "stream"),
    ("/v1/chat/completions", chat(stream=True, stream_options={"include_usage": "yes"}),
     "stream_options.include_usage"),
    ("/v1/chat/completions", chat(temperature=True), "temperature"),
    ("/v1/chat/completions", chat(temperature="0.5"), "temperature"),
    ("/v1/chat/completions", chat(presence_penalty=False), "presence_penalty"),
    ("/v1/chat/completions", chat(logprobs=1), "logprobs"),
    ("/v1/chat/completions", chat(logprobs=True, top_logprobs=True), "top_logprobs"),
    ("/v1/chat/completions", chat(ignore_eos="true"), "ignore_eos"),
    ("/v1/completions", {"model": "fake", "prompt": "x", "echo": "true"}, "echo"),
    ("/v1/completions", {"model": "fake", "prompt": "x", "logprobs": True}, "logprobs"),
])
def test_a_value_of_the_wrong_json_type_gets_400(api, path, payload, param):
    assert_openai_error(api.post(path, json=payload), 400, param)


def test_what_openai_takes_is_taken(api):
    # An integer for a number, text parts for content, null for any optional parameter.
    body = chat(content=[{"type": "text", "text": "a b"}], temperature=1, top_p=1, presence_penalty=0,
                max_tokens=None, seed=None, stop=None, n=None, stream=None, logprobs=None, user=None)
    reply = api.post("/v1/chat/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == "a b"


def test_malformed_json_gets_400(api):
    response = api.post("/v1/chat/completions", content=b'{"model": "fake", "messages": [',
                        headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_unknown_model_gets_404(api):
    error = assert_openai_error(api.post("/v1/chat/completions", json=chat(model="gpt-9")), 404, "model")
    assert "gpt-9" in error["message"] and "fake" in error["message"]


def test_unknown_route_gets_404_in_openai_shape(api):
    assert_openai_error(api.get("/v1/nothing-here"), 404)


def test_models_lists_what_workers_serve(api):
    body = api.get("/v1/models").json()
    assert [m["id"] for m in body["data"]] == ["fake"]
    assert api.get("/v1/models/fake").json() == body["data"][0]
    assert_openai_error(api.get("/v1/models/nope"), 404, "model")


def test_a_body_over_the_limit_gets_413(api):
    huge = chat(content="x" * (5 * 1024 * 1024))
    assert_openai_error(api.post("/v1/chat/completions", json=huge), 413)
    assert api.post("/v1/chat/completions", json=chat()).status_code == 200  # and nothing broke


def test_no_worker_gets_503_with_retry_after(cluster):
    cluster.broker()
    cluster.api()
    response = httpx.post(f"{cluster.url}/v1/chat/completions", json=chat(), timeout=10)
    assert_openai_error(response, 503)
    assert response.headers["retry-after"]


def test_no_broker_gets_503_at_once(cluster):
    cluster.api()  # its broker address has nobody behind it
    started = time.monotonic()
    response = httpx.post(f"{cluster.url}/v1/chat/completions", json=chat(), timeout=10)
    assert_openai_error(response, 503)
    assert time.monotonic() - started < 2.0


def test_deadline_gets_504(cluster):
    cluster.broker()
    cluster.worker("--fake-delay", "0.5")
    cluster.api("--timeout", "1")
    response = httpx.post(f"{cluster.url}/v1/chat/completions", json=chat(content=LONG), timeout=10)
    error = assert_openai_error(response, 504)
    assert "deadline" in error["message"]
    # The job is cancelled, not left to run its 100 s: the worker's slot comes back.
    wait_for(lambda: cluster.status()["models"]["fake"]["free"] == 16, 3.0, "the expired job's slot")


def test_api_keys_guard_every_v1_route_but_not_health(cluster):
    cluster.broker()
    cluster.worker()
    cluster.api("--api-key", "sesame")
    url = cluster.url
    missing = httpx.get(f"{url}/v1/models")
    assert_openai_error(missing, 401)
    assert missing.headers["www-authenticate"] == "Bearer"
    assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json=chat(),
                                   headers={"Authorization": "Bearer wrong"}), 401)
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "sesame"}).status_code == 401  # no scheme
    ok = httpx.post(f"{url}/v1/chat/completions", json=chat(), headers={"Authorization": "bearer sesame"})
    assert ok.status_code == 200  # the scheme's case does not matter (RFC 7235)
    assert httpx.get(f"{url}/health").status_code == 200


def test_with_api_keys_metrics_and_docs_need_a_key_too(cluster):
    cluster.broker()
    cluster.api("--api-key", "sesame")
    key = {"Authorization": "Bearer sesame"}
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
        assert_openai_error(httpx.get(f"{cluster.url}{path}"), 401)
        assert httpx.get(f"{cluster.url}{path}", headers=key).status_code == 200, path
    for path in ("/health", "/", "/web/app.js"):  # the chat page asks for the key itself
        assert httpx.get(f"{cluster.url}{path}").status_code == 200, path


def test_public_metrics_opens_metrics_but_not_the_docs(cluster):
    cluster.broker()
    cluster.api("--api-key", "sesame", "--public-metrics")
    assert httpx.get(f"{cluster.url}/metrics").status_code == 200
    assert_openai_error(httpx.get(f"{cluster.url}/docs"), 401)
    assert_openai_error(httpx.get(f"{cluster.url}/v1/models"), 401)


def test_without_api_keys_metrics_and_docs_are_open(api):
    for path in ("/metrics", "/docs", "/openapi.json"):
        assert api.get(path).status_code == 200, path


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example",
                                  "localhost.evil.example", "10.0.0.1"])
def test_on_loopback_a_foreign_host_header_is_refused(api, host):
    # DNS rebinding: a web page's own name, pointed at 127.0.0.1, is the Host its requests carry.
    for path in ("/v1/models", "/health"):
        error = assert_openai_error(api.get(path, headers={"Host": host}), 421)
        assert error["code"] == "misdirected_request"


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "localhost", "127.0.0.2", "[::1]:{port}"])
def test_on_loopback_a_loopback_host_header_is_served(api, host):
    port = api.base_url.port
    assert api.get("/v1/models", headers={"Host": host.format(port=port)}).status_code == 200


def test_an_api_without_keys_refuses_to_listen_off_loopback(cluster):
    part = cluster.api("--host", "0.0.0.0", wait=False)
    assert part.process.wait(60) != 0
    assert "--insecure" in part.output() and "0.0.0.0" in part.output()


def test_serve_without_keys_refuses_to_listen_off_loopback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "zmqchat", "serve", "--fake", "--host", "0.0.0.0",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0 and "--insecure" in done.stderr, done.stderr


def test_insecure_listens_off_loopback_with_a_warning(cluster):
    cluster.broker()
    part = cluster.api("--host", "0.0.0.0", "--insecure")
    assert httpx.get(f"{cluster.url}/health").status_code == 200
    warnings = [line for line in part.output().splitlines() if "WARNING" in line and "0.0.0.0" in line]
    assert warnings and "API key" in warnings[0], part.output()


def test_client_leaving_mid_stream_frees_the_slot_within_one_step(cluster):
    step = 1.0  # seconds per engine step: a slot free in under 1.8 s was freed within one step
    cluster.broker()
    cluster.worker("--fake-delay", str(step), "--max-batch", "1")
    cluster.api()
    free = lambda: cluster.status()["models"]["fake"]["free"]  # noqa: E731
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=chat(content=LONG, stream=True)) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert free() == 0
        left = time.monotonic()  # the 200-word reply would have taken 200 s
        wait_for(lambda: free() == 1, 5.0, "the cancelled job's slot to be free", interval=0.05)
        assert time.monotonic() - left < 1.8 * step
        body = client.post("/v1/chat/completions", json=chat(content="still serving")).json()
        assert body["choices"][0]["message"]["content"] == "still serving"


def test_client_leaving_before_its_json_reply_frees_the_slot(cluster):
    cluster.broker()
    cluster.worker("--fake-delay", "1.0", "--max-batch", "1")
    cluster.api()
    free = lambda: cluster.status()["models"]["fake"]["free"]  # noqa: E731
    with pytest.raises(httpx.ReadTimeout):  # the 200-word reply would take 200 s
        httpx.post(f"{cluster.url}/v1/chat/completions", json=chat(content=LONG), timeout=1.5)
    left = time.monotonic()
    wait_for(lambda: free() == 1, 5.0, "the abandoned job's slot to be free", interval=0.05)
    assert time.monotonic() - left < 3.0  # a check every 0.5 s, then one engine step
    assert "the client left" in cluster.parts[-1].output()


def test_client_leaving_while_queued_gives_up_its_place(cluster):
    cluster.broker()
    cluster.worker("--fake-delay", "1.0", "--max-batch", "1")
    cluster.api()
    queued = lambda: cluster.status()["models"]["fake"]["queued"]  # noqa: E731
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=chat(content=LONG, stream=True)) as busy:
            next(busy.iter_lines())  # the only slot is taken
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/chat/completions", json=chat(content="waiting in line"), timeout=1.5)
            wait_for(lambda: queued() == 0, 2.0, "the abandoned request to leave the queue", interval=0.05)
