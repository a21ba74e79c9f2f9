"""OpenAI's Responses API (POST /v1/responses), as a thin translation onto chat completions.

A ResponsesRequest (its `instructions`, the conversation of its `previous_response_id`, and its
`input`) becomes a ChatCompletionRequest, which runs as any chat does (routes.generate). A
ResponsesCompletion shapes that chat's events as a Response object, or as the Responses API's
typed stream events (response.created ... response.completed, each with its sequence_number),
and keeps each finished response in the ResponseStore: a later request may continue it, and
GET /v1/responses/{id} shows it. The store is the API process's own, in memory and bounded.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field, model_validator

from zmqchat.api.responses import Completion
from zmqchat.api.schemas import (ChatCompletionRequest, ChatMessage, Count, JSONSchemaFormat, ModelName,
                                 ResponseFormat, Strict, Temperature, Text, TopP)
from zmqchat.client import BrokerError, Stream
from zmqchat.metrics import RequestMetrics
from zmqchat.protocol import MAX_ID, Output, TokenLogprob

MAX_METADATA = 16  # key-value pairs, as OpenAI allows, of up to 64 and 512 characters
MAX_ANNOTATIONS = 64  # of an output_text part sent back as input (ignored)


class InputText(Strict):
    # output_text: an earlier response's output item, sent back as input (its annotations ignored)
    type: Literal["input_text", "output_text"]
    text: Text
    annotations: Annotated[list[dict], Field(max_length=MAX_ANNOTATIONS)] | None = None


class InputMessage(Strict):
    """A message item of `input`: a string's, or an earlier output item's, shape."""

    role: Literal["user", "assistant", "system", "developer"]
    content: Text | list[InputText]
    type: Literal["message"] = "message"
    id: str | None = None  # an output item sent back carries its id and status
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _only_messages(cls, data):
        """Another item type (a function call's output, a reasoning item...) is refused by its
        type, not by the message fields it lacks."""
        if isinstance(data, dict) and data.get("type", "message") != "message":
            raise ValueError(f"input items of type {str(data['type'])[:64]!r} are not supported by zmqchat, "
                             "only messages")
        return data

    def chat_message(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return ChatMessage(role=self.role, content=text)


class TextFormat(Strict):
    """`text.format`: chat's response_format, with a JSON schema's fields at the top."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _a_response_format(self):
        self.response_format()  # checks it: a schema the grammar engine cannot enforce is a 400
        return self

    def response_format(self) -> ResponseFormat:
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        return ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat(
            name=self.name or "", description=self.description, schema=self.schema_, strict=self.strict))


class TextConfig(Strict):
    format: TextFormat


class ResponsesRequest(Strict):
    model: ModelName
    input: Text | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: Text | None = None  # a system message first, for this response only (not carried on)
    previous_response_id: Annotated[str, Field(max_length=MAX_ID)] | None = None
    max_output_tokens: Count | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    store: bool = True
    metadata: Annotated[dict[Annotated[str, Field(max_length=64)], Annotated[Text, Field(max_length=512)]],
                        Field(max_length=MAX_METADATA)] | None = None
    user: str | None = None
    text: TextConfig | None = None

    def messages(self) -> tuple[ChatMessage, ...]:
        """`input` as chat messages: a string is one user message."""
        if isinstance(self.input, str):
            return (ChatMessage(role="user", content=self.input),)
        return tuple(item.chat_message() for item in self.input)

    def chat_request(self, history: tuple[ChatMessage, ...]) -> ChatCompletionRequest:
        """The chat that answers this request, continuing `history` (a stored conversation)."""
        instructions = (ChatMessage(role="system", content=self.instructions),) if self.instructions else ()
        return ChatCompletionRequest(model=self.model, messages=[*instructions, *history, *self.messages()],
                                     max_tokens=self.max_output_tokens, temperature=self.temperature,
                                     top_p=self.top_p, stream=self.stream, user=self.user,
                                     response_format=self.text.format.response_format() if self.text else None)


@dataclass(frozen=True)
class StoredResponse:
    body: dict  # the Response object, as GET /v1/responses/{id} returns it
    # Its conversation, without instructions: what it continued, its input and its output. It
    # shares its messages with the conversation it continued: a chain costs its texts once.
    conversation: tuple[ChatMessage, ...]


