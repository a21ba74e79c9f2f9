"""A request's answer: its events from the broker turned into OpenAI's response shapes.

Events (each choice's Outputs, or the error that ends the request) come in from a Stream,
interleaved across choices; they leave as one JSON body (`json()`) or as server-sent events in
OpenAI's chunk format (`sse()`), and are counted in the request's metrics on the way.
Completion does both for any API; ChatCompletion and TextCompletion shape their choices.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi.responses import JSONResponse

from zmqchat.api.errors import LOGGED_MESSAGE, broker_error_body, broker_error_response, clip
from zmqchat.api.schemas import ChatCompletionRequest, CompletionRequest, GenerationRequest
from zmqchat.client import BrokerClient, BrokerError, Event, Stream
from zmqchat.metrics import RequestMetrics
from zmqchat.protocol import Alternative, Output, TokenLogprob
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
        self.timing.finished(outcome, usage["prompt_tokens"], usage["completion_tokens"])
        log.info("request %s: %s, %d prompt + %d output tokens", self.stream.id, outcome,
                 usage["prompt_tokens"], usage["completion_tokens"])

    def failed(self, error: BrokerError) -> None:
        self.timing.failed(error.code.value)
        log.info("request %s failed (%s): %s", self.stream.id, error.code.value, clip(error.message, LOGGED_MESSAGE))

    def left(self) -> None:
        self.timing.failed("cancelled")
        log.info("request %s: the client left; cancelling", self.stream.id)

    def _usage(self) -> dict:
        # The n choices of one prompt read it once: its tokens are counted once.
        prompt = sum(o.usage.prompt_tokens for i, o in self.finished.items() if i % self.request.n == 0)
        completion = sum(o.usage.completion_tokens for o in self.finished.values())
        cached = sum(o.usage.cached_tokens for i, o in self.finished.items() if i % self.request.n == 0)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    async def json(self, first: Event) -> JSONResponse | dict:
        texts: dict[int, list[str]] = {}
        logprobs: dict[int, list[TokenLogprob]] = {}
        async for event in self.events(first):
            if event.error is not None:
                return broker_error_response(event.error)
            texts.setdefault(event.index, []).append(event.output.text)
            logprobs.setdefault(event.index, []).extend(event.output.logprobs or [])
        choices = [self.choice(i, "".join(texts[i]), logprobs[i], self.finished[i].finish)
                   for i in sorted(self.finished)]
        return {**self._header(self.object), "choices": choices, "usage": self._usage()}

    async def sse(self, client: BrokerClient, first: Event) -> AsyncIterator[str]:
        completed = False
        try:
            for opening in self.opening_chunks():
                yield opening
            async for event in self.events(first):
                if event.error is not None:
                    yield _sse(broker_error_body(event.error))
                    break
                for chunk in self._chunks(event.index, event.output):
                    yield chunk
            else:
                if self.request.include_usage:
                    yield _sse({**self._header(self.chunk_object), "choices": [], "usage": self._usage()})
            yield "data: [DONE]\n\n"
            completed = True
        finally:
            # Runs when the stream ends and when the client disconnects mid-stream.
            if not completed:
                self.left()
            client.finish(self.stream)

    def _chunks(self, index: int, output: Output) -> list[str]:
        """An Output's chunks: its new text, and its finish reason if it is the choice's last:
        in the text's own chunk where the API does so, else in one of its own."""
        has_text = bool(output.text or output.logprobs)
        if has_text and output.finish is not None and self.finish_with_last_text:
            return [self._chunk(self.chunk_choice(index, output.text, output.logprobs, output.finish))]
        chunks = []
        if has_text:
            chunks.append(self._chunk(self.chunk_choice(index, output.text, output.logprobs, None)))
        if output.finish is not None:
            chunks.append(self._chunk(self.chunk_choice(index, None, None, output.finish)))
        return chunks

    def _header(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.request.model}

    def _chunk(self, choice: dict) -> str:
        return _sse({**self._header(self.chunk_object), "choices": [choice]})

    # -- the API's shapes, supplied by subclasses -----------------------------------------

    def opening_chunks(self) -> list[str]:
        """What a stream sends before any output."""
        return []

    def choice(self, index: int, text: str, logprobs: list[TokenLogprob], finish_reason: str) -> dict:
        raise NotImplementedError

    def chunk_choice(self, index: int, text: str | None, logprobs: list[TokenLogprob] | None,
                     finish_reason: str | None) -> dict:
        raise NotImplementedError


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

    def choice(self, index, text, logprobs, finish_reason) -> dict:
        message = {"role": "assistant", "content": text}
        content, calls = self.parser.parse(text) if self.parser else (text, [])
        if calls:
            message = {"role": "assistant", "content": content or None, "tool_calls": _tool_calls(calls)}
        return {"index": index, "message": message, "logprobs": self._logprobs(logprobs),
                "finish_reason": _finish_reason(finish_reason, calls)}

    def _chunks(self, index: int, output: Output) -> list[str]:
        if self.parser is None:
            return super()._chunks(index, output)
        text, logprobs = self.held.pop(index, ("", []))
        text, logprobs = text + output.text, logprobs + (output.logprobs or [])
        if output.finish is None:
            start = self.parser.call_start(text)
            if start >= 0:
                self.held[index] = (text[start:], logprobs)
                text, logprobs = text[:start], []
            return [self._chunk(self.chunk_choice(index, text, logprobs, None))] if text else []
        content, calls = self.parser.parse(text)
        chunks = []
        if calls:
            if content:
                chunks.append(self._chunk(self.chunk_choice(index, content, None, None)))
            chunks.append(self._chunk({"index": index, "delta": {"tool_calls": _tool_calls(calls, indexed=True)},
                                       "logprobs": self._logprobs(logprobs), "finish_reason": None}))
        elif text or logprobs:
            chunks.append(self._chunk(self.chunk_choice(index, text, logprobs, None)))
        return chunks + [self._chunk(self.chunk_choice(index, None, None, _finish_reason(output.finish, calls)))]

    def chunk_choice(self, index, text, logprobs, finish_reason) -> dict:
        delta = {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}

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

    def choice(self, index, text, logprobs, finish_reason) -> dict:
        return {"index": index, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}

    def chunk_choice(self, index, text, logprobs, finish_reason) -> dict:
        return self.choice(index, text or "", logprobs, finish_reason)

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        """The legacy shape: parallel lists, top alternatives as {token: logprob}."""
        if self.request.logprobs is None or entries is None:
            return None
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{top.token: top.logprob for top in e.top} for e in entries],
                "text_offset": [e.offset for e in entries]}


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
