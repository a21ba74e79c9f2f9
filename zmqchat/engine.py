"""The engine: runs many sequences at once and turns their tokens into text, step by step.

The worker's engine thread feeds an Engine with `add()` and `cancel()` and calls `step()`
in a loop. Each step advances every running sequence by one token and returns the whole
step's output at once: CHUNK entries [id, text] for sequences still running and DONE
entries [id, text, finish_reason, prompt_tokens, completion_tokens] for those that ended;
a sequence that asked for logprobs gets them as one more element of each entry (see
`Sequence.take_logprobs`).

A job's prompt is a conversation ("messages", through the model's chat template) or raw
text or token ids ("prompt", for /v1/completions). `Engine` owns what every model shares:
sampling parameters, incremental detokenisation that stays correct across multi-byte
characters, stop strings (never sent, even split across tokens), end-of-sequence tokens,
max_tokens and the context window, echo, and handing out each token's logprobs with the text
it made. A subclass supplies the model: `encode_chat()`, `encode_text()`, `decode()`,
`token_bytes()` and `next_tokens()`. `HFEngine` runs a transformers causal LM;
`FakeEngine` echoes the user's words with a fixed delay per step, for fast tests and for
benchmarks of the plumbing.
"""

from __future__ import annotations

import inspect
import os
import re
import time
from dataclasses import dataclass, field
from functools import cached_property

from zmqchat.models import cache_argument
from zmqchat.scheduler import Scheduler

DEFAULT_SLOTS = 16
DEFAULT_MAX_TOKENS = 1024  # for a request that sets no max_tokens: a bound, not a whole context window
# Prompt tokens the detokeniser starts from, as vLLM does: some tokenizers (SentencePiece's)
# drop the leading space of the first token decoded, which a completion's first word needs.
DETOKENIZER_CONTEXT = 5
MAX_STOP_STRINGS = 16  # each is checked at every token; OpenAI allows 4
MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI allows
CONTEXT = "context_length_exceeded"  # OpenAI's error code for a prompt and max_tokens the model cannot hold
LOGPROB_FLOOR = -9999.0  # stands for log(0), which JSON cannot carry; OpenAI sends the same

# End-of-turn markers of common chat templates; any that is a single token ends a sequence.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class RequestError(ValueError):
    """A job the engine refuses; `status` is the HTTP status the client gets."""

    def __init__(self, message: str, status: int = 400, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status = status
        self.type = type_


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # run to max_tokens (vLLM's extension, for benchmarks)
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and its top k alternatives
    echo: bool = False  # the output starts with the prompt (/v1/completions)

    @classmethod
    def from_wire(cls, params: dict, defaults: dict | None = None) -> "SamplingParams":
        """Checked again here: the worker trusts no peer to have validated the job. What the
        request leaves out (None) comes from `defaults`, the model's own, then 1.0."""
        given = {k: v for k, v in params.items() if v is not None}
        settings = {**(defaults or {}), **given}
        try:
            sp = cls(
                max_tokens=None if settings.get("max_tokens") is None else int(settings["max_tokens"]),
                temperature=float(settings.get("temperature", 1.0)),
                top_p=float(settings.get("top_p", 1.0)),
                top_k=max(0, int(settings.get("top_k", 0))),
                presence_penalty=float(settings.get("presence_penalty", 0.0)),
                frequency_penalty=float(settings.get("frequency_penalty", 0.0)),
                seed=None if settings.get("seed") is None else int(settings["seed"]),
                stop=tuple(str(s) for s in settings.get("stop") or () if s),
                ignore_eos=bool(settings.get("ignore_eos", False)),
                logprobs=None if settings.get("logprobs") is None else int(settings["logprobs"]),
                echo=bool(settings.get("echo", False)),
            )
        except (TypeError, ValueError) as exc:
            raise RequestError(f"invalid sampling parameters: {exc}") from None
        if sp.max_tokens is not None and sp.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1")
        if not (0.0 <= sp.temperature <= 2.0) or not (0.0 < sp.top_p <= 1.0):
            raise RequestError("temperature must be in [0, 2] and top_p in (0, 1]")
        if not (-2.0 <= sp.presence_penalty <= 2.0) or not (-2.0 <= sp.frequency_penalty <= 2.0):
            raise RequestError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if len(sp.stop) > MAX_STOP_STRINGS:
            raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(sp.stop)}")
        if sp.logprobs is not None and not 0 <= sp.logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        return sp