class ResponseStore:
    """The `size` most recently used finished responses (created, read or continued), by id;
    the least recently used goes first. Pure: no I/O, no clock."""

    def __init__(self, size: int):
        self.size = size
        self.responses: OrderedDict[str, StoredResponse] = OrderedDict()

    def get(self, response_id: str) -> StoredResponse | None:
        stored = self.responses.get(response_id)
        if stored is not None:
            self.responses.move_to_end(response_id)
        return stored

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self.responses[response_id] = stored
        self.responses.move_to_end(response_id)
        while len(self.responses) > self.size:
            self.responses.popitem(last=False)

    def delete(self, response_id: str) -> bool:
        return self.responses.pop(response_id, None) is not None


class ResponsesCompletion(Completion):
    """A chat's events as a Response, or as the Responses API's stream events; its one message
    output item holds one output_text part. A finished response is stored if `store`."""

    object = "response"
    id_prefix = "resp_"
    request: ChatCompletionRequest

    def __init__(self, stream: Stream, request: ChatCompletionRequest, timing: RequestMetrics, *,
                 asked: ResponsesRequest, history: tuple[ChatMessage, ...], store: ResponseStore):
        super().__init__(stream, request, timing)
        self.asked = asked
        self.conversation = history + asked.messages()
        self.store = store
        self.item_id = f"msg_{stream.id}"
        self.sequence_number = 0  # of the next stream event
        self.streamed: list[str] = []  # the text streamed so far

    # -- a whole response ----------------------------------------------------------------------

    def body(self, texts: dict[int, str], logprobs: dict[int, list[TokenLogprob]], prompts) -> dict:
        return self._finish(texts[0])

    def _finish(self, text: str) -> dict:
        """The finished Response, stored where asked."""
        cut = self.finished[0].finish == "length"
        status = "incomplete" if cut else "completed"
        response = self._response(status, [self._message(status, [_output_text(text)])], _usage(self._usage()))
        if cut:
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        if self.asked.store:
            answer = ChatMessage(role="assistant", content=text)
            self.store.put(self.id, StoredResponse(response, (*self.conversation, answer)))
        return response

    def _response(self, status: str, output: list[dict], usage: dict | None = None, error: dict | None = None) -> dict:
        asked = self.asked
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": error, "incomplete_details": None, "instructions": asked.instructions,
                "max_output_tokens": asked.max_output_tokens, "model": asked.model, "output": output,
                "parallel_tool_calls": False, "previous_response_id": asked.previous_response_id,
                "store": asked.store, "temperature": asked.temperature, "top_p": asked.top_p,
                "text": {"format": asked.text.format.model_dump(by_alias=True, exclude_none=True) if asked.text
                         else {"type": "text"}}, "tool_choice": "none", "tools": [], "truncation": "disabled",
                "usage": usage, "user": asked.user, "metadata": asked.metadata or {}}

    def _message(self, status: str, content: list[dict]) -> dict:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": content}

    # -- its stream events ---------------------------------------------------------------------

    def opening_chunks(self) -> list[str]:
        started = self._response("in_progress", [])
        return [self._event("response.created", response=started),
                self._event("response.in_progress", response=started),
                self._event("response.output_item.added", output_index=0, item=self._message("in_progress", [])),
                self._event("response.content_part.added", **self._where(), part=_output_text(""))]

    def output_chunks(self, index: int, output: Output) -> list[str]:
        if not output.text:
            return []
        self.streamed.append(output.text)
        return [self._event("response.output_text.delta", **self._where(), delta=output.text, logprobs=[])]

    def closing_chunks(self) -> list[str]:
        response = self._finish("".join(self.streamed))
        message = response["output"][0]
        part = message["content"][0]
        return [self._event("response.output_text.done", **self._where(), text=part["text"], logprobs=[]),
                self._event("response.content_part.done", **self._where(), part=part),
                self._event("response.output_item.done", output_index=0, item=message),
                self._event(f"response.{response['status']}", response=response)]

    def error_chunks(self, error: BrokerError) -> list[str]:
        failed = self._response("failed", [], error={"code": error.code.value, "message": error.message})
        return [self._event("response.failed", response=failed)]

    def _where(self) -> dict:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def _event(self, kind: str, **fields) -> str:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(chat_usage: dict) -> dict:
    """A chat's usage in the Responses API's words."""
    return {"input_tokens": chat_usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens": chat_usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat_usage["total_tokens"]}
