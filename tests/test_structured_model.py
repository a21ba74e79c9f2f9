"""Structured output on the real default model, through the official openai client: whatever
the model would rather say, a constrained reply parses and validates, every time."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from conftest import serve_default_model

from zmqchat.models import DEFAULT_MODEL_NAME

pytestmark = pytest.mark.model

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"enum": ["Paris", "London", "Rome"]},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 2},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
PROMPTS = ["Describe a person.", "Who is the president of France?", "Write a poem about the sea."]


@pytest.fixture(scope="module")
def client(module_cluster):
    return openai.OpenAI(base_url=f"{serve_default_model(module_cluster)}/v1", api_key="unused", max_retries=0)


def ask(client, content: str, **options):
    return client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": content}],
                                          **{"max_tokens": 100, **options})


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_json_schema_is_kept_every_time(client, temperature):
    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for prompt in PROMPTS:
        reply = ask(client, prompt, temperature=temperature, seed=7, n=2 if temperature else 1,
                    response_format=schema_format)
        for choice in reply.choices:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_output_parses(client):
    # Any object at all: at temperature 1 the tiny model may nest one until max_tokens cuts it.
    for prompt in ("List three fruits.", "Describe a person."):
        reply = ask(client, prompt, temperature=0, response_format={"type": "json_object"})
        assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_a_streamed_schema_reply_parses_once_put_together(client):
    chunks = list(ask(client, "Describe a person.", temperature=1.0, stream=True, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}))
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), PERSON)


def test_a_completion_takes_a_schema_too(client):
    reply = client.completions.create(model=DEFAULT_MODEL_NAME, prompt="A person, as JSON:", max_tokens=100,
                                      temperature=1.0, extra_body={"structured_outputs": {"json": PERSON}})
    jsonschema.validate(json.loads(reply.choices[0].text), PERSON)


def test_choice_regex_and_grammar(client):
    choices = ["yes", "no", "maybe not"]
    for seed in range(3):
        reply = ask(client, "Is the sky green?", temperature=1.0, seed=seed,
                    extra_body={"structured_outputs": {"choice": choices}})
        assert reply.choices[0].message.content in choices and reply.choices[0].finish_reason == "stop"
    reply = ask(client, "A date?", temperature=1.0, extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-0[1-9]"}})
    assert reply.choices[0].message.content[:2] == "20" and len(reply.choices[0].message.content) == 7
    reply = ask(client, "Count.", temperature=1.0, extra_body={"structured_outputs": {"grammar": 'root ::= "one" | "two"'}})
    assert reply.choices[0].message.content in ("one", "two")


def test_an_invalid_schema_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, "x", response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": 5}}})
    assert info.value.param == "response_format.json_schema.schema"


def test_unconstrained_requests_alongside_are_unchanged(client):
    reply = ask(client, "What is the capital of France?", temperature=0)
    assert "Paris" in reply.choices[0].message.content


# -- tool calls -----------------------------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time now in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def assert_well_formed(reply, names=("get_weather",)) -> list:
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice.message
    for call in choice.message.tool_calls:
        assert call.function.name in names and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return choice.message.tool_calls


def test_a_named_tool_call_is_always_well_formed(client):
    for seed in range(3):
        reply = ask(client, "What should I wear in Paris today?", temperature=1.0, seed=seed, tools=TOOLS,
                    tool_choice=NAMED, parallel_tool_calls=False)
        assert len(assert_well_formed(reply)) == 1


def test_forced_calls_cut_by_max_tokens_keep_those_made_whole(client):
    """The tiny model repeats its call when parallel calls are allowed; max_tokens cuts the last."""
    reply = ask(client, "Weather in Paris?", temperature=0, tools=TOOLS, tool_choice=NAMED, max_tokens=60)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls, choice.message
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_calls_one_of_the_tools(client):
    reply = ask(client, "What time is it in Tokyo?", temperature=0, tools=TOOLS, tool_choice="required")
    assert_well_formed(reply, names=("get_weather", "get_time"))


def test_tool_choice_none_gives_text(client):
    reply = ask(client, "What is the capital of France?", temperature=0, tools=TOOLS, tool_choice="none")
    assert "Paris" in reply.choices[0].message.content and not reply.choices[0].message.tool_calls


def test_a_streamed_call_puts_together_the_same_call(client):
    options = {"temperature": 0, "tools": TOOLS, "tool_choice": NAMED}  # parallel: it may call more than once
    whole = assert_well_formed(ask(client, "Weather in Rome?", **options))
    calls: dict[int, list[str]] = {}
    for chunk in ask(client, "Weather in Rome?", stream=True, **options):
        for fragment in chunk.choices[0].delta.tool_calls or []:
            name, arguments = calls.setdefault(fragment.index, ["", ""])
            calls[fragment.index] = [name + (fragment.function.name or ""), arguments + fragment.function.arguments]
    assert [calls[i] for i in sorted(calls)] == [[c.function.name, c.function.arguments] for c in whole]


def test_a_conversation_with_a_tool_result_is_answered(client):
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=40, tools=TOOLS,
                                           tool_choice="none", messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 24, "sky": "sunny"}'},
    ])
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")


def test_the_responses_api_keeps_a_json_schema_too(client):
    response = client.responses.create(model=DEFAULT_MODEL_NAME, input=PROMPTS[0], temperature=1.0,
                                       max_output_tokens=100, text={"format": {
                                           "type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    assert response.status == "completed" and response.text.format.type == "json_schema"
    jsonschema.validate(json.loads(response.output_text), PERSON)
