"""A transformers causal LM, run one batch at a time: HFRunner.

The engine asks it for what the model's tokenizer knows (chat template, encoding, decoding,
token bytes, stop tokens, vocabulary size, context window, the model's own sampling defaults)
and hands `run()` each step's Batch from the scheduler; `run()` returns one token per
sequence, and its logprobs where asked, in the batch's order.

Every running sequence is a row of one left-padded KV cache, in the batch's order. A step
first drops the rows the batch did not keep, trimming padding columns that no row needs any
more; it decodes the kept rows in one forward pass, prefills the new sequences together in
a second one, and appends their rows (both sides padded on the left to the same length).
Explicit position ids keep every row's positions its own, so a row computes what it would
compute alone. The KV of the chat template's shared preamble is computed once and reused.

A sequence that asks for its prompt's logprobs needs the logits of every prompt position, the
preamble's included: it is prefilled apart from the others (which keep computing the logits of
their last position only), without the cached preamble, a chunk of positions at a time so that
a long prompt's logits are never all in memory at once.

`embed()` runs inputs through the model without generating (no KV cache is kept): an input's
embedding is its last hidden states (the base model's output, after its final norm: what the LM
head reads) averaged over its own tokens, scaled to unit length.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import json
import os
import re
from functools import cached_property

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.convert_slow_tokenizer import bytes_to_unicode

from zmqchat.config import MAX_SLOTS_FROM_MEMORY, SLOT_TOKENS
from zmqchat.engine.sampler import prompt_logprobs, sample, seeded_generator
from zmqchat.engine.scheduler import Batch
from zmqchat.engine.sequence import Sequence
from zmqchat.grammar import Grammars, Matcher
from zmqchat.models import LoadedModel, cache_argument
from zmqchat.protocol import ChatMessage, Constraint, ErrorCode, Function, JobError
from zmqchat.tools import fallback_conversation

# End-of-turn markers of common chat templates; any that is a single token ends a sequence.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")
# Rows of logits (positions x sequences) one forward pass of a prompt-scoring prefill computes at
# most: each is a vocabulary of floats (49,152 for the default model, 200 KB), so 1024 take 200 MB.
PROMPT_LOGIT_ROWS = 1024


class HFRunner:
    def __init__(self, loaded: LoadedModel, max_tokens_in_flight: int | None = None):
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        # Prompts are encoded on the worker's preparing thread while the engine thread decodes:
        # each gets its own tokenizer, since a fast tokenizer is not safe to share across threads.
        self.encoder = copy.deepcopy(self.tokenizer)
        self.max_token_chars = max(map(len, self.tokenizer.get_vocab()))
        self.model_name = loaded.name
        config = self.model.config
        self.context_window = int(getattr(config, "max_position_embeddings", None) or self.tokenizer.model_max_length)
        self.token_budget = max_tokens_in_flight or default_token_budget(self.model, self.device)
        self.vocab_size = min(len(self.tokenizer), self.model.get_input_embeddings().num_embeddings)
        self.embedding_size = config.hidden_size
        self.stop_token_ids = self._stop_token_ids()
        generation = self.model.generation_config
        # The model's own temperature and top_p, where its authors chose how it should sample.
        self.sampling_defaults = {"temperature": generation.temperature, "top_p": generation.top_p} \
            if generation.do_sample else {}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.cache_arg = cache_argument(self.model)
        forward_args = inspect.signature(self.model.forward).parameters
        self.last_logit_only = {"logits_to_keep": 1} if "logits_to_keep" in forward_args else {}
        self.preamble = self._shared_preamble()
        self.preamble_kv = None  # per layer (keys, values) of the preamble, computed on first use
        # Per row of the batch, in its order:
        self.cache = None  # the KV cache
        self.mask = None  # [rows, length]: 1 where a row has a real token, 0 for left padding
        self.generators: list = []  # each row's own random stream, or None

    # -- the tokenizer --------------------------------------------------------------------------

    def _stop_token_ids(self) -> set[int]:
        ids = set()
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return ids

    def encode_chat(self, messages: list[ChatMessage], functions: tuple[Function, ...] = ()) -> list[int]:
        conversation = [_template_message(m) for m in messages]
        tools = [{"type": "function", "function": _function_dict(f)} for f in functions]
        if not self.renders_tools:  # zmqchat/tools.py: the tools, calls and results in Hermes' words
            conversation, tools = fallback_conversation(conversation, [t["function"] for t in tools]), []
        try:
            text = self.encoder.apply_chat_template(conversation, tools=tools or None, add_generation_prompt=True,
                                                    tokenize=False)
        except Exception as exc:  # jinja raises for conversations a template forbids
            raise JobError(ErrorCode.INVALID_REQUEST,
                           f"the model's chat template refused the messages: {exc}") from None
        return self.encoder(text, add_special_tokens=False).input_ids

    @cached_property
    def renders_tools(self) -> bool:
        """Whether the chat template renders tools itself (it reads `tools`)."""
        return "tools" in (self.tokenizer.chat_template or "")

    def encode_text(self, text: str) -> list[int]:
        return self.encoder(text).input_ids  # with the BOS token, where the model wants one

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @cached_property
    def _byte_decoder(self) -> dict[str, int]:
        """Byte-level BPE (GPT-2's and most since) spells each byte as one character."""
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

    @cached_property
    def grammars(self) -> Grammars:
        """Built on first use (about half a second), by the preparing thread: from its own tokenizer."""
        return Grammars(self.encoder, self.model.config.vocab_size, self.stop_token_ids)

    def constrain(self, constraint: Constraint) -> Matcher:
        return self.grammars.matcher(constraint)

    def _shared_preamble(self) -> list[int]:
        """The tokens every conversation opening with a user message starts with (a chat
        template's default system prompt, say). Their KV is computed once and reused by every
        prompt that starts with exactly these tokens, which is most of a short prompt's prefill."""
        try:
            a, b = (self.encode_chat([ChatMessage("user", c)]) for c in ("a", "b"))
        except JobError:
            return []
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return a[:common]

    # -- the model ------------------------------------------------------------------------------

    def run(self, batch: Batch[Sequence]) -> tuple[list[int], list]:
        """One step of `batch`: each sequence's next token, and its logprobs (see
        sampler.token_logprobs), in the batch's order."""
        with torch.inference_mode():
            self._keep_rows(batch.kept)
            logits = [self._decode(batch.decoding)] if batch.kept else []
            # Consecutive new sequences are prefilled together, those scoring their prompt apart:
            # their rows still follow the batch's order.
            for scoring, new in itertools.groupby(batch.new, key=lambda s: s.wants_prompt_logprobs):
                logits.append(self._prefill(list(new), scoring))
            if not logits:
                return [], []
            return sample(torch.cat(logits), batch.sequences, self.generators, self.stop_token_ids)

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Each input's mean-pooled, normalised last hidden state. Inputs are padded on the
        right, so that their own tokens keep their positions and attend only to each other."""
        width = max(map(len, inputs))
        ids = torch.tensor([tokens + [self.pad_id] * (width - len(tokens)) for tokens in inputs], device=self.device)
        mask = torch.tensor([[1] * len(tokens) + [0] * (width - len(tokens)) for tokens in inputs], device=self.device)
        with torch.inference_mode():
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            pooled = (hidden.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return F.normalize(pooled, dim=-1).tolist()

    def _forward(self, input_ids, mask, positions, cache, every_position: bool = False):
        """Logits of each row's last position; with `every_position`, of all its positions."""
        keep = {} if every_position else self.last_logit_only  # the model's default keeps every position
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self.cache_arg: cache}, **keep)
        return out.logits if every_position else out.logits[:, -1]

    def _decode(self, seqs: list[Sequence]):
        last = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.device)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        positions = self.mask.sum(-1, keepdim=True) - 1
        return self._forward(last, self.mask, positions, self.cache)

    def _prefill(self, new: list[Sequence], scoring: bool = False):
        """Prefill the new sequences together and append their rows. Each row of their cache
        is [preamble][padding][rest of the prompt]; rows whose prompt does not start with the
        preamble mask it out. `scoring` sequences reuse no preamble, and have their prompt
        logprobs noted."""
        n = 0 if scoring else len(self.preamble)
        reused = [n > 0 and len(s.prompt_ids) > n and s.prompt_ids[:n] == self.preamble for s in new]
        if not any(reused):
            n = 0
        tails = [s.prompt_ids[n:] if r else s.prompt_ids for s, r in zip(new, reused)]
        width = max(map(len, tails))
        ids = torch.tensor([[self.pad_id] * (width - len(t)) + t for t in tails], device=self.device)
        mask = torch.tensor([[int(r)] * n + [0] * (width - len(t)) + [1] * len(t) for t, r in zip(tails, reused)],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, n:]
        cache = DynamicCache()
        if n:
            for layer, (keys, values) in enumerate(self._preamble_kv()):
                cache.update(keys.expand(len(new), -1, -1, -1), values.expand(len(new), -1, -1, -1), layer)
        if scoring:
            logits = self._score(new, ids, mask, positions, cache)
        else:
            logits = self._forward(ids, mask, positions, cache)
        for seq, reused_preamble in zip(new, reused):
            seq.cached_tokens = n if reused_preamble else 0
        self._append_rows(cache, mask)
        self.generators += [seeded_generator(s.params.seed, self.device) for s in new]
        return logits

    def _score(self, seqs: list[Sequence], ids, mask, positions, cache):
        """Prefill `seqs` (rows of `ids`, left-padded) a chunk of positions at a time, noting
        on each sequence the logprob of each of its prompt tokens after the first under the
        logits of the position before it; the logits of each row's last position."""
        width = ids.shape[1]
        chunk = max(1, PROMPT_LOGIT_ROWS // len(seqs))
        top = max(s.params.prompt_logprobs for s in seqs)
        found: list[list] = [[] for _ in seqs]
        for start in range(0, width, chunk):
            end = min(start + chunk, width)
            logits = self._forward(ids[:, start:end], mask[:, :end], positions[:, start:end], cache, every_position=True)
            # Position i predicts token i + 1: the last position predicts no prompt token.
            scored = min(end, width - 1) - start
            if scored > 0:
                targets = ids[:, start + 1:start + 1 + scored]
                for row, chunk_row in zip(found, prompt_logprobs(logits[:, :scored], targets, top)):
                    row += chunk_row
        for seq, row in zip(seqs, found):  # a row's first width - prompt positions are padding
            seq.prompt_logprobs = [(logprob, rank, alternatives[:seq.params.prompt_logprobs])
                                   for logprob, rank, alternatives in row[width - len(seq.prompt_ids):]]
        return logits[:, -1]

    def _preamble_kv(self) -> list:
        if self.preamble_kv is None:
            cache = DynamicCache()
            ids = torch.tensor([self.preamble], device=self.device)
            self._forward(ids, torch.ones_like(ids), None, cache)
            self.preamble_kv = [(layer.keys, layer.values) for layer in cache.layers]
        return self.preamble_kv

    def _append_rows(self, cache, mask) -> None:
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])

    def _keep_rows(self, kept: list[int]) -> None:
        """Drop every row but those `kept`; an empty batch releases the cache's memory."""
        if not kept:
            self.cache = self.mask = None
            self.generators = []
            return
        if len(kept) == self.mask.shape[0]:
            return
        self.generators = [self.generators[i] for i in kept]
        index = torch.tensor(kept, device=self.device)
        # Columns of padding on every remaining row are dead weight in each attention.
        trim = int((self.mask[index] == 0).all(0).long().cumprod(0).sum())
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, trim:]
            layer.values = layer.values[index, :, trim:]
        self.mask = self.mask[index, trim:]


