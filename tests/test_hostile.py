"""Hostile and random input against a real API, broker and fake worker: every request gets a
4xx or a 200 in OpenAI's shape, never a 5xx, and no process dies or leaks a slot."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from conftest import Cluster, chat, wait_for
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

SLOTS = 16


@pytest.fixture(scope="module")
def cluster(module_cluster):
    module_cluster.broker()
    module_cluster.worker("--fake-delay", "0.001")
    module_cluster.api()
    return module_cluster


@pytest.fixture(scope="module")
def api(cluster):
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        yield client


def post_raw(api, body: bytes, path: str = "/v1/chat/completions", **headers) -> httpx.Response:
    return api.post(path, content=body, headers={"content-type": "application/json", **headers})


def assert_answered(response: httpx.Response) -> None:
    """A 200 with choices (or a Responses API output), or a 4xx in OpenAI's error shape."""
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        if response.headers["content-type"].startswith("text/event-stream"):
            last = response.text.rstrip().rsplit("\n\n", 1)[-1]
            assert last == "data: [DONE]" or last.startswith(("event: response.completed", "event: response.incomplete"))
        else:
            assert response.json().get("choices") or response.json()["output"]
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def assert_cluster_whole(cluster) -> None:
    assert all(part.process.poll() is None for part in cluster.parts), "a process died"
    wait_for(lambda: cluster.status()["models"]["fake"]["free"] == SLOTS, 10.0, "every slot to be free")


DEEP_ARRAY = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000


@pytest.mark.parametrize("body", [
    DEEP_ARRAY, DEEP_OBJECT, b'{"model": "fake", "messages": ' + DEEP_ARRAY + b"}",
    b'{"model": "fake", "messages": [{"role": "user", "content": "\xff\xfe\xc0"}]}',  # invalid UTF-8
    b"", b"null", b"123", b'"text"', b"{", b"\x00\x01\x02",
    json.dumps(chat(max_tokens=10**30)).encode(), json.dumps(chat(seed=-(10**30))).encode(),
    json.dumps(chat(top_k=10**30)).encode(), json.dumps(chat(n=10**9)).encode(),
    b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
    b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}',
    b'{"model": "fake", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": -Infinity}',
    json.dumps(chat(messages=[])).encode(),
    json.dumps({"model": "fake", "messages": []}).encode(),
    json.dumps({"model": "fake", "messages": [{"role": "user", "content": ""}]}).encode(),
    json.dumps({"model": "fake", "messages": [{"role": "root", "content": "hi"}]}).encode(),
    json.dumps({"model": "fake", "messages": [{"role": "tool", "content": "hi"}]}).encode(),
    json.dumps({"model": "", "messages": [{"role": "user", "content": "hi"}]}).encode(),
    json.dumps(chat(stop=[f"stop{i}" for i in range(5000)])).encode(),
    json.dumps(chat(content="word " * 600_000)).encode(),  # 3 MB: under the body limit, over the context
    json.dumps(chat(content=[{"type": "image_url", "image_url": {"url": "http://x"}}])).encode(),
])
def test_hostile_chat_bodies_get_4xx(api, body):
    response = post_raw(api, body)
    assert 400 <= response.status_code < 500, response.text
    assert_answered(response)


@pytest.mark.parametrize("body", [
    {"model": "fake", "prompt": []}, {"model": "fake", "prompt": [[]]}, {"model": "fake", "prompt": [-1]},
    {"model": "fake", "prompt": [10**9]}, {"model": "fake", "prompt": ["x"] * 10_000},
    {"model": "fake", "prompt": [1, "two"]}, {"model": "fake", "prompt": "x", "logprobs": 50},
    {"model": "fake", "prompt": "x", "best_of": 3}, {"model": "fake", "prompt": "x", "max_tokens": 0},
])
def test_hostile_completion_bodies_get_4xx(api, body):
    response = api.post("/v1/completions", json=body)
    assert 400 <= response.status_code < 500, response.text
    assert_answered(response)


