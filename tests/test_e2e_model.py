"""End to end on the real default model: `zmqchat serve`, then the official openai client and curl."""

from __future__ import annotations

import json
import shutil
import subprocess

import openai
import pytest
from conftest import DEVICE, serve_default_model

from zmqchat.config import BLOCK_SIZE
from zmqchat.models import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.model  # every test here runs the real default model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(module_cluster):
    return serve_default_model(module_cluster)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_the_worker_says_it_serves_float16_weights_on_a_cpu_and_bfloat16_on_a_gpu(module_cluster, server):
    device = module_cluster.status()["workers"][0]["device"]
    assert device == "cpu float32 fp16" if DEVICE == "cpu" else device.endswith(" bfloat16")


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


def test_a_conversations_next_turn_is_prefilled_from_the_cache_of_its_history(client):
    first = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=40)
    history = QUESTION + [{"role": "assistant", "content": first.choices[0].message.content},
                          {"role": "user", "content": "And of Italy?"}]
    second = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=history, temperature=0, max_tokens=2)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # Every full block of the first turn's prompt and reply: all of its prompt but a last partial block.
    assert first.usage.prompt_tokens - BLOCK_SIZE < cached < second.usage.prompt_tokens


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
    choice, usage = reply.choices[0], reply.usage
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    logprobs = choice.logprobs  # the echoed prompt's tokens, then the completion's
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.tokens) == usage.prompt_tokens + usage.completion_tokens
    assert logprobs.text_offset[usage.prompt_tokens] == len(prompt)
    assert logprobs.token_logprobs[0] is None and None not in logprobs.token_logprobs[1:]


@pytest.fixture(scope="module")
def model():
    """The default model loaded here, as the worker loads it (its weights in the format --quantize
    auto picks), to check what the server says against."""
    from zmqchat import models

    return models.load(device=DEVICE, quantize="auto")


def direct_logprobs(model, ids: list[int]) -> list[float]:
    """Each token's logprob after those before it, by transformers alone."""
    import torch

    with torch.inference_mode():
        logits = model.model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()
    return torch.log_softmax(logits, -1)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_echo_with_max_tokens_0_scores_the_prompt_as_transformers_does(client, model):
    """lm-evaluation-harness's loglikelihood request."""
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    reply = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=text, echo=True, logprobs=1, max_tokens=0)
    choice = reply.choices[0]
    assert choice.text == text and choice.finish_reason == "length" and reply.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == text and logprobs.token_logprobs[0] is None
    assert logprobs.top_logprobs[0] is None and all(len(top) == 1 for top in logprobs.top_logprobs[1:])
    assert all(text[offset:].startswith(token) for token, offset in zip(logprobs.tokens, logprobs.text_offset))
    expected = direct_logprobs(model, model.tokenizer(text).input_ids)
    assert sum(logprobs.token_logprobs[1:]) == pytest.approx(sum(expected), abs=1e-3)


def test_chat_prompt_logprobs_cover_the_whole_template(client, model):
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=QUESTION, temperature=0, max_tokens=2,
                                           extra_body={"prompt_logprobs": 2})
    scored = reply.model_extra["prompt_logprobs"]
    templated = model.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    ids = model.tokenizer(templated, add_special_tokens=False).input_ids
    assert len(scored) == len(ids) == reply.usage.prompt_tokens and scored[0] is None
    # The prompt's own token first (the template's system prompt included, which is otherwise cached), then the top 2.
    ours = [position[str(token)]["logprob"] for token, position in zip(ids[1:], scored[1:])]
    assert ours == pytest.approx(direct_logprobs(model, ids), abs=1e-4)
    assert all(2 <= len(position) <= 3 for position in scored[1:])
    assert reply.usage.prompt_tokens_details.cached_tokens == 0  # computed afresh, logits and all


def test_an_embedding_is_the_mean_of_the_models_last_hidden_states(client, model):
    import torch

    text = "Tea is a drink made from the leaves of a shrub."
    reply = client.embeddings.create(model=DEFAULT_MODEL_NAME, input=text, encoding_format="float")
    ids = model.tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        hidden = model.model(ids, output_hidden_states=True).hidden_states[-1][0].float()
    expected = torch.nn.functional.normalize(hidden.mean(0), dim=0)
    assert reply.data[0].embedding == pytest.approx(expected.tolist(), abs=1e-4)
    assert len(reply.data[0].embedding) == 576 and reply.usage.prompt_tokens == ids.shape[1]


def test_embeddings_are_unit_length_and_the_same_in_a_batch_as_alone(client):
    import math

    texts = ["short", "a somewhat longer sentence about the weather in Paris", "The capital of France is Paris."]
    batch = client.embeddings.create(model=DEFAULT_MODEL_NAME, input=texts).data  # base64, the client's default
    for text, together in zip(texts, batch):
        alone = client.embeddings.create(model=DEFAULT_MODEL_NAME, input=text).data[0].embedding
        assert math.isclose(math.hypot(*together.embedding), 1.0, abs_tol=1e-5)
        assert together.embedding == pytest.approx(alone, abs=1e-5)  # padding on the right changes nothing
    cut = client.embeddings.create(model=DEFAULT_MODEL_NAME, input=texts[0], dimensions=64).data[0].embedding
    norm = math.hypot(*batch[0].embedding[:64])
    assert cut == pytest.approx([x / norm for x in batch[0].embedding[:64]], abs=1e-5)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=DEFAULT_MODEL_NAME, input="x", dimensions=577)
    assert info.value.param == "dimensions" and "576" in info.value.message


def test_responses_create_answers_as_the_same_chat_does(client):
    """The Responses API is a translation onto chat: at temperature 0, the same words and tokens."""
    system = "You answer in one short sentence."
    chat = client.chat.completions.create(model=DEFAULT_MODEL_NAME, temperature=0,
                                          messages=[{"role": "system", "content": system}, *QUESTION])
    response = client.responses.create(model=DEFAULT_MODEL_NAME, temperature=0, instructions=system,
                                       input=QUESTION[0]["content"])
    assert "Paris" in response.output_text and response.status == "completed"
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens
    follow_up = client.responses.create(model=DEFAULT_MODEL_NAME, temperature=0, input="And of Italy?",
                                        previous_response_id=response.id, max_output_tokens=16)
    # It read the first exchange (without its instructions, which were that response's only).
    assert follow_up.usage.input_tokens > response.usage.output_tokens + 5
    assert follow_up.output_text