def _template_message(message: ChatMessage) -> dict:
    """A message as chat templates read it: a call's arguments as a dict (Llama's and Qwen's
    templates write them out themselves), a tool's result with the id of its call."""
    turn = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function",
                               "function": {"name": c.name, "arguments": json.loads(c.arguments)}}
                              for c in message.tool_calls]
    if message.tool_call_id:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _function_dict(function: Function) -> dict:
    described = {"name": function.name, "description": function.description} if function.description \
        else {"name": function.name}
    return {**described, "parameters": json.loads(function.parameters) if function.parameters else {}}


def _pad_left(tensor, width: int):
    """Left-pad the sequence axis (dim -2 of a KV tensor, dim -1 of a mask) to `width`."""
    if tensor.dim() == 2:
        return F.pad(tensor, (width - tensor.shape[-1], 0))
    return F.pad(tensor, (0, 0, width - tensor.shape[-2], 0))


def slots_from_memory(token_budget: int) -> int:
    """Sequences a worker takes at once when no --max-batch is given: as many as its KV budget
    holds at SLOT_TOKENS each (the scheduler still admits by each sequence's real size)."""
    return max(1, min(MAX_SLOTS_FROM_MEMORY, token_budget // SLOT_TOKENS))


def default_token_budget(model, device: str) -> int:
    """Tokens of KV cache that fit in half the memory free on `device` after loading."""
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