@dataclass(eq=False)
class Sequence:
    """One request's tokens and text. `state` belongs to the engine (a KV cache, say)."""

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # output decoded so far
    sent: int = 0  # characters of `text` already handed out
    # The detokeniser's window over output_ids, as vLLM and TGI keep it; negative offsets
    # reach back into the prompt's last tokens.
    prefix_offset: int = 0
    read_offset: int = 0
    finish_reason: str | None = None
    state: object = None
    pending_echo: str = ""  # the prompt's text, to send before the first output (the job asked for echo)
    echo_length: int = 0
    # Logprobs not yet handed out: (start, end) of the token's text in `text`, then its wire
    # entry [token, bytes, logprob, [[token, bytes, logprob], ...top alternatives], offset in the output].
    logprobs: list[tuple[int, int, list]] = field(default_factory=list)

    def __post_init__(self):
        self.prefix_offset = -min(DETOKENIZER_CONTEXT, len(self.prompt_ids))

    def token_window(self, start: int, end: int | None = None) -> list[int]:
        """Tokens start to end of the output, where negative positions are the prompt's last
        tokens (-1 its last) rather than Python's count from the end."""
        end = len(self.output_ids) if end is None else end
        prompt_end = len(self.prompt_ids) + min(end, 0)
        from_prompt = self.prompt_ids[len(self.prompt_ids) + start:prompt_end] if start < 0 else []
        return from_prompt + self.output_ids[max(start, 0):max(end, 0)]

    @property
    def reserved_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens

    def take_chunk_entry(self, delta: str) -> list:
        """The CHUNK entry for `delta`, with (and handing out) the logprobs that go with it."""
        return self._with_logprobs([self.id, delta])

    def take_done_entry(self, delta: str) -> list:
        return self._with_logprobs([self.id, delta, self.finish_reason, len(self.prompt_ids), len(self.output_ids)])

    def _with_logprobs(self, entry: list) -> list:
        return entry if self.params.logprobs is None else entry + [self.take_logprobs()]

    def take_logprobs(self) -> list:
        """The logprobs of the tokens whose text has been sent: a token's entry leaves with
        the text it made, so that the two stay in step. Once the sequence has ended, that is
        every token with text in the output: none of a stop string, none of end-of-sequence."""
        if self.finish_reason:
            taken = [entry for start, _, entry in self.logprobs if start < len(self.text)]
            self.logprobs = []
            return taken
        sent = next((i for i, (_, end, _) in enumerate(self.logprobs) if end > self.sent), len(self.logprobs))
        taken, self.logprobs = [entry for *_, entry in self.logprobs[:sent]], self.logprobs[sent:]
        return taken


