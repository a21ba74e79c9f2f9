"""A request's answer: its events from the broker turned into OpenAI's response shapes.

Events (each choice's Outputs, or the error that ends the request) come in from a Stream,
interleaved across choices; they leave as one JSON body (`json()`) or as server-sent events in
OpenAI's chunk format (`sse()`), and are counted in the request's metrics and usage on the way.
Completion does both for any API; ChatCompletion and TextCompletion shape their choices, and
the Responses API (responses_api.py) its own body and events. Embeddings gathers an embedding
job's vectors, as they come in its outputs, into one body.
"""

from __future__ import annotations

import base64

import json
import logging
import struct
import time
import uuid
from typing import AsyncIterator

from fastapi.responses import JSONResponse

from zmqchat.api.errors import LOGGED_MESSAGE, broker_error_body, broker_error_response, clip
from zmqchat.api.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, GenerationRequest
from zmqchat.client import BrokerClient, BrokerError, Event, Stream
from zmqchat.metrics import RequestMetrics
from zmqchat.protocol import Alternative, Output, PromptToken, TokenLogprob, Usage
from zmqchat.tools import PARSERS, Call

log = logging.getLogger("zmqchat.api")


class Completion:
    """One request's events as an OpenAI response or its chunk stream. Each choice ends with
    its finished Output, the request with the last choice's, or with the first error.
    Subclasses shape the choices of their API."""

    object: str  # of a whole response
    finish_with_last_text = False  # the finish reason rides on the last text's chunk (legacy completions)
    chunk_object: str  # of each streamed chunk
    id_prefix: str

    def __init__(self, stream: Stream, request: GenerationRequest, timing: RequestMetrics):
        self.stream = stream
        self.request = request
        self.id = f"{self.id_prefix}{stream.id}"
        self.created = int(time.time())
        self.timing = timing
        self.finished: dict[int, Output] = {}  # each choice's last Output, by index
        self.usages: dict[int, Usage] = {}  # each choice's latest usage: from its first output, its prompt's size
        self.generated: dict[int, int] = {}  # each choice's tokens so far

    async def events(self, first: Event) -> AsyncIterator[Event]:
        """The request's events from `first` to its end, each counted in the metrics."""
        event = first
        while True:
            if event.error is not None:
                self.failed(event.error)
                yield event
                return
            if event.output.text or event.output.logprobs:
                self.timing.output(event.index)
            self._count(event.index, event.output)
            if event.output.finish is not None:
                self.finished[event.index] = event.output
            yield event
            if self.stream.finished:
                self._record_finish()
                return
            event = await self.stream.next()

    def _record_finish(self) -> None:
        usage = self._usage()
        reasons = {output.finish for output in self.finished.values()}
        outcome = reasons.pop() if len(reasons) == 1 else "mixed"
        output_tokens = usage.get("completion_tokens", 0)
        self.timing.finished(outcome, usage["prompt_tokens"], output_tokens)
        log.info("request %s: %s, %d prompt + %d output tokens", self.stream.id, outcome,
                 usage["prompt_tokens"], output_tokens)

    def failed(self, error: BrokerError) -> None:
        self.timing.failed(error.code.value)
        log.info("request %s failed (%s): %s", self.stream.id, error.code.value, clip(error.message, LOGGED_MESSAGE))

    def left(self) -> None:
        self.timing.failed("cancelled")
        log.info("request %s: the client left; cancelling", self.stream.id)

    def _count(self, index: int, output: Output) -> None:
        self.generated[index] = self.generated.get(index, 0) + output.tokens
        if output.usage is not None:
            self.usages[index] = output.usage

    def _usage(self) -> dict:
        """The usage so far; at the end, the request's."""
        # The n choices of one prompt read it once: its tokens are counted once.
        prompts = {index // self.request.n: usage for index, usage in self.usages.items()}
        prompt = sum(usage.prompt_tokens for usage in prompts.values())
        cached = sum(usage.cached_tokens for usage in prompts.values())
        completion = sum(self.generated.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def json(self, first: Event) -> JSONResponse | dict:
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        prompts: dict[int, list[PromptToken]] = {}  # each choice's prompt tokens, where it asked
        async for event in self.events(first):
            if event.error is not None:
                return broker_error_response(event.error)
            texts.setdefault(event.index, []).append(event.output.text)
            logprobs.setdefault(event.index, []).extend(event.output.logprobs or [])
            if event.output.prompt_logprobs is not None:
                prompts[event.index] = event.output.prompt_logprobs
        return self.body({i: "".join(texts[i]) for i in texts}, logprobs, prompts)

    async def sse(self, client: BrokerClient, first: Event) -> AsyncIterator[str]:
        completed = False
        try:
            async for event in self.events(first):
                if event is first:  # counted: its prompt's size is known to a running usage
                    for opening in self.opening_chunks():
                        yield opening
                if event.error is not None:
                    for chunk in self.error_chunks(event.error):
                        yield chunk
                    break
                for chunk in self.output_chunks(event.index, event.output):
                    yield chunk
            else:
                for chunk in self.closing_chunks():
                    yield chunk
            completed = True
        finally:
            # Runs when the stream ends and when the client disconnects mid-stream.
            if not completed:
                self.left()
            client.finish(self.stream)

    # -- OpenAI's completion shapes; the Responses API has its own ------------------------------

    def body(self, texts: dict[int, str], logprobs: dict[int, list[TokenLogprob]],
             prompts: dict[int, list[PromptToken]]) -> dict:
        """The whole response, from each choice's text, logprobs and prompt logprobs."""
        choices = [self.choice(i, texts[i], logprobs[i], self.finished[i].finish, prompts.get(i))
                   for i in sorted(self.finished)]
        return {**self._header(self.object), "choices": choices, "usage": self._usage(), **self.extras(prompts)}

    def closing_chunks(self) -> list[str]:
        """What a stream sends after the last output: the usage where asked, and its end."""
        if not self.request.include_usage:
            return ["data: [DONE]\n\n"]
        return [_sse({**self._header(self.chunk_object), "choices": [], "usage": self._usage()}), "data: [DONE]\n\n"]

    def error_chunks(self, error: BrokerError) -> list[str]:
        """What a stream sends when an error ends it."""
        return [_sse(broker_error_body(error)), "data: [DONE]\n\n"]

    def output_chunks(self, index: int, output: Output) -> list[str]:
        """An Output's chunks: its new text, and its finish reason if it is the choice's last:
        in the text's own chunk where the API does so, else in one of its own."""
        has_text = bool(output.text or output.logprobs or output.prompt_logprobs)
        prompt = output.prompt_logprobs
        if has_text and output.finish is not None and self.finish_with_last_text:
            return [self._chunk(self.chunk_choice(index, output.text, output.logprobs, output.finish, prompt))]
        chunks = []
        if has_text:
            chunks.append(self._chunk(self.chunk_choice(index, output.text, output.logprobs, None, prompt)))
        if output.finish is not None:
            chunks.append(self._chunk(self.chunk_choice(index, None, None, output.finish, None)))
        return chunks

    def _header(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.request.model}

    def _chunk(self, choice: dict) -> str:
        """A chunk of one choice; with continuous usage stats (vLLM's), the usage so far."""
        usage = {"usage": self._usage()} if self.request.continuous_usage else {}
        return _sse({**self._header(self.chunk_object), "choices": [choice], **usage})

    # -- the API's shapes, supplied by subclasses -----------------------------------------

    def opening_chunks(self) -> list[str]:
        """What a stream sends before any output."""
        return []

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob], finish_reason: str,
               prompt: list[PromptToken] | None) -> dict:
        raise NotImplementedError

    def chunk_choice(self, index: int, text: str | None, logprobs: list[TokenLogprob] | None,
                     finish_reason: str | None, prompt: list[PromptToken] | None) -> dict:
        raise NotImplementedError

    def extras(self, prompts: dict[int, list[PromptToken]]) -> dict:
        """Fields of a whole response beside its choices."""
        return {}