LONE_SURROGATE = "\ud800 x"  # json.dumps sends it as the escape \ud800, which no UTF-8 can hold


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", chat(content=LONE_SURROGATE), "messages.0.content"),
    ("/v1/chat/completions", chat(content=[{"type": "text", "text": LONE_SURROGATE}]), "messages.0.content.0.text"),
    ("/v1/chat/completions", chat(stop=LONE_SURROGATE), "stop"),
    ("/v1/chat/completions", chat(stop=["fine", LONE_SURROGATE]), "stop.1"),
    ("/v1/chat/completions", chat(model=LONE_SURROGATE), "model"),
    ("/v1/completions", {"model": "fake", "prompt": LONE_SURROGATE}, "prompt"),
    ("/v1/completions", {"model": "fake", "prompt": ["fine"] * 7 + [LONE_SURROGATE]}, "prompt.7"),
    ("/v1/responses", {"model": "fake", "input": LONE_SURROGATE}, "input"),
    ("/v1/responses", {"model": "fake", "input": "x", "instructions": LONE_SURROGATE}, "instructions"),
    ("/v1/responses", {"model": "fake", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": LONE_SURROGATE}]}]}, "input.0.content.0.text"),
])
def test_a_lone_surrogate_gets_400_naming_its_parameter(api, path, body, param):
    response = post_raw(api, json.dumps(body).encode(), path=path)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_refused_surrogate_prompts_leave_no_job_behind(cluster, api):
    # 7 good prompts x 16 choices would reach the broker before the 8th prompt failed to encode.
    body = json.dumps({"model": "fake", "prompt": ["fine"] * 7 + [LONE_SURROGATE], "n": 16}).encode()
    for _ in range(10):
        response = post_raw(api, body, path="/v1/completions")
        assert response.status_code == 400 and response.json()["error"]["param"] == "prompt.7", response.text
    assert_cluster_whole(cluster)
    assert cluster.status()["models"]["fake"]["queued"] == 0
    assert api.post("/v1/completions", json={"model": "fake", "prompt": "still here"}).json()["choices"]


def test_a_chunked_body_over_the_limit_gets_413(api):
    def chunks():
        for _ in range(100):  # 6.4 MB, with no Content-Length
            yield b"x" * 65536

    response = post_raw(api, chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_a_huge_declared_length_gets_413_before_any_body(cluster):
    # Raw bytes: HTTP clients will not send a Content-Length their body does not match.
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=10) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 99999999999\r\n\r\n{}")
        assert conn.recv(4096).startswith(b"HTTP/1.1 413 ")


# -- slow clients: an API whose clients get a second for their headers and their body ---------

MAX_CONNECTIONS = 5


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("guarded"))
    try:
        c.broker()
        c.worker("--fake-delay", "0.001")
        c.api("--header-timeout", "1", "--body-timeout", "1", "--max-connections", str(MAX_CONNECTIONS))
        yield c
    finally:
        c.stop()


def connect(cluster, sent: bytes = b"") -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", cluster.port), timeout=10)
    conn.sendall(sent)
    return conn


def read_until_closed(conn: socket.socket, within: float) -> bytes:
    """What the server sent before it closed `conn`; fails if it is still open after `within` s."""
    conn.settimeout(within)
    received = b""
    try:
        while chunk := conn.recv(65536):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the connection was still open after {within} s (got {received[:60]!r})")
    return received


HALF_THE_HEADERS = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.mark.parametrize("sent", [b"", HALF_THE_HEADERS], ids=["silent", "half-the-headers"])
def test_a_client_slow_with_its_headers_is_cut_off(guarded, sent):
    with connect(guarded, sent) as conn:
        started = time.monotonic()
        assert read_until_closed(conn, 5) == b""
        assert time.monotonic() - started < 3


def test_a_kept_alive_client_slow_with_its_next_headers_is_cut_off(guarded):
    with connect(guarded, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n") as conn:
        assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
        conn.sendall(HALF_THE_HEADERS)  # the first byte of a request ends the keep-alive wait (75 s)
        read_until_closed(conn, 5)


def test_a_client_slow_with_its_body_gets_408(guarded):
    headers = HALF_THE_HEADERS + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    with connect(guarded, headers + b'{"model": ') as conn:
        started = time.monotonic()
        reply = read_until_closed(conn, 5)
        assert time.monotonic() - started < 3
    assert reply.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in reply, reply


def test_connections_over_the_cap_get_503_until_the_slow_ones_are_cut_off(guarded):
    trickles = [connect(guarded, HALF_THE_HEADERS) for _ in range(MAX_CONNECTIONS)]
    try:
        started = time.monotonic()
        assert httpx.get(f"{guarded.url}/health", timeout=5).status_code == 503
        assert time.monotonic() - started < 1
        for conn in trickles:
            read_until_closed(conn, 5)
    finally:
        for conn in trickles:
            conn.close()
    reply = httpx.post(f"{guarded.url}/v1/chat/completions", json=chat(), timeout=10)
    assert reply.status_code == 200, reply.text


def test_after_the_hostile_bodies_every_process_lives_and_every_slot_is_free(cluster, api):
    assert api.post("/v1/chat/completions", json=chat()).status_code == 200
    assert_cluster_whole(cluster)


# -- fuzz: bodies that are partly right and partly anything -----------------------------------

anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)
numbers = st.integers(min_value=-(2**70), max_value=2**70) | st.floats()
text_parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=30)}), max_size=3)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]) | anything},
    optional={"content": st.text(max_size=60) | text_parts | anything, "name": st.text(max_size=8) | anything})