class Engine:
    """Sequence bookkeeping shared by every engine; see the module docstring."""

    def __init__(self, model_name: str, slots: int, context_window: int, stop_token_ids: set[int],
                 max_tokens_in_flight: int):
        self.model_name = model_name
        self.slots = slots
        self.context_window = context_window
        self.stop_token_ids = stop_token_ids
        self.sequences: dict[str, Sequence] = {}  # every sequence the engine holds, by id
        self.scheduler = Scheduler(slots, max_tokens_in_flight)
        self.sampling_defaults: dict = {}  # the model's own temperature and top_p, if it has them

    # -- supplied by the model --------------------------------------------------------------

    vocab_size: int  # token ids in a prompt must be below this

    def encode_chat(self, messages: list[dict]) -> list[int]:
        raise NotImplementedError

    def encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, token_ids: list[int]) -> str:
        """Output text, without special tokens."""
        raise NotImplementedError

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes, special tokens included: part of a character, maybe."""
        raise NotImplementedError

    def next_tokens(self, seqs: list[Sequence]) -> tuple[list[int], list]:
        """One forward step over the running batch: the next token of each sequence, in
        order, sampled with its own parameters. Sequences whose `state` is None are new.
        With the tokens, for each sequence None or, where it asked for logprobs,
        (logprob of its token, [(token id, logprob) of its top `params.logprobs` tokens])."""
        raise NotImplementedError

    def free(self, seq: Sequence) -> None:
        """`seq` has left the batch: release what the model held for it."""
        seq.state = None

    # -- driven by the worker ---------------------------------------------------------------

    def add(self, job: dict) -> None:
        if len(self.sequences) >= self.slots:
            raise RequestError("the worker has no free slot", 503, "overloaded")
        if job["id"] in self.sequences:
            raise RequestError(f"request id {job['id']} is already running")
        params = SamplingParams.from_wire(job.get("params") or {}, self.sampling_defaults)
        prompt_ids, prompt_text = self._encode(job)
        seq = Sequence(job["id"], prompt_ids, params, self._max_tokens(len(prompt_ids), params.max_tokens))
        if params.echo:
            seq.pending_echo = prompt_text if prompt_text is not None else self.decode(prompt_ids)
            seq.echo_length = len(seq.pending_echo)
        if not self.scheduler.fits_alone(seq):
            raise RequestError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({seq.max_tokens}) is more than "
                f"this worker's {self.scheduler.max_tokens} tokens in flight; ask for fewer max_tokens")
        self.sequences[seq.id] = seq
        self.scheduler.add(seq)

    def _encode(self, job: dict) -> tuple[list[int], str | None]:
        """The job's prompt tokens, and its text where the client gave text."""
        if "messages" in job:
            return self.encode_chat(job["messages"]), None
        prompt = job["prompt"]
        if isinstance(prompt, str):
            return self.encode_text(prompt), prompt
        if not prompt or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise RequestError(f"a prompt of token ids must be a non-empty list of ids in [0, {self.vocab_size})")
        return list(prompt), None

    def _max_tokens(self, prompt_tokens: int, asked: int | None) -> int:
        window = self.context_window
        if asked is None:
            if prompt_tokens >= window:
                raise RequestError(f"This model's maximum context length is {window} tokens. However, the "
                                   f"prompt has {prompt_tokens} tokens. Please shorten the prompt.", type_=CONTEXT)
            return min(DEFAULT_MAX_TOKENS, window - prompt_tokens)
        if prompt_tokens + asked > window:
            raise RequestError(f"This model's maximum context length is {window} tokens. However, you requested "
                               f"{prompt_tokens + asked} tokens ({prompt_tokens} in the prompt, {asked} for the "
                               f"completion). Please reduce the prompt or max_tokens.", type_=CONTEXT)
        return asked

    def cancel(self, job_id: str) -> list | None:
        """The DONE entry confirming the cancel (so the broker frees the slot), if it ran."""
        seq = self.sequences.get(job_id)
        if seq is None:
            return None
        seq.finish_reason = "cancelled"
        self._retire(seq)
        return seq.take_done_entry("")

    def step(self) -> tuple[list, list]:
        self.scheduler.schedule()
        seqs = list(self.scheduler.running)
        chunks, dones = [], []
        if not seqs:
            return chunks, dones
        tokens, logprobs = self.next_tokens(seqs)
        for seq, token, token_logprobs in zip(seqs, tokens, logprobs):
            delta = self._append(seq, token, token_logprobs)
            if seq.pending_echo:
                delta, seq.pending_echo = seq.pending_echo + delta, ""
            if seq.finish_reason:
                self._retire(seq)
                dones.append(seq.take_done_entry(delta))
            elif delta:
                chunks.append(seq.take_chunk_entry(delta))
        return chunks, dones

    def _retire(self, seq: Sequence) -> None:
        del self.sequences[seq.id]
        self.scheduler.remove(seq)
        self.free(seq)

    # -- text ---------------------------------------------------------------------------------

    def _append(self, seq: Sequence, token: int, token_logprobs) -> str:
        """Add one sampled token; the text that may be sent now."""
        seq.output_ids.append(token)  # counted in usage even when it ends the sequence, as vLLM does
        if token in self.stop_token_ids and not seq.params.ignore_eos:
            seq.finish_reason = "stop"
            return self._flush(seq)
        start = len(seq.text)
        seq.text += self._detokenize(seq)
        if token_logprobs is not None:
            entry = self._logprob_entry(token, *token_logprobs, seq.echo_length + start)
            seq.logprobs.append((start, len(seq.text), entry))
        stop_at = self._find_stop(seq)
        if stop_at >= 0:
            seq.text = seq.text[:stop_at]
            seq.finish_reason = "stop"
            return self._flush(seq)
        if len(seq.output_ids) >= seq.max_tokens:
            seq.finish_reason = "length"
            return self._flush(seq)
        # Hold back a tail that may be the start of a stop string.
        end = len(seq.text) - self._stop_prefix_len(seq)
        delta = seq.text[seq.sent:end]
        seq.sent = max(seq.sent, end)
        return delta

    def _detokenize(self, seq: Sequence) -> str:
        """New text of the last token. Decoding a small window, not the whole output, keeps
        this O(1) per token; a window ending in U+FFFD is an incomplete UTF-8 character,
        so its text waits for the next token."""
        before = self.decode(seq.token_window(seq.prefix_offset, seq.read_offset))
        after = self.decode(seq.token_window(seq.prefix_offset))
        if len(after) > len(before) and not after.endswith("\ufffd"):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.output_ids)
            return after[len(before):]
        return ""

    def _logprob_entry(self, token: int, logprob: float, top: list, offset: int) -> list:
        return [*self._token(token), _floored(logprob), [[*self._token(t), _floored(lp)] for t, lp in top], offset]

    def _token(self, token_id: int) -> tuple[str, bytes]:
        """A token's name and bytes. A token holding part of a character is named by its
        bytes, as OpenAI names it ("bytes:\\xf0\\x9f"); clients rebuild the character from them."""
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), raw

    @staticmethod
    def _find_stop(seq: Sequence) -> int:
        # Text before `sent` was checked already and holds no stop string start.
        hits = [i for i in (seq.text.find(s, seq.sent) for s in seq.params.stop) if i >= 0]
        return min(hits, default=-1)

    @staticmethod
    def _stop_prefix_len(seq: Sequence) -> int:
        text, longest = seq.text, 0
        for stop in seq.params.stop:
            for k in range(min(len(stop) - 1, len(text) - seq.sent), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    @staticmethod
    def _flush(seq: Sequence) -> str:
        delta = seq.text[seq.sent:]
        seq.sent = len(seq.text)
        return delta


@dataclass
class Row:
    """A sequence's place in the batch: it is in the KV cache; its own sampler, if seeded."""

    generator: object = None


class HFEngine(Engine):
    """A transformers causal LM with continuous batching.

    Every running sequence is a row of one left-padded KV cache. A step decodes all rows in
    one forward pass; sequences admitted this step are prefilled together in a second pass
    and their cache rows are appended to the batch (both sides padded on the left to the
    same length). Rows that left are dropped at the start of the next step, and padding
    columns that no row needs any more are trimmed. Explicit position ids keep every row's
    positions its own, so a row computes what it would compute alone.
    """

    def __init__(self, loaded, slots: int = DEFAULT_SLOTS, max_tokens_in_flight: int | None = None):
        import torch

        self.torch = torch
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        config = self.model.config
        context = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        budget = max_tokens_in_flight or default_token_budget(self.model, self.device)
        super().__init__(loaded.name, slots, int(context), self._stop_token_ids(), budget)
        self.vocab_size = min(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)
        generation = self.model.generation_config
        if generation.do_sample:  # the model's authors chose how it should sample
            self.sampling_defaults = {"temperature": generation.temperature, "top_p": generation.top_p}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.cache_arg = cache_argument(self.model)
        forward_args = inspect.signature(self.model.forward).parameters
        self.last_logit_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_args else {}
        self.preamble = self._shared_preamble()
        self.preamble_kv = None  # per layer (keys, values) of the preamble, computed on first use
        self.rows: list[Sequence] = []  # the batch, in cache row order
        self.leaving: list[Sequence] = []  # rows to drop before the next forward pass
        self.cache = None
        self.mask = None  # [rows, length]: 1 where a row has a real token, 0 for left padding

    def _stop_token_ids(self) -> set[int]:
        ids = set()
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises for conversations a template forbids
            raise RequestError(f"the model's chat template refused the messages: {exc}") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def encode_text(self, text: str) -> list[int]:
        ids = self.tokenizer(text).input_ids  # with the BOS token, where the model wants one
        if not ids:
            raise RequestError("the prompt is empty")
        return ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @cached_property
    def _byte_decoder(self) -> dict[str, int]:
        """Byte-level BPE (GPT-2's and most since) spells each byte as one character."""
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
        return {char: byte for byte, char in bytes_to_unicode().items()} if byte_level else {}

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self._byte_decoder and all(char in self._byte_decoder for char in piece):
            return bytes(self._byte_decoder[char] for char in piece)
        if fallback := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece):  # SentencePiece's byte fallback
            return bytes([int(fallback.group(1), 16)])
        return self.tokenizer.decode([token_id]).encode()

    def _shared_preamble(self) -> list[int]:
        """The tokens every conversation opening with a user message starts with (a chat
        template's default system prompt, say). Their KV is computed once and reused by every
        prompt that starts with exactly these tokens, which is most of a short prompt's prefill."""
        try:
            a, b = (self.encode_chat([{"role": "user", "content": c}]) for c in ("a", "b"))
        except RequestError:
            return []
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return a[:common]

    def free(self, seq: Sequence) -> None:
        if seq.state is not None:
            self.leaving.append(seq)
            if len(self.leaving) == len(self.rows):  # the batch is empty: release its memory now
                self._drop_leaving_rows()
        seq.state = None

    def next_tokens(self, seqs: list[Sequence]) -> tuple[list[int], list]:
        with self.torch.inference_mode():
            self._drop_leaving_rows()
            fresh = [s for s in seqs if s.state is None]
            logits = [self._decode()] if self.rows else []
            if fresh:
                logits.append(self._prefill(fresh))
            batch = self.rows  # old rows first, then the fresh ones _prefill appended
            logits = apply_penalties(self.torch.cat(logits), batch)
            tokens = sample_batch(logits, [s.params for s in batch], [s.state.generator for s in batch])
            logprobs = token_logprobs(logits, tokens, [s.params.logprobs for s in batch])
        by_seq = {id(s): (t, lp) for s, t, lp in zip(batch, tokens, logprobs)}
        ordered = [by_seq[id(s)] for s in seqs]
        return [t for t, _ in ordered], [lp for _, lp in ordered]

    def _forward(self, input_ids, mask, positions, cache):
        """Logits of each row's last position."""
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_arg: cache}, **self.last_logit_only)
        return out.logits[:, -1]

    def _decode(self):
        torch = self.torch
        last = torch.tensor([[s.output_ids[-1]] for s in self.rows], device=self.device)
        self.mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        return self._forward(last, self.mask, positions, self.cache)

    def _prefill(self, fresh: list[Sequence]):
        """Prefill the new sequences together. Each row of their cache is [preamble][padding]
        [rest of the prompt]; rows whose prompt does not start with the preamble mask it out."""
        from transformers import DynamicCache

        torch = self.torch
        n = len(self.preamble)
        reused = [n > 0 and len(s.prompt_ids) > n and s.prompt_ids[:n] == self.preamble for s in fresh]
        if not any(reused):
            n = 0
        tails = [s.prompt_ids[n:] if r else s.prompt_ids for s, r in zip(fresh, reused)]
        width = max(map(len, tails))
        ids = torch.tensor([[self.pad_id] * (width - len(t)) + t for t in tails], device=self.device)
        mask = torch.tensor([[int(r)] * n + [0] * (width - len(t)) + [1] * len(t) for t, r in zip(tails, reused)],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, n:]
        cache = DynamicCache()
        if n:
            for layer, (keys, values) in enumerate(self._preamble_kv()):
                cache.update(keys.expand(len(fresh), -1, -1, -1), values.expand(len(fresh), -1, -1, -1), layer)
        logits = self._forward(ids, mask, positions, cache)
        for seq in fresh:
            seq.state = Row(self._generator(seq.params.seed))
        self._append_rows(cache, mask, fresh)
        return logits

    def _preamble_kv(self) -> list:
        if self.preamble_kv is None:
            from transformers import DynamicCache

            cache = DynamicCache()
            ids = self.torch.tensor([self.preamble], device=self.device)
            self._forward(ids, self.torch.ones_like(ids), None, cache)
            self.preamble_kv = [(layer.keys, layer.values) for layer in cache.layers]
        return self.preamble_kv

    def _append_rows(self, cache, mask, fresh: list[Sequence]) -> None:
        if self.cache is None:
            self.cache, self.mask, self.rows = cache, mask, list(fresh)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = self.torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = self.torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = self.torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.rows += fresh

    def _drop_leaving_rows(self) -> None:
        if not self.leaving:
            return
        gone = {id(s) for s in self.leaving}
        self.leaving = []
        keep = [i for i, s in enumerate(self.rows) if id(s) not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = None
            return
        index = self.torch.tensor(keep, device=self.device)
        # Columns of padding on every remaining row are dead weight in each attention.
        trim = int((self.mask[index] == 0).all(0).long().cumprod(0).sum())
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, trim:]
            layer.values = layer.values[index, :, trim:]
        self.mask = self.mask[index, trim:]

    def _generator(self, seed: int | None):
        if seed is None:
            return None
        return self.torch.Generator(device=self.device).manual_seed(seed)


