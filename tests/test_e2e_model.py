"""End to end on the real default model: `zmqchat serve`, then the official openai client and curl."""

from __future__ import annotations

import json
import shutil
import subprocess

import openai
import pytest
from conftest import free_port, wait_for

from zmqchat.models import DEFAULT_MODEL_NAME

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(module_cluster):
    port = free_port()
    serve = module_cluster.spawn("serve", "serve", "--port", str(port), "--frontend", module_cluster.frontend,
                                 "--backend", module_cluster.backend, "--device", "cpu")
    wait_for(lambda: "is serving" in serve.output() or serve.process.poll() is not None, 300,
             "serve to load the default model")
    assert serve.process.poll() is None, serve.output()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_models_list_names_the_default_model(client):
    assert [m.id for m in client.models.list()] == [DEFAULT_MODEL_NAME]


def test_chat_completion_answers_paris(client):
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_completion_answers_paris(client):
    stream = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(chunks) > 4  # tokens arrive as they are made, not in one piece


def test_max_tokens_cuts_the_reply(client):
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_gets_paris(server):
    body = json.dumps({"model": DEFAULT_MODEL_NAME, "messages": QUESTION, "temperature": 0})
    out = subprocess.run(["curl", "-sS", f"{server}/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "Paris" in json.loads(out)["choices"][0]["message"]["content"]