model = st.just("fake") | anything
SHARED = {
    "max_tokens": st.integers(-2, 40) | numbers | anything,
    "temperature": numbers | anything, "top_p": numbers | anything, "top_k": numbers | anything,
    "presence_penalty": numbers, "frequency_penalty": numbers, "seed": numbers,
    "n": st.integers(-1, 20) | anything,
    "stream": st.booleans() | anything,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()},
                                            optional={"continuous_usage_stats": st.booleans()}) | anything,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20) | anything,
    "user": st.text(max_size=10) | anything,
    "ignore_eos": st.booleans() | anything,
    "unknown_option": anything,
}
chat_bodies = st.fixed_dictionaries({"model": model}, optional={
    **SHARED, "messages": st.lists(message, max_size=3) | anything,
    "max_completion_tokens": st.integers(-2, 40) | anything, "logprobs": st.booleans() | anything,
    "top_logprobs": st.integers(-2, 25) | anything,
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}) | anything})
completion_bodies = st.fixed_dictionaries({"model": model}, optional={
    **SHARED, "prompt": st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=4)
    | st.lists(st.integers(-2, 10), max_size=5) | anything,
    "echo": st.booleans() | anything, "logprobs": st.integers(-2, 25) | anything})
input_part = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "input_image"]) | anything,
                                    "text": st.text(max_size=30)}, optional={"annotations": anything})
input_item = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | anything},
    optional={"content": st.text(max_size=60) | st.lists(input_part, max_size=3) | anything,
              "type": st.sampled_from(["message", "reasoning"]) | anything, "id": anything, "status": anything})
response_bodies = st.fixed_dictionaries({"model": model}, optional={
    "input": st.text(max_size=60) | st.lists(input_item, max_size=3) | anything,
    "instructions": st.text(max_size=20) | anything, "max_output_tokens": st.integers(-2, 40) | anything,
    "temperature": numbers | anything, "top_p": numbers | anything, "stream": st.booleans() | anything,
    "store": st.booleans() | anything, "previous_response_id": st.text(max_size=10) | anything,
    "metadata": st.dictionaries(st.text(max_size=70), st.text(max_size=20), max_size=20) | anything,
    "text": st.fixed_dictionaries({"format": st.fixed_dictionaries({"type": st.just("text")})}) | anything,
    "user": st.text(max_size=10) | anything, "unknown_option": anything})
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(body=chat_bodies)
def test_fuzzed_chat_requests_never_get_a_5xx(api, body):
    response = post_raw(api, json.dumps(body).encode())
    event(f"HTTP {response.status_code}")  # pytest --hypothesis-show-statistics: how many got through
    assert_answered(response)


@FUZZ
@given(body=completion_bodies)
def test_fuzzed_completion_requests_never_get_a_5xx(api, body):
    response = post_raw(api, json.dumps(body).encode(), path="/v1/completions")
    event(f"HTTP {response.status_code}")
    assert_answered(response)


@FUZZ
@given(body=response_bodies)
def test_fuzzed_responses_requests_never_get_a_5xx(api, body):
    response = post_raw(api, json.dumps(body).encode(), path="/v1/responses")
    event(f"HTTP {response.status_code}")
    assert_answered(response)


def test_after_the_fuzz_every_process_lives_and_every_slot_is_free(cluster, api):
    assert api.post("/v1/completions", json={"model": "fake", "prompt": "still here"}).json()["choices"]
    assert_cluster_whole(cluster)