class ChatCompletion(Completion):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"
    request: ChatCompletionRequest

    def __init__(self, stream: Stream, request: ChatCompletionRequest, timing: RequestMetrics,
                 tool_parser: str = "auto"):
        super().__init__(stream, request, timing)
        # With tools offered, each reply is read for calls (zmqchat/tools.py); streamed, the text
        # from where one may begin is held back, with its logprobs, until it is known to be text
        # or is parsed.
        self.parser = PARSERS[tool_parser] if request.calls_tools else None
        self.held: dict[int, tuple[str, list[TokenLogprob]]] = {}

    def opening_chunks(self) -> list[str]:
        """The role, first, in each choice's first delta, as OpenAI's clients expect."""
        return [self._chunk({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}) for i in range(self.request.n)]

    def choice(self, index, text, logprobs, finish_reason, prompt) -> dict:
        message = {"role": "assistant", "content": text}
        content, calls = self.parser.parse(text) if self.parser else (text, [])
        if calls:
            message = {"role": "assistant", "content": content or None, "tool_calls": _tool_calls(calls)}
        return {"index": index, "message": message, "logprobs": self._logprobs(logprobs),
                "finish_reason": _finish_reason(finish_reason, calls)}

    def output_chunks(self, index: int, output: Output) -> list[str]:
        if self.parser is None:
            return super().output_chunks(index, output)
        text, logprobs = self.held.pop(index, ("", []))
        text, logprobs = text + output.text, logprobs + (output.logprobs or [])
        if output.finish is None:
            start = self.parser.call_start(text)
            if start >= 0:
                self.held[index] = (text[start:], logprobs)
                text, logprobs = text[:start], []
            return [self._chunk(self.chunk_choice(index, text, logprobs, None, None))] if text else []
        content, calls = self.parser.parse(text)
        chunks = []
        if calls:
            if content:
                chunks.append(self._chunk(self.chunk_choice(index, content, None, None, None)))
            chunks.append(self._chunk({"index": index, "delta": {"tool_calls": _tool_calls(calls, indexed=True)},
                                       "logprobs": self._logprobs(logprobs), "finish_reason": None}))
        elif text or logprobs:
            chunks.append(self._chunk(self.chunk_choice(index, text, logprobs, None, None)))
        return chunks + [self._chunk(self.chunk_choice(index, None, None, _finish_reason(output.finish, calls), None))]

    def chunk_choice(self, index, text, logprobs, finish_reason, prompt) -> dict:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}

    def extras(self, prompts) -> dict:
        """vLLM gives a chat's prompt logprobs once, beside its choices (they share the prompt)."""
        k = self.request.prompt_logprobs
        return {} if k is None else {"prompt_logprobs": _vllm_prompt_logprobs(prompts.get(0, []), k)}

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if not self.request.logprobs or entries is None:
            return None
        return {"content": [{**_token_logprob(entry), "top_logprobs": [_token_logprob(top) for top in entry.top]}
                            for entry in entries]}


