"""The engine: runs many sequences at once and turns their tokens into text, step by step.

The worker's engine thread feeds an Engine with `add()` and `cancel()` and calls `step()`
in a loop. Each step advances every running sequence by one token and returns the whole
step's output at once: CHUNK entries [id, text] for sequences still running and DONE
entries [id, text, finish_reason, prompt_tokens, completion_tokens] for those that ended.

`Engine` owns what every model shares: sampling parameters, incremental detokenisation that
stays correct across multi-byte characters, stop strings (never sent, even split across
tokens), end-of-sequence tokens, max_tokens and the context window. A subclass supplies the
model: `encode_prompt()` and `next_tokens()`. `HFEngine` runs a transformers causal LM;
`FakeEngine` echoes the user's words with a fixed delay per step, for fast tests and for
benchmarks of the plumbing.
"""

from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass, field

DEFAULT_SLOTS = 16

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
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def from_wire(cls, params: dict) -> "SamplingParams":
        """Checked again here: the worker trusts no peer to have validated the job."""
        try:
            sp = cls(
                max_tokens=None if params.get("max_tokens") is None else int(params["max_tokens"]),
                temperature=float(params.get("temperature", 1.0)),
                top_p=float(params.get("top_p", 1.0)),
                seed=None if params.get("seed") is None else int(params["seed"]),
                stop=tuple(str(s) for s in params.get("stop") or () if s),
            )
        except (TypeError, ValueError) as exc:
            raise RequestError(f"invalid sampling parameters: {exc}") from None
        if sp.max_tokens is not None and sp.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1")
        if not (0.0 <= sp.temperature <= 2.0) or not (0.0 < sp.top_p <= 1.0):
            raise RequestError("temperature must be in [0, 2] and top_p in (0, 1]")
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
    prefix_offset: int = 0  # detokeniser window over output_ids, as vLLM and TGI keep it
    read_offset: int = 0
    finish_reason: str | None = None
    state: object = None

    def done_entry(self, delta: str) -> list:
        return [self.id, delta, self.finish_reason, len(self.prompt_ids), len(self.output_ids)]