def _pad_left(tensor, width: int):
    """Left-pad the sequence axis (dim -2 of a KV tensor, dim -1 of a mask) to `width`."""
    import torch.nn.functional as F

    if tensor.dim() == 2:
        return F.pad(tensor, (width - tensor.shape[-1], 0))
    return F.pad(tensor, (0, 0, width - tensor.shape[-2], 0))


def default_token_budget(model, device: str) -> int:
    """Tokens of KV cache that fit in half the memory free on `device` after loading."""
    import torch

    config = model.config
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    bytes_per_token = 2 * layers * kv_heads * head_dim * model.dtype.itemsize
    if device.startswith("cuda"):
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return max(1024, int(free * 0.5 / bytes_per_token))


GREEDY_BELOW = 1e-5  # temperatures under this mean greedy decoding
NUCLEUS_CANDIDATES = (64, 1024)  # likeliest tokens looked at for top_p, before sorting a whole vocabulary


def sample_batch(logits, params: list[SamplingParams], generators: list) -> list[int]:
    """The next token of each row: greedy at temperature 0, otherwise nucleus sampling from
    the tempered distribution, with the row's own generator where it asked for a seed."""
    import torch

    greedy = logits.argmax(-1)
    temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
    sampling = temperatures >= GREEDY_BELOW
    if not bool(sampling.any()):
        return greedy.tolist()
    logits = top_k_only(logits.float(), [p.top_k for p in params])
    probs = torch.softmax(logits / temperatures.clamp(min=GREEDY_BELOW)[:, None], dim=-1)
    weights, tokens = nucleus(probs, torch.tensor([p.top_p for p in params], device=logits.device))
    choice = greedy.clone()
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        choice[shared] = torch.multinomial(weights[shared], 1).squeeze(-1)
    for i, generator in enumerate(generators):
        if generator is not None:
            choice[i] = torch.multinomial(weights[i], 1, generator=generator)[0]
    sampled = choice if tokens is None else tokens.gather(-1, choice[:, None]).squeeze(-1)
    return torch.where(sampling, sampled, greedy).tolist()


