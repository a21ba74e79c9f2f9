"""The OpenAI request bodies the API accepts, as pydantic models: validation at the HTTP
boundary, so that every refusal is a 400 naming its parameter. Types are strict, as OpenAI's:
a value of the wrong JSON type is refused, not coerced. Every text that goes on the wire is
`Text`: JSON can carry what no UTF-8 can (a lone surrogate), and it is refused here, by name.

A request's JSON comes in; `choices()` turns it into what the broker gets, one dict per choice
(the wire's ChatMessages or prompt, and its SamplingParams), ready for BrokerClient.submit().
The ranges are the wire's own (protocol.py); MAX_N and MAX_CHOICES are the API's.
"""

from __future__ import annotations

import json
from typing import Annotated, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from zmqchat import grammar
from zmqchat import protocol as p
from zmqchat.config import COMPLETION_MAX_TOKENS
from zmqchat.protocol import (MAX_BIASED_TOKENS, MAX_EMBED_INPUTS, MAX_GRAMMAR, MAX_ID, MAX_INT, MAX_LOGIT_BIAS,
                              MAX_NAME, MAX_PENALTY, MAX_STOP_STRINGS, MAX_TEMPERATURE, MAX_TOOLS, MAX_TOP_LOGPROBS,
                              SEED_RANGE)
from zmqchat.tools import call_grammar

MAX_N = 16  # choices of one prompt
MAX_CHOICES = 128  # choices of one request: prompts x n


def _utf8(text: str) -> str:
    """`text`, if UTF-8 (the wire's, the tokenizer's) can hold it: a JSON string may carry a lone
    UTF-16 surrogate (the escape \\ud800 alone), which would otherwise fail only when the request
    is encoded for the wire, as a 400 that names no parameter."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone UTF-16 surrogate (\\ud800 to \\udfff), which is not text") from None
    return text


def refuse(model: type[BaseModel], param: str, value, message: str) -> ValidationError:
    """A validation error that names `param`, for a rule that looks at more than one parameter
    (checked once all are read, so that the error can name the one at fault)."""
    error = InitErrorDetails(type=PydanticCustomError("value_error", message), loc=(param,), input=value)
    return ValidationError.from_exception_data(model.__name__, [error])


Text = Annotated[str, AfterValidator(_utf8)]
Count = Annotated[int, Field(ge=1, le=MAX_INT)]
ModelName = Annotated[Text, Field(min_length=1, max_length=MAX_NAME)]
Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_INT)]], Field(min_length=1)]
TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]  # a token id as a JSON object's key


class Strict(BaseModel):
    # extra: an unknown parameter is a 400 that names it. strict: so is a value of the wrong
    # JSON type (true is not 1, "yes" not true, "5" not 5); an integer is still a number.
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        """OpenAI's API takes null for any optional parameter, meaning its default; some
        clients send every parameter so. A required one stays null, and is refused."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class TextPart(Strict):
    type: Literal["text"]
    text: Text


def _checked(constraint: p.Constraint) -> p.Constraint:
    """`constraint`, or ValueError (a 400 naming the parameter it came from) if it cannot be matched."""
    if len(constraint.source) > MAX_GRAMMAR:
        raise ValueError(f"is longer than {MAX_GRAMMAR} characters as a grammar")
    if error := grammar.check(constraint):
        raise ValueError(error)
    return constraint


def _json_schema(schema: dict) -> p.Constraint:
    return p.Constraint("json_schema", json.dumps(schema, ensure_ascii=False))


def _choice(choices: list[str]) -> p.Constraint:
    return p.Constraint("lark", "start: " + " | ".join(grammar.lark_literal(c) for c in choices))


ANY_JSON_OBJECT = {"type": "object"}


