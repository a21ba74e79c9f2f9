"""Tool calling, as text: how tools reach a model whose chat template cannot render them, how
its calls are found in its output, and the grammar that makes it call one. Pure: no I/O.

A ToolParser reads one format of calls out of a model's text: Hermes/Qwen (`<tool_call>{"name":
..., "arguments": {...}}</tool_call>`), Llama 3 (a JSON object `{"name": ..., "parameters":
{...}}`, maybe after `<|python_tag|>`), Mistral (`[TOOL_CALLS] [{"name": ..., "arguments":
{...}}]`); `auto` reads whichever the text holds. The API picks one (`--tool-parser`), parses each
finished reply with it, and holds back streamed text from where a call may begin. A template
without tools (the default model's) gets them from `fallback_system_prompt()` in Hermes' words,
which is also the format `call_grammar()` forces for `tool_choice` required or a named function.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Protocol

MAX_PARALLEL_CALLS = 4  # calls one forced reply may make: a small model would otherwise go on calling
# JSON on one line, as structured output writes it (zmqchat/grammar.py), inside a Lark grammar.
ONE_LINE_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's shape)


class ToolParser(Protocol):
    def parse(self, text: str) -> tuple[str, list[Call]]:
        """The text that is not a call (stripped), and the calls, in order; no calls and the
        whole text where it holds none that parse."""

    def call_start(self, text: str) -> int:
        """Where, in a reply so far, a call begins or may begin with more text; -1 if nowhere."""


def _call(obj, arguments_key: str = "arguments") -> Call | None:
    """A call from a decoded JSON object {"name": ..., arguments_key: {...}}, or None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    if isinstance(arguments, str):  # some models send the arguments already as text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return Call(obj["name"], json.dumps(arguments, ensure_ascii=False))


def _marker_start(text: str, marker: str) -> int:
    """Where `marker` starts in `text`, or where a tail of `text` could be its beginning; -1."""
    found = text.find(marker)
    if found >= 0:
        return found
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return len(text) - length
    return -1


class HermesParser:
    """Hermes and Qwen: each call a JSON object between <tool_call> and </tool_call>."""

    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[Call]]:
        calls = []
        for match in self.CALL.finditer(text):
            try:
                call = _call(json.loads(match.group(1)))
            except ValueError:
                call = None
            if call is None:
                if calls and not match.group(0).endswith(self.CLOSE):
                    break  # a reply cut by max_tokens inside its last call keeps the calls before it
                return text.strip(), []
            calls.append(call)
        return self.CALL.sub("", text).strip(), calls

    def call_start(self, text: str) -> int:
        return _marker_start(text, self.OPEN)


class Llama3Parser:
    """Llama 3.1+: the reply is a call, a JSON object with "name" and "parameters" (several
    separated by ";"), maybe after <|python_tag|>."""

    TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str, list[Call]]:
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return text.strip(), []
        calls, decoder, at = [], json.JSONDecoder(), 0
        while at < len(body):
            try:
                obj, at = decoder.raw_decode(body, at)
            except ValueError:
                return text.strip(), []
            call = _call(obj, "parameters")
            if call is None:
                return text.strip(), []
            calls.append(call)
            at = len(body) - len(body[at:].lstrip().removeprefix(";").lstrip())
        return "", calls

    def call_start(self, text: str) -> int:
        head = text.lstrip()
        if not head or head.startswith("{") or self.TAG.startswith(head[:len(self.TAG)]):
            return len(text) - len(head)
        return -1


class MistralParser:
    """Mistral: [TOOL_CALLS] then a JSON list of {"name", "arguments"} objects."""

    MARKER = "[TOOL_CALLS]"

    def parse(self, text: str) -> tuple[str, list[Call]]:
        start = text.find(self.MARKER)
        if start < 0:
            return text.strip(), []
        try:
            objs, _ = json.JSONDecoder().raw_decode(text[start + len(self.MARKER):].lstrip())
        except ValueError:
            return text.strip(), []
        calls = [_call(obj) for obj in (objs if isinstance(objs, list) else [objs])]
        if not calls or None in calls:
            return text.strip(), []
        return text[:start].strip(), calls

    def call_start(self, text: str) -> int:
        return _marker_start(text, self.MARKER)


class AutoParser:
    """Whichever format the reply holds: Hermes' or Mistral's marker anywhere, else a reply
    that is Llama 3's JSON."""

    PARSERS = (HermesParser(), MistralParser(), Llama3Parser())

    def parse(self, text: str) -> tuple[str, list[Call]]:
        for parser in self.PARSERS:
            content, calls = parser.parse(text)
            if calls:
                return content, calls
        return text.strip(), []

    def call_start(self, text: str) -> int:
        starts = [s for s in (p.call_start(text) for p in self.PARSERS) if s >= 0]
        return min(starts, default=-1)


PARSERS: dict[str, ToolParser] = {"auto": AutoParser(), "hermes": HermesParser(), "llama3": Llama3Parser(),
                                  "mistral": MistralParser()}


def call_schema(name: str, parameters: dict | None) -> dict:
    """The JSON of a call of function `name` whose arguments keep to `parameters`."""
    return {"type": "object", "properties": {"name": {"const": name},
                                              "arguments": parameters or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def call_grammar(functions: list[tuple[str, dict | None]], parallel: bool) -> str:
    """A Lark grammar (llguidance's, with %json) for a reply that is nothing but Hermes calls of
    `functions` ((name, parameters schema) pairs): one, or with `parallel` up to MAX_PARALLEL_CALLS."""
    schemas = [call_schema(name, parameters) for name, parameters in functions]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    calls = 'call' + ' ("\\n" call)?' * ((MAX_PARALLEL_CALLS - 1) if parallel else 0)
    return (f"start: {calls}\n"
            f'call: "<tool_call>\\n" call_json "\\n</tool_call>"\n'
            f"call_json: %json {json.dumps({**schema, 'x-guidance': ONE_LINE_JSON}, ensure_ascii=False)}\n")


def fallback_system_prompt(functions: list[dict]) -> str:
    """Tools in Hermes' words, for a system message, where the chat template cannot render them.
    `functions`: OpenAI's function objects (name, description, parameters)."""
    listed = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return ("You are a function calling AI model. You are provided with function signatures within <tools></tools> "
            "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions "
            f"about what values to plug into functions. Here are the available tools: <tools>\n{listed}\n</tools>\n"
            "For each function call return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags as follows:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-dict>}\n</tool_call>')


def fallback_conversation(conversation: list[dict], functions: list[dict]) -> list[dict]:
    """A conversation (chat template dicts: role, content, an assistant's tool_calls, a tool's
    tool_call_id) that a template without tools can render: the tools in the system message
    (`functions` offered, if any), an assistant's calls as Hermes' <tool_call> text after its
    words, and a tool's result as a user turn in <tool_response> (Qwen's way)."""
    turns = []
    for message in conversation:
        if message["role"] == "tool":
            turns.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif message.get("tool_calls"):
            calls = [json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                ensure_ascii=False) for c in message["tool_calls"]]
            text = "\n".join([message["content"]] * bool(message["content"])
                              + [f"<tool_call>\n{call}\n</tool_call>" for call in calls])
            turns.append({"role": "assistant", "content": text})
        else:
            turns.append({"role": message["role"], "content": message["content"]})
    if not functions:
        return turns
    prompt = fallback_system_prompt(functions)
    if turns and turns[0]["role"] == "system":
        return [{"role": "system", "content": f"{turns[0]['content']}\n\n{prompt}"}] + turns[1:]
    return [{"role": "system", "content": prompt}] + turns
