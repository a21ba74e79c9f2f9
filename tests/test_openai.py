"""Every route and option of the OpenAI API, through the official `openai` client, over a real
broker, API and fake-engine workers; each test checks what OpenAI's clients rely on."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import assert_each_refused_naming_its_param, wait_for

WORDS = "alpha beta gamma delta epsilon"


@pytest.fixture(scope="module")
def cluster(module_cluster, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text("# keys for the test clients\nfile-key\n\n")
    module_cluster.broker()
    module_cluster.worker("--fake-delay", "0.005")
    module_cluster.api("--api-key", "flag-key", "--api-key-file", str(keys))
    return module_cluster


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="file-key", max_retries=0)


def ask(client, content: str = WORDS, **options):
    return client.chat.completions.create(model="fake", messages=[{"role": "user", "content": content}], **options)


def streamed(client, content: str = WORDS, **options) -> list:
    return list(ask(client, content, stream=True, **options))


def assert_usage_adds_up(usage) -> None:
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


# -- models -----------------------------------------------------------------------------------

def test_models_list_and_retrieve(client):
    assert [m.id for m in client.models.list()] == ["fake"]
    assert client.models.retrieve("fake").id == "fake"
    assert client.models.retrieve("fake").model_extra["max_model_len"] == 4096  # vLLM's field
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


# -- chat completions -------------------------------------------------------------------------

def test_chat_takes_every_role_and_text_parts(client):
    reply = client.chat.completions.create(model="fake", messages=[
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": "really brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": [{"type": "text", "text": "second "}, {"type": "text", "text": "question"}]},
    ], user="someone")
    assert reply.choices[0].message.content == "second question"  # the fake says the last user turn
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == 10  # every word of every message, through the template
    assert_usage_adds_up(reply.usage)


@pytest.mark.parametrize("option", ["max_tokens", "max_completion_tokens"])
def test_token_limit_ends_with_length(client, option):
    reply = ask(client, **{option: 2})
    assert reply.choices[0].message.content == "alpha beta "
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 2


def test_sampling_options_are_taken(client):
    reply = ask(client, temperature=1.3, top_p=0.5, seed=42, presence_penalty=1.0, frequency_penalty=-1.0,
                extra_body={"top_k": 4})
    assert reply.choices[0].message.content == WORDS


def test_stop_strings_end_the_reply_and_never_appear(client):
    for stop in ("gamma", ["xyz", "ta gam"], ["a b"]):
        reply = ask(client, stop=stop)
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop"
        assert all(s not in text for s in ([stop] if isinstance(stop, str) else stop))
    chunks = streamed(client, stop=["ta gam"])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "alpha be"


def test_n_choices_have_indexes_and_usage_counts_the_prompt_once(client):
    one = ask(client)
    three = ask(client, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert all(c.message.content == WORDS for c in three.choices)
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    assert_usage_adds_up(three.usage)


def test_n_streamed_choices_interleave_and_each_ends_once(client):
    chunks = streamed(client, n=3, stream_options={"include_usage": True})
    with_choices = [c.choices[0] for c in chunks if c.choices]
    firsts = {}
    for choice in with_choices:
        firsts.setdefault(choice.index, choice)
    assert sorted(firsts) == [0, 1, 2] and all(c.delta.role == "assistant" for c in firsts.values())
    finishes = [c.index for c in with_choices if c.finish_reason]
    assert sorted(finishes) == [0, 1, 2]  # exactly one finish_reason per choice
    order = [c.index for c in with_choices if c.delta.content]
    assert order != sorted(order)  # interleaved as generated, not one choice after another
    for index in range(3):
        assert "".join(c.delta.content or "" for c in with_choices if c.index == index) == WORDS
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == 3 * 6
    assert_usage_adds_up(usage)


def test_seeded_choices_repeat_and_get_seeds_of_their_own(client):
    first = ask(client, n=2, seed=7, temperature=1.0)
    again = ask(client, n=2, seed=7, temperature=1.0)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]


def test_logprobs_name_each_token_of_the_reply(client):
    reply = ask(client, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob == 0.0 and bytes(entry.bytes).decode() == entry.token
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token
    assert ask(client).choices[0].logprobs is None  # only when asked


def test_streamed_logprobs_come_with_their_text(client):
    chunks = streamed(client, logprobs=True, top_logprobs=0, stop=["delta"])
    text = tokens = ""
    for chunk in chunks:
        choice = chunk.choices[0]
        if choice.delta.content:
            assert "".join(e.token for e in choice.logprobs.content) == choice.delta.content
            text += choice.delta.content
            tokens += "".join(e.token for e in choice.logprobs.content)
    assert text == tokens == "alpha beta gamma "


def test_null_parameters_mean_their_defaults(client):
    nulls = dict.fromkeys(["n", "logprobs", "top_logprobs", "stream", "stream_options", "stop", "seed", "temperature",
                           "top_p", "presence_penalty", "frequency_penalty", "max_tokens", "user"])
    reply = ask(client, extra_body=nulls)
    assert reply.choices[0].message.content == WORDS and reply.choices[0].logprobs is None
    text = complete(client, "one two", extra_body={"echo": None, "logprobs": None, "n": None, "max_tokens": None})
    assert [c.text for c in text.choices] == ["one two"]


def test_unsupported_parameters_get_a_400_that_names_them(client):
    cases = {
        "functions": {"functions": [{"name": "f", "parameters": {}}]},  # OpenAI's deprecated form of tools
        "response_format.type": {"response_format": {"type": "xml"}},
        "top_logprobs": {"top_logprobs": 3},  # without logprobs
        "n": {"n": 100},
    }
    assert_each_refused_naming_its_param(lambda **options: ask(client, **options), cases)


def test_a_prompt_beyond_the_context_window_gets_400_with_the_numbers(client):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, " ".join(["word"] * 4000), max_tokens=200)
    assert info.value.code == "context_length_exceeded"
    assert "4096" in info.value.message and "4200" in info.value.message and "4000 in the prompt" in info.value.message


# -- completions ------------------------------------------------------------------------------

def complete(client, prompt, **options):
    return client.completions.create(model="fake", prompt=prompt, **options)


def test_completion_of_a_string(client):
    reply = complete(client, WORDS)
    assert reply.object == "text_completion" and reply.choices[0].text == WORDS
    assert reply.choices[0].finish_reason == "stop" and reply.usage.prompt_tokens == 5
    assert_usage_adds_up(reply.usage)


def test_completion_default_max_tokens_is_openais_16(client):
    for options in ({}, {"max_tokens": None}):
        reply = complete(client, " ".join(f"w{i}" for i in range(40)), **options)
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 16


def test_completion_of_several_prompts_with_n(client):
    reply = complete(client, ["one two", "three"], n=2, max_tokens=5)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.text for c in reply.choices] == ["one two", "one two", "three", "three"]  # prompt by prompt
    assert reply.usage.prompt_tokens == 3 and reply.usage.completion_tokens == 3 + 3 + 2 + 2
    assert_usage_adds_up(reply.usage)


def test_completion_of_token_ids(client):
    complete(client, "red green")  # the fake numbers words as it meets them: now ids 1 and 2 exist
    reply = complete(client, [[1], [1, 2]], max_tokens=3)
    assert reply.usage.prompt_tokens == 3 and [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[1].text.startswith(reply.choices[0].text)  # the fake says its prompt back


def test_completion_echo_stop_and_logprobs(client):
    reply = complete(client, "the cat sat on", echo=True, stop=["sat"], logprobs=2)
    choice = reply.choices[0]
    assert choice.text == "the cat sat onthe cat " and choice.finish_reason == "stop"
    logprobs = choice.logprobs
    # The echoed prompt's tokens first, as OpenAI's legacy endpoint gives them: the first has no logprob.
    assert logprobs.tokens == ["the ", "cat ", "sat ", "on", "the ", "cat "]
    assert logprobs.token_logprobs == [None, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert logprobs.text_offset == [0, 4, 8, 12, 14, 18]  # offsets in the text, the echoed prompt included
    assert logprobs.top_logprobs[0] is None
    assert all(len(top) <= 2 and token in top for token, top in zip(logprobs.tokens[1:], logprobs.top_logprobs[1:]))
    assert all(choice.text[o:].startswith(t) for t, o in zip(logprobs.tokens, logprobs.text_offset))


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client):
    """lm-evaluation-harness's loglikelihood request: the prompt's tokens and their logprobs, nothing generated."""
    reply = complete(client, ["to be or not", "to be"], echo=True, logprobs=1, max_tokens=0, temperature=0)
    assert [c.text for c in reply.choices] == ["to be or not", "to be"]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert reply.choices[0].logprobs.tokens == ["to ", "be ", "or ", "not"]
    assert reply.choices[0].logprobs.token_logprobs == [None, 0.0, 0.0, 0.0]
    assert reply.choices[1].logprobs.text_offset == [0, 3]
    assert reply.usage.prompt_tokens == 6 and reply.usage.completion_tokens == 0
    assert complete(client, "to be", echo=True, max_tokens=0).choices[0].logprobs is None  # only when asked


def test_a_streamed_echo_sends_the_prompts_logprobs_with_its_text(client):
    chunks = [c.choices[0] for c in complete(client, "a b", echo=True, logprobs=0, max_tokens=1, stream=True)]
    assert chunks[0].text == "a ba " and chunks[0].logprobs.tokens == ["a ", "b", "a "]
    assert chunks[0].logprobs.token_logprobs[0] is None and chunks[-1].finish_reason == "length"


def test_prompt_logprobs_in_vllms_shape(client):
    reply = complete(client, "red green blue", max_tokens=1, extra_body={"prompt_logprobs": 1})
    scored = reply.choices[0].model_extra["prompt_logprobs"]
    assert reply.choices[0].text == "red " and scored[0] is None and len(scored) == 3
    for word, position in zip(["green ", "blue"], scored[1:]):
        token = next(iter(position.values()))  # the prompt's own token comes first, with its rank
        assert token == {"logprob": 0.0, "rank": 1, "decoded_token": word}
    chat = ask(client, "red green", n=2, extra_body={"prompt_logprobs": 0})
    scored = chat.model_extra["prompt_logprobs"]  # once beside the choices, which share the prompt
    assert len(scored) == chat.usage.prompt_tokens == 2 and scored[0] is None
    assert [t["decoded_token"] for t in scored[1].values()] == ["green"]
    assert "prompt_logprobs" not in ask(client).model_extra  # only when asked


def test_bad_scoring_requests_get_a_400_naming_the_parameter(client):
    cases = [
        ("max_tokens", lambda: complete(client, "x", max_tokens=0)),  # nothing to generate, nothing echoed
        ("max_tokens", lambda: ask(client, max_tokens=0)),
        ("max_tokens", lambda: complete(client, "x", max_tokens=-1, echo=True)),
        ("prompt_logprobs", lambda: complete(client, "x", extra_body={"prompt_logprobs": 21})),
        ("prompt_logprobs", lambda: ask(client, extra_body={"prompt_logprobs": -1})),
        ("prompt_logprobs", lambda: complete(client, "x", stream=True, extra_body={"prompt_logprobs": 1})),
    ]
    for param, call in cases:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.param == param and param in info.value.message


def test_streamed_completion(client):
    chunks = list(complete(client, ["a b c", "d e"], n=2, stream=True, stream_options={"include_usage": True}))
    with_choices = [c.choices[0] for c in chunks if c.choices]
    assert all(c.object == "text_completion" for c in chunks)
    for index, expected in enumerate(["a b c", "a b c", "d e", "d e"]):
        assert "".join(c.text for c in with_choices if c.index == index) == expected
        assert len([c for c in with_choices if c.index == index and c.finish_reason]) == 1
    assert chunks[-1].usage.completion_tokens == 4 + 4 + 3 + 3
    assert_usage_adds_up(chunks[-1].usage)


# -- embeddings -------------------------------------------------------------------------------

def embed(client, inputs, **options):
    return client.embeddings.create(model="fake", input=inputs, **options)


def test_embeddings_of_every_input_shape(client):
    import math

    complete(client, "red green blue")  # the fake numbers words as it meets them: ids 1 to 3 exist now
    for inputs, count in (("red green", 1), (["red green", "blue", "red"], 3), ([1, 2], 1), ([[1], [2, 3]], 2)):
        reply = embed(client, inputs, encoding_format="float")
        assert [d.index for d in reply.data] == list(range(count)) and reply.object == "list"
        assert all(len(d.embedding) == 8 and math.isclose(math.hypot(*d.embedding), 1.0, abs_tol=1e-6)
                   for d in reply.data)  # the fake's size; unit length
        assert reply.usage.prompt_tokens == reply.usage.total_tokens > 0 and reply.model == "fake"
    reply = embed(client, ["red green ", "green red ", "blue"], encoding_format="float")
    assert reply.data[0].embedding == reply.data[1].embedding != reply.data[2].embedding  # the fake counts words
    assert reply.usage.prompt_tokens == 5


def test_base64_embeddings_are_the_float_ones_as_little_endian_float32(client):
    import base64
    import struct

    texts = ["one two", "three four five", "six"]
    floats = embed(client, texts, encoding_format="float").data
    raw = client.embeddings.with_raw_response.create(model="fake", input=texts, encoding_format="base64").parse()
    for plain, encoded in zip(floats, raw.data):
        assert isinstance(encoded.embedding, str)
        assert list(struct.unpack("<8f", base64.b64decode(encoded.embedding))) == plain.embedding
    # The client asks for base64 unless told otherwise, and decodes it itself.
    assert [d.embedding for d in embed(client, texts).data] == [d.embedding for d in floats]


def test_embedding_dimensions_cut_and_renormalise(client):
    import math

    full = embed(client, "a b c d e f g h", encoding_format="float").data[0].embedding
    cut = embed(client, "a b c d e f g h", dimensions=3, encoding_format="float").data[0].embedding
    norm = math.hypot(*full[:3])
    assert len(cut) == 3 and cut == pytest.approx([x / norm for x in full[:3]], abs=1e-6)


def test_bad_embedding_requests_get_a_400_naming_the_parameter(client):
    cases = [
        ("dimensions", {"input": "x", "dimensions": 9}),  # more than the model has: the worker says so
        ("dimensions", {"input": "x", "dimensions": 0}),
        ("input", {"input": ""}),
        ("input", {"input": []}),
        ("input", {"input": ["x"] * 257}),
        ("input", {"input": [[999999]]}),  # outside the vocabulary
        ("input", {"input": " ".join(["w"] * 4097)}),  # past the context window
        ("encoding_format", {"input": "x", "encoding_format": "int8"}),
    ]
    for param, body in cases:
        with pytest.raises(openai.BadRequestError) as info:
            client.embeddings.create(model="fake", **body)
        assert (info.value.param or "").split(".")[0] == param, (param, info.value.message)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


# -- keys -------------------------------------------------------------------------------------

def test_a_completion_stream_ends_with_its_last_text(client):
    """OpenAI's legacy endpoint puts finish_reason on the chunk of the last token, not on an empty one."""
    chunks = [c.choices[0] for c in complete(client, "a b c d e", max_tokens=2, stream=True, logprobs=1)]
    assert [(c.text, c.finish_reason) for c in chunks] == [("a ", None), ("b ", "length")]
    assert chunks[-1].logprobs.tokens == ["b "]