class Engine:
    """Sequence bookkeeping shared by every engine; see the module docstring."""

    def __init__(self, model_name: str, slots: int, context_window: int, stop_token_ids: set[int]):
        self.model_name = model_name
        self.slots = slots
        self.context_window = context_window
        self.stop_token_ids = stop_token_ids
        self.running: dict[str, Sequence] = {}

    # -- supplied by the model --------------------------------------------------------------

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        raise NotImplementedError

    def decode(self, token_ids: list[int]) -> str:
        raise NotImplementedError

    def next_tokens(self, seqs: list[Sequence]) -> list[int]:
        """One forward step: the next token of each sequence, sampled with its parameters."""
        raise NotImplementedError

    def free(self, seq: Sequence) -> None:
        seq.state = None

    # -- driven by the worker ---------------------------------------------------------------

    def add(self, job: dict) -> None:
        if len(self.running) >= self.slots:
            raise RequestError("the worker has no free slot", 503, "overloaded")
        if job["id"] in self.running:
            raise RequestError(f"request id {job['id']} is already running")
        params = SamplingParams.from_wire(job.get("params") or {})
        prompt_ids = self.encode_prompt(job["messages"])
        room = self.context_window - len(prompt_ids)
        if room < 1:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context window is "
                f"{self.context_window} tokens")
        max_tokens = min(params.max_tokens or room, room)
        self.running[job["id"]] = Sequence(job["id"], prompt_ids, params, max_tokens)

    def cancel(self, job_id: str) -> list | None:
        """The DONE entry confirming the cancel (so the broker frees the slot), if it ran."""
        seq = self.running.pop(job_id, None)
        if seq is None:
            return None
        self.free(seq)
        seq.finish_reason = "cancelled"
        return seq.done_entry("")

    def step(self) -> tuple[list, list]:
        seqs = list(self.running.values())
        chunks, dones = [], []
        if not seqs:
            return chunks, dones
        for seq, token in zip(seqs, self.next_tokens(seqs)):
            delta = self._append(seq, token)
            if seq.finish_reason:
                del self.running[seq.id]
                self.free(seq)
                dones.append(seq.done_entry(delta))
            elif delta:
                chunks.append([seq.id, delta])
        return chunks, dones

    # -- text ---------------------------------------------------------------------------------

    def _append(self, seq: Sequence, token: int) -> str:
        """Add one sampled token; the text that may be sent now."""
        seq.output_ids.append(token)  # counted in usage even when it ends the sequence, as vLLM does
        if token in self.stop_token_ids:
            seq.finish_reason = "stop"
            return self._flush(seq)
        seq.text += self._detokenize(seq)
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
        ids = seq.output_ids
        before = self.decode(ids[seq.prefix_offset:seq.read_offset])
        after = self.decode(ids[seq.prefix_offset:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
            return after[len(before):]
        return ""

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


class HFEngine(Engine):
    """A transformers causal LM. Each running sequence keeps its own KV cache; a step runs
    one forward pass per sequence (the continuous-batching engine replaces `next_tokens`)."""

    def __init__(self, loaded, slots: int = DEFAULT_SLOTS):
        import torch

        self.torch = torch
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        config = self.model.config
        context = getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        super().__init__(loaded.name, slots, int(context), self._stop_token_ids())
        # transformers renamed `past_key_values` to `cache` in 5.x; accept either.
        forward_args = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward_args else "past_key_values"

    def _stop_token_ids(self) -> set[int]:
        ids = set()
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return ids

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # jinja raises for conversations a template forbids
            raise RequestError(f"the model's chat template refused the messages: {exc}") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def next_tokens(self, seqs: list[Sequence]) -> list[int]:
        torch = self.torch
        tokens = []
        with torch.inference_mode():
            for seq in seqs:
                if seq.state is None:  # prefill
                    from transformers import DynamicCache

                    seq.state = (DynamicCache(), self._generator(seq.params.seed))
                    ids = seq.prompt_ids
                else:
                    ids = seq.output_ids[-1:]
                cache, generator = seq.state
                out = self.model(input_ids=torch.tensor([ids], device=self.device),
                                 use_cache=True, **{self.cache_arg: cache})
                tokens.append(sample(out.logits[0, -1], seq.params, generator))
        return tokens

    def _generator(self, seed: int | None):
        if seed is None:
            return None
        return self.torch.Generator(device=self.device).manual_seed(seed)


def sample(logits, params: SamplingParams, generator=None) -> int:
    """Greedy at temperature 0, otherwise nucleus sampling from the tempered distribution."""
    import torch

    if params.temperature < 1e-5:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        sorted_probs[(sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p] = 0.0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class FakeEngine(Engine):
    """Answers with the words of the last user message, one word per step, `delay` seconds a
    step whatever the batch size (like a batched forward pass). For tests and benchmarks."""

    EOS = 0

    def __init__(self, model_name: str = "fake", slots: int = DEFAULT_SLOTS, delay: float = 0.0,
                 context_window: int = 4096):
        super().__init__(model_name, slots, context_window, {self.EOS})
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

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        prompt = [self._tokenize(str(m.get("content", ""))) for m in messages]
        if not any(prompt):
            raise RequestError("the conversation has no text")
        return [t for ids in prompt for t in ids]

    def add(self, job: dict) -> None:
        super().add(job)
        user = [m for m in job["messages"] if m.get("role") == "user"] or job["messages"]
        self.running[job["id"]].state = self._tokenize(str(user[-1].get("content", ""))) or [self.EOS]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(self.words[t] for t in token_ids)

    def next_tokens(self, seqs: list[Sequence]) -> list[int]:
        if self.delay:
            time.sleep(self.delay)
        return [s.state[len(s.output_ids)] if len(s.output_ids) < len(s.state) else self.EOS
                for s in seqs]