def token_logprobs(logits, tokens: list[int], wanted: list[int | None]) -> list:
    """Per row, None where `wanted` is None, else the logprob of the row's sampled token and
    its `wanted` likeliest tokens with theirs: the model's own distribution (after the
    penalties, before temperature and top_p/top_k), as vLLM reports it."""
    import torch

    rows = [i for i, k in enumerate(wanted) if k is not None]
    result: list = [None] * len(wanted)
    if not rows:
        return result
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = logprobs.gather(-1, torch.tensor([[tokens[i]] for i in rows], device=logits.device))[:, 0].tolist()
    top_values, top_ids = logprobs.topk(max(wanted[i] for i in rows), dim=-1)
    for j, i in enumerate(rows):
        k = wanted[i]
        result[i] = (chosen[j], list(zip(top_ids[j, :k].tolist(), top_values[j, :k].tolist())))
    return result


def _floored(logprob: float) -> float:
    """The logprob, or the floor for -inf and NaN (a NaN is not >= anything)."""
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


def apply_penalties(logits, seqs: list[Sequence]):
    """OpenAI's penalties: a token already generated loses presence_penalty once and
    frequency_penalty for each time it was generated."""
    import torch

    rows = [i for i, s in enumerate(seqs) if s.output_ids and (s.params.presence_penalty or s.params.frequency_penalty)]
    if not rows:
        return logits
    logits = logits.float().clone()
    for i in rows:
        params = seqs[i].params
        counts = torch.bincount(torch.tensor(seqs[i].output_ids, device=logits.device),
                                minlength=logits.shape[-1])[:logits.shape[-1]].float()
        logits[i] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    return logits