class TextCompletion(Completion):
    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"
    finish_with_last_text = True  # as OpenAI's legacy endpoint streams it
    request: CompletionRequest

    def choice(self, index, text, logprobs, finish_reason, prompt) -> dict:
        choice = {"index": index, "text": text, "logprobs": self._logprobs(prompt, logprobs),
                  "finish_reason": finish_reason}
        if self.request.prompt_logprobs is not None:
            choice["prompt_logprobs"] = _vllm_prompt_logprobs(prompt or [], self.request.prompt_logprobs)
        return choice

    def chunk_choice(self, index, text, logprobs, finish_reason, prompt) -> dict:
        return self.choice(index, text or "", logprobs, finish_reason, prompt)

    def _logprobs(self, prompt: list[PromptToken] | None, entries: list[TokenLogprob] | None) -> dict | None:
        """The legacy shape: parallel lists, top alternatives as {token: logprob}; an echoed
        prompt's tokens first, the first of them with null for its logprob and alternatives."""
        k = self.request.logprobs
        if k is None or entries is None:
            return None
        echoed = prompt if self.request.echo and prompt else []
        return {"tokens": [t.token for t in echoed] + [e.token for e in entries],
                "token_logprobs": [t.logprob for t in echoed] + [e.logprob for e in entries],
                "top_logprobs": [None if t.logprob is None else _top(t.top[:k]) for t in echoed]
                                + [_top(e.top) for e in entries],
                "text_offset": [t.offset for t in echoed] + [e.offset for e in entries]}


class Embeddings(Completion):
    """An embedding job's vectors, which arrive a step's worth at a time, in one body."""

    object = "list"
    id_prefix = "embd-"
    request: EmbeddingRequest

    async def json(self, first: Event) -> JSONResponse | dict:
        vectors: list[bytes] = []
        async for event in self.events(first):
            if event.error is not None:
                return broker_error_response(event.error)
            vectors += event.output.embeddings or []
        data = [{"object": "embedding", "index": i, "embedding": self._encoded(v)} for i, v in enumerate(vectors)]
        return {"object": self.object, "data": data, "model": self.request.model, "usage": self._usage()}

    def _encoded(self, vector: bytes) -> list[float] | str:
        """The wire's little-endian float32 bytes are what OpenAI's base64 holds."""
        if self.request.encoding_format == "base64":
            return base64.b64encode(vector).decode()
        return list(struct.unpack(f"<{len(vector) // 4}f", vector))

    def _usage(self) -> dict:
        tokens = sum(output.usage.prompt_tokens for output in self.finished.values())
        return {"prompt_tokens": tokens, "total_tokens": tokens}


def _top(alternatives: list[Alternative]) -> dict:
    return {top.token: top.logprob for top in alternatives}


def _vllm_prompt_logprobs(prompt: list[PromptToken], k: int) -> list[dict | None]:
    """vLLM's prompt_logprobs: null for the first token, then per token {token id: {logprob,
    rank, decoded_token}} for it and its k likeliest alternatives (ranked 1 to k)."""
    def ranked(token: PromptToken) -> dict:
        entries = {str(token.id): {"logprob": token.logprob, "rank": token.rank, "decoded_token": token.token}}
        for rank, top in enumerate(token.top[:k], 1):
            entries.setdefault(str(top.id), {"logprob": top.logprob, "rank": rank, "decoded_token": top.token})
        return entries

    return [None if token.logprob is None else ranked(token) for token in prompt]


def _tool_calls(calls: list[Call], indexed: bool = False) -> list[dict]:
    """OpenAI's tool_calls, each with an id of its own; in a stream's delta, with its index."""
    return [{**({"index": i} if indexed else {}), "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}} for i, call in enumerate(calls)]


def _finish_reason(finish: str, calls: list[Call]) -> str:
    """A reply that ended by itself with calls ends for them."""
    return "tool_calls" if calls and finish == "stop" else finish


def _token_logprob(entry: TokenLogprob | Alternative) -> dict:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.raw)}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
