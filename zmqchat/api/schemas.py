"""The OpenAI request bodies the API accepts, as pydantic models: validation at the HTTP
boundary, so that every refusal is a 400 naming its parameter. Types are strict, as OpenAI's:
a value of the wrong JSON type is refused, not coerced. Every text that goes on the wire is
`Text`: JSON can carry what no UTF-8 can (a lone surrogate), and it is refused here, by name.

A request's JSON comes in; `choices()` turns it into what the broker gets, one dict per choice
(the wire's ChatMessages or prompt, and its SamplingParams), ready for BrokerClient.submit().
The ranges are the wire's own (protocol.py); MAX_N and MAX_CHOICES are the API's.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic_core import InitErrorDetails, PydanticCustomError

from zmqchat import protocol as p
from zmqchat.config import COMPLETION_MAX_TOKENS
from zmqchat.protocol import (MAX_BIASED_TOKENS, MAX_EMBED_INPUTS, MAX_INT, MAX_LOGIT_BIAS, MAX_NAME, MAX_PENALTY,
                              MAX_STOP_STRINGS, MAX_TEMPERATURE, MAX_TOP_LOGPROBS, SEED_RANGE)

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


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's newer name for system
    content: Text | list[TextPart]
    name: str | None = None

    def wire(self) -> p.ChatMessage:
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return p.ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, every chunk carries the usage so far


class ResponseFormat(Strict):
    type: Literal["text"]  # JSON modes would need constrained decoding, which zmqchat does not do


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

    @model_validator(mode="after")
    def _prompt_logprobs_are_not_streamed(self):
        if self.prompt_logprobs is not None and self.stream:
            raise refuse(type(self), "prompt_logprobs", self.prompt_logprobs,
                         "not available with stream: true (as in vLLM)")
        return self

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_a_stream(cls, value: StreamOptions | None, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value

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
            ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
            seed=None if self.seed is None else (self.seed + index) % (SEED_RANGE[1] + 1), **own)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("needs logprobs set to true")
        return value

    def choices(self) -> list[dict]:
        messages = [m.wire() for m in self.messages]
        # Left out, max_tokens is the worker's to choose: what the model's context leaves, within a bound.
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        # The choices share their prompt: the first alone scores it.
        return [{"messages": messages, "params": self.sampling(i, max_tokens=max_tokens, logprobs=logprobs,
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