def test_continuous_usage_stats_grow_to_the_final_usage(client):
    """vLLM's extension: every chunk carries the usage so far; the last is the request's."""
    options = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    for chunks in (streamed(client, n=2, stream_options=options["stream_options"]),
                   list(complete(client, ["a b c", "d e"], **options))):
        usages = [chunk.usage for chunk in chunks]
        assert all(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens for usage in usages)
        generated = [usage.completion_tokens for usage in usages]
        assert generated == sorted(generated) and generated[0] < generated[-1]
        prompt = [usage.prompt_tokens for usage in usages]  # each prompt counted from its first output on
        assert prompt == sorted(prompt) and prompt[0] > 0 and prompt[-1] == 5
        assert chunks[-1].choices == [] and usages[-2] == usages[-1]  # the last output's chunk is already complete
    plain = streamed(client, stream_options={"include_usage": True})
    assert [chunk.usage is None for chunk in plain] == [True] * (len(plain) - 1) + [False]


def test_stream_options_without_a_stream_get_a_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, stream_options={"include_usage": True})
    assert info.value.param == "stream_options"


def test_min_tokens_and_logit_bias_are_taken_and_checked(client):
    # The fake says its words then ends; min_tokens holds its end back (its logits are not real,
    # so logit_bias changes nothing it says, but is checked against its vocabulary).
    reply = ask(client, "two words", extra_body={"min_tokens": 5}, logit_bias={"1": 50})
    assert reply.choices[0].message.content == "two words" and reply.usage.completion_tokens == 6
    for bias, param in (({"1": 101}, "logit_bias.1"), ({"x": 1}, "logit_bias.x")):
        with pytest.raises(openai.BadRequestError) as info:
            ask(client, logit_bias=bias)
        assert info.value.param == param
    with pytest.raises(openai.BadRequestError, match="vocabulary"):
        ask(client, logit_bias={"999999": 1})


