"""End to end on the real default model: `zmqchat serve`, then the official openai client and curl."""

from __future__ import annotations

import json
import shutil
import subprocess

import openai
import pytest
from conftest import serve_default_model

from zmqchat.models import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.model  # every test here runs the real default model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(module_cluster):
    return serve_default_model(module_cluster)


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


def test_models_say_their_context_window(client):
    assert client.models.retrieve(DEFAULT_MODEL_NAME).model_extra["max_model_len"] == 8192


def test_logit_bias_of_minus_100_bans_a_token(client):
    from transformers import AutoTokenizer

    from zmqchat.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(None, None)[0])
    banned = {str(tokenizer.encode(word, add_special_tokens=False)[0]): -100 for word in ("Paris", " Paris")}
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0,
                                           max_tokens=16, logit_bias=banned)
    assert "Paris" not in reply.choices[0].message.content


def test_min_tokens_keeps_a_short_answer_going(client):
    alone = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=40)
    assert alone.choices[0].finish_reason == "stop" and alone.usage.completion_tokens < 20  # "... is Paris."
    longer = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0,
                                            max_tokens=40, extra_body={"min_tokens": 20})
    assert longer.usage.completion_tokens >= 20


def test_the_shared_preamble_is_reported_as_cached_tokens(client):
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=2)
    cached = reply.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < reply.usage.prompt_tokens  # the chat template's system prompt, not the question


def test_max_tokens_cuts_the_reply(client):
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, max_tokens=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_gets_paris(server):
    body = json.dumps({"model": DEFAULT_MODEL_NAME, "messages": QUESTION, "temperature": 0})
    out = subprocess.run(["curl", "-sS", f"{server}/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "Paris" in json.loads(out)["choices"][0]["message"]["content"]


def test_logprobs_are_the_models_own(client):
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=8,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:  # greedy decoding picks the likeliest token, which leads the alternatives
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3


def test_n_sampled_choices_differ(client):
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, n=4, temperature=1.0, max_tokens=12, seed=1,
                                           messages=[{"role": "user", "content": "Write a short poem about tea."}])
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert len({c.message.content for c in reply.choices}) > 1  # each choice samples with its own seed


def test_the_context_window_is_counted_with_the_models_tokenizer(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, max_tokens=100,
                                       messages=[{"role": "user", "content": "hello " * 8100}])
    assert info.value.code == "context_length_exceeded" and "8192 tokens" in info.value.message


def test_completion_continues_raw_text(client):
    prompt = "The capital of France is"
    reply = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt, max_tokens=6, temperature=0,
                                      echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text.startswith(prompt)
    assert "".join(choice.logprobs.tokens) == choice.text[len(prompt):]
    assert choice.logprobs.text_offset[0] == len(prompt)
