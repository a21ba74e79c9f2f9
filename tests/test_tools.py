"""The tool-call formats, pure: each parser finds the calls of its format and nothing else,
says where a streamed call may begin, and the forced-call grammar and the fallback prompt."""

from __future__ import annotations

import json

import pytest

from zmqchat import grammar, tools
from zmqchat.protocol import Constraint
from zmqchat.tools import Call

PARIS = Call("get_weather", '{"city": "Paris"}')
ROME = Call("get_weather", '{"city": "Rome"}')


@pytest.mark.parametrize("parser, text, content, calls", [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "", [PARIS]),
    ("hermes", 'Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
               '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>', "Sure.", [PARIS, ROME]),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', "", [PARIS]),  # unclosed, args as text
    ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("hermes", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
               '<tool_call>{"name": "get_weather", "argum', "", [PARIS]),  # cut inside its second call
    ("hermes", '<tool_call>{"name": "get_weather", "argum', '<tool_call>{"name": "get_weather", "argum', []),
    ("hermes", "no call here", "no call here", []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [PARIS]),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
               '{"name": "get_weather", "parameters": {"city": "Rome"}}', "", [PARIS, ROME]),
    ("llama3", '{"answer": 42}', '{"answer": 42}', []),  # JSON, but no call
    ("llama3", "The weather is fine.", "The weather is fine.", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [PARIS]),
    ("mistral", 'Let me see.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_weather", "arguments": {"city": "Rome"}}]', "Let me see.", [PARIS, ROME]),
    ("mistral", "[TOOL_CALLS] nonsense", "[TOOL_CALLS] nonsense", []),
    ("auto", 'x <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "x", [PARIS]),
    ("auto", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', "", [PARIS]),
    ("auto", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [PARIS]),
    ("auto", "  just words  ", "just words", []),
])
def test_each_parser_reads_its_format(parser, text, content, calls):
    assert tools.PARSERS[parser].parse(text) == (content, calls)


@pytest.mark.parametrize("parser, text, start", [
    ("hermes", "Let me check <tool_", 13),  # may become a call: held back from there
    ("hermes", "a <tool_call>{", 2),
    ("hermes", "a < b", -1),
    ("mistral", "ok [TOOL", 3),
    ("llama3", "  {", 2),
    ("llama3", "", 0),  # nothing yet: it may open with a call
    ("llama3", "<|python", 0),
    ("llama3", "Hello {", -1),  # a reply that opened with words is no call
    ("auto", "Hello <tool_call>", 6),
    ("auto", "Hello", -1),
])
def test_a_streamed_reply_is_held_back_where_a_call_may_begin(parser, text, start):
    assert tools.PARSERS[parser].call_start(text) == start


def test_the_forced_call_grammar_compiles_for_one_function_or_any():
    weather = ("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    for functions, parallel in (([weather], False), ([weather, ("now", None)], True)):
        source = tools.call_grammar(functions, parallel)
        assert grammar.check(Constraint("lark", source)) is None
    assert source.count("call)?") == tools.MAX_PARALLEL_CALLS - 1
    assert tools.call_schema("now", None)["properties"]["arguments"] == {"type": "object"}


def test_the_fallback_renders_tools_calls_and_results_in_hermes_words():
    weather = {"name": "get_weather", "parameters": {"type": "object"}}
    conversation = tools.fallback_conversation([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    ], [weather])
    system, user, assistant, result = conversation
    assert system["role"] == "system" and system["content"].startswith("Be brief.\n\n")
    assert json.dumps({"type": "function", "function": weather}) in system["content"]
    assert "<tool_call>" in system["content"]
    assert user == {"role": "user", "content": "Weather in Paris?"}
    assert assistant == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                         '{"city": "Paris"}}\n</tool_call>'}
    assert result == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    assert tools.fallback_conversation([{"role": "user", "content": "hi"}], [])[0] == {"role": "user", "content": "hi"}