# -- structured output: checked by the API, carried to the worker (the fake cannot follow a grammar)

PERSON = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@pytest.mark.parametrize("options, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "p", "schema": PERSON}}},
     "response_format.json_schema"),
    ({"extra_body": {"structured_outputs": {"regex": "a(b"}}}, "structured_outputs.regex"),
    ({"extra_body": {"structured_outputs": {"grammar": "start: nowhere"}}}, "structured_outputs.grammar"),
    ({"extra_body": {"structured_outputs": {"json": "{not json"}}}, "structured_outputs.json"),
    ({"extra_body": {"structured_outputs": {"choice": []}}}, "structured_outputs.choice"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}},
     "structured_outputs"),
])
def test_a_constraint_that_cannot_be_matched_gets_a_400_naming_it(client, options, param):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, **options)
    assert info.value.param == param, info.value.message


def test_a_completion_constraint_is_checked_too(client):
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, "x", extra_body={"response_format": {"type": "json_schema", "json_schema": {
            "name": "p", "schema": {"type": "object", "properties": {"a": {"type": 7}}}}}})
    assert info.value.param == "response_format.json_schema.schema"


@pytest.mark.parametrize("options", [
    {"response_format": {"type": "json_object"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}},
    {"extra_body": {"structured_outputs": {"choice": ["yes", "no"]}}},
    {"extra_body": {"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}},  # GBNF, converted to Lark
])
def test_a_valid_constraint_reaches_the_worker_which_says_the_fake_cannot_follow_it(client, options):
    with pytest.raises(openai.BadRequestError, match="fake engine cannot constrain"):
        ask(client, **options)


def test_response_format_text_is_no_constraint(client):
    assert ask(client, response_format={"type": "text"}).choices[0].message.content == WORDS


# -- tool calls: the fake says what it is told, so a user's words can be a call ------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_a_call_in_the_reply_becomes_tool_calls(client):
    reply = ask(client, CALL, tools=[WEATHER])
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content is None
    [call] = message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_streamed_tool_calls_put_together_are_the_same_call(client):
    chunks = streamed(client, f"Let me look. {CALL}", tools=[WEATHER], tool_choice="auto")
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    fragments = [f for c in chunks for f in c.choices[0].delta.tool_calls or []]
    assert content.strip() == "Let me look." and "<tool_call>" not in content
    assert [f.index for f in fragments] == [0] and fragments[0].id.startswith("call_")
    assert fragments[0].function.name == "get_weather"
    assert json.loads("".join(f.function.arguments for f in fragments)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_parallel_calls_are_numbered(client):
    second = CALL.replace("Paris", "Rome")
    reply = ask(client, f"{CALL} {second}", tools=[WEATHER])
    assert [json.loads(c.function.arguments)["city"] for c in reply.choices[0].message.tool_calls] == ["Paris", "Rome"]
    fragments = [f for c in streamed(client, f"{CALL} {second}", tools=[WEATHER])
                 for f in c.choices[0].delta.tool_calls or []]
    assert [f.index for f in fragments] == [0, 1] and len({f.id for f in fragments}) == 2


def test_tool_choice_none_gives_text(client):
    reply = ask(client, CALL, tools=[WEATHER], tool_choice="none")
    assert reply.choices[0].message.content == CALL and not reply.choices[0].message.tool_calls
    assert reply.choices[0].finish_reason == "stop"


def test_text_that_is_no_call_is_streamed_whole(client):
    chunks = streamed(client, "a <tool_ call that is not", tools=[WEATHER])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "a <tool_ call that is not"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_a_conversation_with_a_call_and_its_result_is_taken(client):
    reply = client.chat.completions.create(model="fake", tools=[WEATHER], messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
        {"role": "user", "content": "thanks"},
    ])
    assert reply.choices[0].message.content == "thanks"


@pytest.mark.parametrize("options, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}]},
     "tools.0.function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
])
def test_a_tool_option_that_cannot_work_gets_a_400_naming_it(client, options, param):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, **options)
    assert info.value.param == param, info.value.message