def top_k_only(logits, top_k: list[int]):
    """Each row's logits outside its top_k likeliest tokens set to -inf (0: no limit)."""
    import torch

    if not any(top_k):
        return logits
    widest = min(max(top_k), logits.shape[-1])
    kth = logits.topk(widest, dim=-1).values  # [rows, widest], descending
    index = torch.tensor([min(k, widest) - 1 if k else widest - 1 for k in top_k], device=logits.device)
    threshold = kth.gather(-1, index[:, None])
    unlimited = torch.tensor([k == 0 for k in top_k], device=logits.device)[:, None]
    return torch.where(unlimited | (logits >= threshold), logits, torch.full_like(logits, float("-inf")))


def nucleus(probs, top_p):
    """Each row's candidate weights and, where they are not the whole vocabulary in order,
    their token ids: the smallest set of likeliest tokens whose mass reaches the row's top_p.
    The top 64, or else the top 1024, tokens nearly always hold that mass (at temperature 1
    and top_p 0.9 the default model needs a few hundred), and finding them costs far less
    than sorting the vocabulary every step; only when they do not is it sorted."""
    if bool((top_p >= 1.0).all()):
        return probs, None
    for k in NUCLEUS_CANDIDATES:
        if k < probs.shape[-1]:
            weights, tokens = probs.topk(k, dim=-1)
            if bool(((weights.sum(-1) >= top_p) & (top_p < 1.0)).all()):
                break
    else:
        weights, tokens = probs.sort(dim=-1, descending=True)
    weights[(weights.cumsum(-1) - weights) >= top_p[:, None]] = 0.0
    return weights, tokens