def _json_object_text(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object, as text")
    return text


class FunctionCall(Strict):
    name: Text = Field(min_length=1, max_length=MAX_NAME)
    arguments: Annotated[Text, AfterValidator(_json_object_text)]


class ToolCall(Strict):
    id: Text = Field(max_length=MAX_ID)
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]  # developer: OpenAI's newer name for system
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None  # an assistant's
    tool_call_id: Text | None = Field(default=None, min_length=1, max_length=MAX_ID)  # a tool's result
    # Null (or left out) only in an assistant's turn of tool calls; checked when left out too.
    content: Text | list[TextPart] | None = Field(default=None, validate_default=True)

    @field_validator("tool_calls")
    @classmethod
    def _calls_are_an_assistants(cls, calls: list[ToolCall] | None, info: ValidationInfo):
        if calls and info.data.get("role") != "assistant":
            raise ValueError("only an assistant's message has tool_calls")
        return calls

    @field_validator("tool_call_id")
    @classmethod
    def _ids_are_a_tools(cls, value: str | None, info: ValidationInfo):
        if value is not None and info.data.get("role") != "tool":
            raise ValueError("only a tool's message has a tool_call_id")
        return value

    @field_validator("content")
    @classmethod
    def _content_unless_calls(cls, content, info: ValidationInfo):
        if content is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("Field required (null only in an assistant's message with tool_calls)")
        return content

    @model_validator(mode="after")
    def _a_tool_answers_a_call(self):
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool's message needs the tool_call_id of the call it answers")
        return self

    def wire(self) -> p.ChatMessage:
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        calls = tuple(p.ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        return p.ChatMessage(role="system" if self.role == "developer" else self.role, content=text,
                             tool_calls=calls, tool_call_id=self.tool_call_id or "")


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Text | None = None
    parameters: dict | None = None  # a JSON schema of its arguments; left out: none
    strict: bool | None = None  # forced calls (tool_choice required or named) always keep to it

    @field_validator("parameters")
    @classmethod
    def _matchable(cls, schema: dict | None):
        if schema is not None:
            _checked(_json_schema(schema))
        return schema

    def wire(self) -> p.Function:
        return p.Function(self.name, self.description or "", json.dumps(self.parameters) if self.parameters else "")


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class JSONSchemaFormat(Strict):
    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = None
    schema_: dict | None = Field(default=None, alias="schema")  # left out: any JSON object
    strict: bool | None = None  # the schema is always enforced

    @field_validator("schema_")
    @classmethod
    def _matchable(cls, schema: dict | None):
        if schema is not None:
            _checked(_json_schema(schema))
        return schema


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @field_validator("json_schema")
    @classmethod
    def _only_with_its_type(cls, value: JSONSchemaFormat | None, info: ValidationInfo):
        if (value is not None) != (info.data.get("type") == "json_schema"):
            raise ValueError("is given with type json_schema, and only then")
        return value

    @model_validator(mode="after")
    def _json_schema_needs_one(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema")
        return self

    def constraint(self) -> p.Constraint | None:
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.json_schema else None
        return _json_schema(schema if schema is not None else ANY_JSON_OBJECT)


class StructuredOutputs(Strict):
    """vLLM's extension: the output is one of `choice`, or matches `regex`, the JSON schema
    `json`, the grammar `grammar` (Lark, or GBNF), or is any JSON object (`json_object`)."""

    json_: dict | Text | None = Field(default=None, alias="json")
    regex: Annotated[Text, Field(min_length=1)] | None = None
    choice: Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=1024)] | None = None
    grammar: Annotated[Text, Field(min_length=1)] | None = None
    json_object: bool | None = None

    @field_validator("json_")
    @classmethod
    def _json_matchable(cls, schema: dict | str):
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise ValueError(f"is not JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise ValueError("a JSON schema is a JSON object")
        _checked(_json_schema(schema))
        return schema

    @field_validator("regex")
    @classmethod
    def _regex_matchable(cls, regex: str):
        return _checked(p.Constraint("regex", regex)).source

    @field_validator("choice")
    @classmethod
    def _choice_fits(cls, choices: list[str]):
        _checked(_choice(choices))
        return choices

    @field_validator("grammar")
    @classmethod
    def _grammar_matchable(cls, text: str):
        return _checked(p.Constraint("lark", grammar.lark_of(text))).source

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError("give exactly one of json, regex, choice, grammar and json_object")
        return self

    def constraint(self) -> p.Constraint:
        """The constraint, checked as the fields were validated."""
        if self.json_ is not None or self.json_object:
            return _json_schema(self.json_ if self.json_ is not None else ANY_JSON_OBJECT)
        if self.regex is not None:
            return p.Constraint("regex", self.regex)
        if self.grammar is not None:
            return p.Constraint("lark", self.grammar)
        return _choice(self.choice)


class GenerationRequest(Strict):
    """What chat and text completions share."""

    model: ModelName
    max_tokens: Count | None = None
    # Left out: the model's own sampling defaults apply (else 1.0, as OpenAI's do).
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT)  # vLLM's extension; -1 or 0: no limit
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says
    min_tokens: int = Field(default=0, ge=0, le=MAX_INT)  # vLLM's extension: no end before this many tokens
    # token id (a JSON key, so a string) -> added to its logit; -100 bans it
    logit_bias: Annotated[dict[TokenId, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]],
                          Field(max_length=MAX_BIASED_TOKENS)] | None = None
    # vLLM's extension: each prompt token's logprob, with this many alternatives
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension

    @model_validator(mode="after")
    def _prompt_logprobs_are_not_streamed(self):
        if self.prompt_logprobs is not None and self.stream:
            raise refuse(type(self), "prompt_logprobs", self.prompt_logprobs,
                         "not available with stream: true (as in vLLM)")
        return self

    @field_validator("structured_outputs")
    @classmethod
    def _one_way_to_structure(cls, value: StructuredOutputs | None, info: ValidationInfo):
        response_format = info.data.get("response_format")
        if value is not None and response_format is not None and response_format.type != "text":
            raise ValueError("cannot be combined with a response_format other than text")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(cls, value: StreamOptions | None, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value

    def constraint(self) -> p.Constraint | None:
        """What every choice's output must match, if anything."""
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        return self.response_format.constraint() if self.response_format else None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.stream_options.continuous_usage_stats

    def sampling(self, index: int, **own) -> p.SamplingParams:
        """Choice `index`'s sampling parameters: those both APIs share, and `own`, those each
        sets its own way (max_tokens, logprobs, echo). A seeded request's
        choices get seeds of their own, so that n choices differ and the same request gives
        the same n again."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return p.SamplingParams(
            temperature=self.temperature, top_p=self.top_p,
            top_k=max(self.top_k or 0, 0),  # the wire says "no limit" with 0 only
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            stop=tuple(s for s in stop if s),  # an empty stop string stops nothing, and the wire refuses it
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, constraint=self.constraint(),
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
            seed=None if self.seed is None else (self.seed + index) % (SEED_RANGE[1] + 1), **own)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    parallel_tool_calls: bool = True
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # left out: auto

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _choice_among_the_tools(cls, choice, info: ValidationInfo):
        if choice in (None, "none", "auto"):
            return choice
        tools = info.data.get("tools")
        if not tools:
            raise ValueError("needs tools to choose from")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"names {choice.function.name!r}, which is not among the tools")
        response_format = info.data.get("response_format")
        if info.data.get("structured_outputs") or (response_format and response_format.type != "text"):
            raise ValueError("a forced tool call cannot be combined with response_format or structured_outputs")
        _checked(cls._call_constraint(tools, choice, info.data.get("parallel_tool_calls", True)))
        return choice

    @staticmethod
    def _call_constraint(tools: list[Tool], choice, parallel: bool) -> p.Constraint:
        """The grammar of a reply that is calls and nothing else: of the named function, or any."""
        named = [t for t in tools if choice == "required" or t.function.name == choice.function.name]
        functions = [(t.function.name, t.function.parameters) for t in named]
        return p.Constraint("lark", call_grammar(functions, parallel))

    @property
    def calls_tools(self) -> bool:
        """Whether the model is offered tools, and its reply read for calls."""
        return bool(self.tools) and self.tool_choice != "none"

    def constraint(self) -> p.Constraint | None:
        if self.calls_tools and self.tool_choice not in (None, "auto"):
            return self._call_constraint(self.tools, self.tool_choice, self.parallel_tool_calls)
        return super().constraint()

    def choices(self) -> list[dict]:
        messages = [m.wire() for m in self.messages]
        tools = tuple(t.function.wire() for t in self.tools) if self.calls_tools else ()
        # Left out, max_tokens is the worker's to choose: what the model's context leaves, within a bound.
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        # The choices share their prompt: the first alone scores it.
        return [{"messages": messages, "tools": tools,
                 "params": self.sampling(i, max_tokens=max_tokens, logprobs=logprobs,
                                         prompt_logprobs=None if i else self.prompt_logprobs)}
                for i in range(self.n)]


class CompletionRequest(GenerationRequest):
    prompt: (Text | Annotated[list[Text], Field(min_length=1)]
             | TokenIds | Annotated[list[TokenIds], Field(min_length=1)])
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_INT)  # 0, with echo: score the prompt only
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _max_tokens_0_needs_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise refuse(type(self), "max_tokens", 0, "0 generates nothing: it is only allowed with echo "
                                                      "(to score the prompt, with logprobs)")
        return self

    @field_validator("prompt")
    @classmethod
    def _choices_within_limit(cls, prompt, info: ValidationInfo):
        if len(cls.each_prompt(prompt)) * info.data.get("n", 1) > MAX_CHOICES:
            raise ValueError(f"a request may ask for at most {MAX_CHOICES} choices (prompts x n)")
        return prompt

    @staticmethod
    def each_prompt(prompt) -> list[str | list[int]]:
        """A string or a list of token ids is one prompt; other lists are lists of prompts."""
        return [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else list(prompt)

    def choices(self) -> list[dict]:
        """n choices per prompt, prompt by prompt, as OpenAI numbers them."""
        max_tokens = COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        # Echoed with logprobs, the prompt's tokens come with theirs, as OpenAI's legacy endpoint did.
        echoed = self.logprobs if self.echo else None
        wanted = [k for k in (echoed, self.prompt_logprobs) if k is not None]
        own = {"max_tokens": max_tokens, "echo": self.echo, "logprobs": self.logprobs,
               "prompt_logprobs": max(wanted, default=None)}
        return [{"prompt": prompt, "params": self.sampling(i, **own)}
                for prompt in self.each_prompt(self.prompt) for i in range(self.n)]


class EmbeddingRequest(Strict):
    """OpenAI's embeddings request: one job, all its inputs."""

    model: Text = Field(min_length=1, max_length=MAX_NAME)
    input: (Annotated[Text, Field(min_length=1)]
            | Annotated[list[Annotated[Text, Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
            | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBED_INPUTS)])
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=MAX_INT)  # the vectors cut to this many values
    user: str | None = None
    stream: ClassVar[bool] = False  # an embedding is not streamed

    def choices(self) -> list[dict]:
        inputs = CompletionRequest.each_prompt(self.input)  # a string or token ids is one input, as a prompt is
        return [{"embed": p.Embed(inputs, self.dimensions)}]