@pytest.mark.parametrize("message", [
    {"role": "tool", "content": "a result without its call's id"},
    {"role": "user", "content": "hi", "tool_call_id": "call_1"},
    {"role": "assistant", "content": None},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]},
])
def test_a_message_with_the_wrong_tool_fields_gets_a_400(client, message):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}, message])
    assert info.value.param.startswith("messages.1"), info.value.message


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_reaches_the_worker_as_a_constraint(client, choice):
    with pytest.raises(openai.BadRequestError, match="fake engine cannot constrain"):
        ask(client, tools=[WEATHER], tool_choice=choice)


def test_every_v1_route_wants_a_key_from_the_flag_or_the_file(cluster):
    wrong = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="wrong", max_retries=0)
    calls = [lambda c: c.models.list(), lambda c: c.models.retrieve("fake"), lambda c: ask(c),
             lambda c: complete(c, "x"), lambda c: c.get("/cluster", cast_to=object)]
    for call in calls:
        with pytest.raises(openai.AuthenticationError) as info:
            call(wrong)
        assert info.value.code == "invalid_api_key"
    flag = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="flag-key", max_retries=0)
    assert ask(flag).choices[0].message.content == WORDS
    assert openai.OpenAI(base_url=cluster.url, api_key="none").get("/health", cast_to=object)["status"] == "ok"


def test_no_request_above_leaked_a_slot(cluster):
    wait_for(lambda: cluster.status()["models"]["fake"]["free"] == 16, 5.0, "every slot to be free")