class FakeEngine(Engine):
    """Answers with the words of the last user message (of the prompt, for a completion),
    one word per step, `delay` seconds a step whatever the batch size (like a batched forward
    pass). Its logprobs are certain: 0 for the word it says, the floor for the alternatives
    it lists after it. For tests and benchmarks."""

    EOS = 0

    def __init__(self, model_name: str = "fake", slots: int = DEFAULT_SLOTS, delay: float = 0.0,
                 context_window: int = 4096):
        super().__init__(model_name, slots, context_window, {self.EOS}, slots * context_window)
        self.delay = delay
        self.words = ["</s>"]  # token id -> word
        self.ids: dict[str, int] = {}

    def _tokenize(self, text: str) -> list[int]:
        ids = []
        for word in re.findall(r"\S+\s*", text):
            if word not in self.ids:
                self.ids[word] = len(self.words)
                self.words.append(word)
            ids.append(self.ids[word])
        return ids

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        prompt = [self._tokenize(str(m.get("content", ""))) for m in messages]
        if not any(prompt):
            raise RequestError("the conversation has no text")
        return [t for ids in prompt for t in ids]

    def encode_text(self, text: str) -> list[int]:
        return self.encode_chat([{"content": text}])

    def add(self, job: dict) -> None:
        super().add(job)
        seq = self.sequences[job["id"]]
        if "messages" in job:
            user = [m for m in job["messages"] if m.get("role") == "user"] or job["messages"]
            seq.state = self._tokenize(str(user[-1].get("content", ""))) or [self.EOS]
        else:
            seq.state = seq.prompt_ids

    def decode(self, token_ids: list[int]) -> str:
        return "".join(self.words[t] for t in token_ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self.words[token_id].encode()

    def next_tokens(self, seqs: list[Sequence]) -> tuple[list[int], list]:
        if self.delay:
            time.sleep(self.delay)
        tokens = [s.state[len(s.output_ids)] if len(s.output_ids) < len(s.state) else self.EOS for s in seqs]
        return tokens, [self._logprobs(t, s.params.logprobs) for s, t in zip(seqs, tokens)]

    def _logprobs(self, token: int, wanted: int | None):
        if wanted is None:
            return None
        others = [t for t in range(min(wanted, len(self.words))) if t != token][:max(wanted - 1, 0)]
        return 0.0, ([(token, 0.0)] + [(t, LOGPROB_FLOOR) for t in others])[:wanted]

