"""A transformers causal LM, run one batch at a time: HFRunner.

The engine asks it for what the model's tokenizer knows (chat template, encoding, decoding,
token bytes, stop tokens, vocabulary size, context window, the model's own sampling defaults)
and hands `run()` each step's Batch from the scheduler; `run()` returns one token per
sequence, and its logprobs where asked, in the batch's order.

Each step runs every chunk the scheduler chose (a decoding sequence's last token, a prompt's
next tokens) as one flat row through the model, its keys and values written in place into the
paged KV cache (attention.py): no row is padded to another's length outside attention, and no
cache is copied when a sequence joins or leaves. Only the logits the step needs are computed:
the last position of each sequence that gets a token, and every prompt position of a sequence
whose job asked for its prompt's logprobs.

With `compile`, the model's forward goes through torch.compile, compiled once at start: the
attention and fbgemm's layers (quantize.py) are opaque operators and every size that changes
between steps is unbacked, so one graph serves every step (int4's: one for steps of few rows,
one for the rest, quantize.step_rows); bf16's layers are compiled with the Inductor options
quantize.inductor_options gives. On a CPU, steps of decodes only (up to FEW_ROWS) then run
through a program compiled ahead of time (AOTInductor), which has no Python between its
operators. It runs fastest on the thread that compiled it (worker.py says why). README,
Performance, has its figures (runs J, P to R, AE).

`embed()` runs inputs through the model without generating (no KV cache is kept): an input's
embedding is its last hidden states (the base model's output, after its final norm: what the LM
head reads) averaged over its own tokens, scaled to unit length.
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import os
import re
import tempfile
import time
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from transformers.convert_slow_tokenizer import bytes_to_unicode

from zmqchat.config import BLOCK_SIZE, CPU_KV_CACHE_BYTES, MAX_SLOTS_FROM_MEMORY, SLOT_TOKENS
from zmqchat.engine.attention import ATTENTION, STEP_ARGUMENT, Attending, PagedKV, StepPlan, kv_shape, plan_step
from zmqchat.engine.kv_cache import NULL_BLOCK, blocks_holding
from zmqchat.engine.sampler import prompt_logprobs, sample, seeded_generator
from zmqchat.engine.scheduler import Batch, Chunk
from zmqchat.engine.sequence import Sequence
from zmqchat.grammar import Grammars, Matcher
from zmqchat.models import LoadedModel, LoadError
from zmqchat.protocol import ChatMessage, Constraint, ErrorCode, Function, JobError
from zmqchat.quantize import FEW_ROWS, ByRows, PackedLinear, inductor_options, step_rows
from zmqchat.tools import fallback_conversation

log = logging.getLogger("zmqchat.engine")

# End-of-turn markers of common chat templates; any that is a single token ends a sequence.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


# glibc's mallopt() options (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep the memory a step frees for the next one, as jemalloc and
    tcmalloc do: by default it maps large blocks afresh and returns freed memory to the system,
    so a step of many streams page-faults its activations and gathered keys in again (at 64
    streams on a CPU: 5x fewer page faults, 1.11x the tokens served; README, Performance, run
    P). Process-wide; False where the C library is not glibc, which is left as it is."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((M_MMAP_THRESHOLD, 32 << 20),  # a step's blocks (64 streams' logits: 12 MiB) from the heap
                (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))  # grow the heap in steps, shrink it hardly ever
    return all(libc.mallopt(option, value) == 1 for option, value in settings)


class HFRunner:
    def __init__(self, loaded: LoadedModel, max_tokens_in_flight: int | None = None, compile: bool = False):
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        if torch.device(self.device).type == "cpu":
            keep_freed_memory()
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
        try:
            self.model.set_attn_implementation(ATTENTION)
        except (ValueError, NotImplementedError) as exc:
            raise LoadError(f"{type(self.model).__name__} does not take a custom attention implementation, which "
                            f"zmqchat's paged KV cache needs: {exc}") from None
        self.num_blocks = blocks_holding(self.token_budget, BLOCK_SIZE)
        self.kv = PagedKV(config, self.num_blocks, BLOCK_SIZE, self.model.dtype, self.device)
        # The plan says what each token attends to, so transformers need build no mask: a 4D
        # attention mask is taken as ready-made (and the planned attention never reads it).
        self.no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        self.forward = self._compiled_forward() if compile else self._eager_forward

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

    # -- the model ------------------------------------------------------------------------------

    def run(self, batch: Batch[Sequence]) -> tuple[list[int], list]:
        """One step of `batch`'s chunks, as one flat row of tokens through the model: the next
        token of each sequence a chunk finishes, and its logprobs (see sampler.token_logprobs),
        in the batch's order. Chunks of sequences scoring their prompt note its logprobs."""
        if not batch.chunks:
            return [], []
        for chunk in batch.chunks:
            if chunk.start == chunk.seq.cached_tokens:  # its first chunk
                chunk.seq.generator = seeded_generator(chunk.seq.params.seed, self.device)
                if chunk.seq.wants_prompt_logprobs:
                    chunk.seq.prompt_logprobs = []
        with torch.inference_mode():
            step = plan_step(self.kv, [(c.seq.blocks, c.start, c.end) for c in batch.chunks], self.device)
            ids = torch.tensor([t for c in batch.chunks for t in c.seq.token_ids(c.start, c.end)], device=self.device)
            wanted = LogitRows(batch.chunks)
            keep = torch.tensor(wanted.positions, dtype=torch.long, device=self.device)
            logits = self.forward(**self._inputs(ids, step, keep)).logits[0]
            for seq, rows, targets in wanted.scored:
                seq.prompt_logprobs += prompt_logprobs(logits[rows][None], torch.tensor([targets], device=self.device),
                                                       seq.params.prompt_logprobs)[0]
            seqs = batch.sequences
            if not seqs:
                return [], []
            return sample(logits[wanted.sampled], seqs, [s.generator for s in seqs], self.stop_token_ids)

    def _inputs(self, ids: torch.Tensor, step: StepPlan, keep: torch.Tensor) -> dict:
        """The model's arguments for one step: the flat row `ids`, its logits at the positions `keep`."""
        return {"input_ids": ids[None], "position_ids": step.positions[None], "attention_mask": self.no_mask,
                "use_cache": False, "logits_to_keep": keep, STEP_ARGUMENT: step}

    def _eager_forward(self, **inputs):
        step_rows(inputs["input_ids"].numel())
        return self.model(**inputs)

    def _compiled_forward(self):
        """The model's forward through torch.compile, compiled here by two steps of a decode and
        a prompt (in free blocks), one of few rows and one of many (quantize.step_rows: int4's
        layers run each in their own way), so that no request waits for it; eager if that fails.
        The few rows' graph first: compiled after the other, it ran one stream at a fifth of its
        speed (README, Performance, run Z2; why is not known)."""
        # Dynamo checks no guards on the model's modules before each step (thousands of them,
        # ~2 of a one-stream step's ~20 ms, profiled: README, Performance, run AA): a loaded
        # model's modules do not change. The inputs' and globals' guards stay (ByRows.many_rows picks the graph).
        # Dynamo keeps its graphs with the code it compiled, so this runner's step is code of
        # its own: another model compiled in the process can never take this one's graphs.
        # (The filter is not in older PyTorch, which checks them all.)
        skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        compiled = torch.compile(_code_of_its_own(self.model), dynamic=True,
                                 options={"guard_filter_fn": skip_module_guards} if skip_module_guards else None)
        # Set around each call, where any compiling happens: Inductor does not take `freezing`
        # from torch.compile's options. Without size_asserts: the compiled code would check the
        # sizes and strides of every weight and input on each step (~670 checks, ~0.5 ms of a
        # one-stream step), which the guards and a loaded model's unchanging weights make moot.
        options = {many_rows: {"size_asserts": False, **inductor_options(self.model, many_rows)}
                   for many_rows in (False, True)}

        def forward(**inputs):
            if decodes and _decodes_only(inputs):
                return decodes(inputs)
            _unspecialised(inputs)
            with torch._inductor.config.patch(options[step_rows(inputs["input_ids"].numel())]):
                return compiled(**inputs)

        decodes = None

        started = time.perf_counter()
        try:
            with torch.inference_mode():
                for prompt in (FEW_ROWS - 1, FEW_ROWS + 1):  # steps of FEW_ROWS rows, then of FEW_ROWS + 2
                    step = plan_step(self.kv, [([NULL_BLOCK + 1], 1, 2), ([NULL_BLOCK + 2], 0, prompt)], self.device)
                    keep = torch.tensor([0, prompt], device=self.device)
                    forward(**self._inputs(torch.tensor([self.pad_id] * (1 + prompt), device=self.device), step, keep))
        except Exception as exc:  # torch.compile's errors have no common base; eager still serves
            log.warning("torch.compile failed after %.0f s, the model runs eager: %s",
                        time.perf_counter() - started, exc)
            return self._eager_forward
        log.info("compiled the model's step in %.0f s", time.perf_counter() - started)
        if torch.device(self.device).type == "cpu":
            decodes = self._decodes_ahead_of_time()
        return forward

    def _decodes_ahead_of_time(self):
        """Steps of decodes only (one token each, up to FEW_ROWS sequences) as a program compiled
        ahead of time (AOTInductor), or None where that fails (logged; the graph above runs them).
        Through torch.compile a one-stream step spent ~2 ms in Dynamo (its guards, and gathering
        the graph's ~430 inputs, the weights among them, from the model's modules) and ~2 more in
        the graph's Python; here the weights are the program's constants and it runs in C++:
        one stream 1.27-1.29x in one process (README, Performance, run AE)."""
        with _few_rows_only(self.model):
            if any(isinstance(layer, PackedLinear) for layer in self.model.modules()):
                # fbgemm's packed weights (fp16, int8) are objects torch.export cannot take, and
                # a failed export leaves the compiled graph to compile again.
                log.info("steps of decodes run in the compiled graph: fbgemm's layers cannot be compiled ahead of time")
                return None
        started = time.perf_counter()
        sample = plan_step(self.kv, [([NULL_BLOCK + 1], 1, 2), ([NULL_BLOCK + 2], 2, 3)], self.device)
        inputs = self._inputs(torch.tensor([self.pad_id] * 2, device=self.device), sample,
                              torch.tensor([0, 1], device=self.device))
        rows = torch.export.Dim("rows", min=1, max=FEW_ROWS)
        keys = torch.export.Dim("keys", min=1, max=self.kv.layers[0].shape[0])
        shapes = ({1: rows}, {0: rows}, {0: rows}, {0: rows}, {0: rows}, {0: rows, 1: keys},
                  (None,) * len(self.kv.layers))
        try:
            with warnings.catch_warnings(), tempfile.TemporaryDirectory() as folder:
                # PyTorch's own use of a pytree API it deprecates, printed once per process
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
                step_rows(2)
                with torch.inference_mode(), _few_rows_only(self.model):
                    program = torch.export.export(_Decodes(self.model, self.kv, self.no_mask),
                                                  _decode_arguments(inputs), dynamic_shapes=shapes, strict=False)
                package = torch._inductor.aoti_compile_and_package(program, package_path=f"{folder}/decodes.pt2")
                compiled = torch._inductor.aoti_load_package(package)
        except Exception as exc:  # export's and AOTInductor's errors have no common base either
            log.warning("steps of decodes could not be compiled ahead of time after %.0f s; the compiled graph "
                        "runs them: %s", time.perf_counter() - started, exc)
            return None
        log.info("compiled steps of decodes ahead of time in %.0f s", time.perf_counter() - started)
        return lambda inputs: StepLogits(compiled(*_decode_arguments(inputs)))

    def embed(self, inputs: list[list[int]]) -> list[list[float]]:
        """Each input's mean-pooled, normalised last hidden state. Inputs are padded on the
        right, so that their own tokens keep their positions and attend only to each other."""
        width = max(map(len, inputs))
        ids = torch.tensor([tokens + [self.pad_id] * (width - len(tokens)) for tokens in inputs], device=self.device)
        mask = torch.tensor([[1] * len(tokens) + [0] * (width - len(tokens)) for tokens in inputs], device=self.device)
        with torch.inference_mode():
            step_rows(ids.numel())
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            pooled = (hidden.float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            return F.normalize(pooled, dim=-1).tolist()


class LogitRows:
    """The positions of a step's flat row whose logits it needs: the last of each chunk that
    samples (`sampled`: their rows among those kept), and each prompt position of a chunk whose
    sequence scores its prompt (`scored`: the sequence, its rows, and the prompt tokens they predict)."""

    def __init__(self, chunks: list[Chunk[Sequence]]):
        self.positions: list[int] = []
        self.sampled: list[int] = []
        self.scored: list[tuple[Sequence, slice, list[int]]] = []
        offset = 0
        for chunk in chunks:
            seq = chunk.seq
            if seq.wants_prompt_logprobs:
                # Position i predicts prompt token i + 1: the prompt's last position predicts none.
                scoring = min(chunk.end, len(seq.prompt_ids) - 1) - chunk.start
                if scoring > 0:
                    rows = slice(len(self.positions), len(self.positions) + scoring)
                    self.scored.append((seq, rows, seq.prompt_ids[chunk.start + 1:chunk.start + 1 + scoring]))
                    self.positions += range(offset, offset + scoring)
            if chunk.samples:
                self.sampled.append(len(self.positions))
                self.positions.append(offset + len(chunk) - 1)
            offset += len(chunk)


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


@dataclass
class StepLogits:
    """A step's output as the model's forward gives it: its logits [1, rows kept, vocabulary]."""

    logits: torch.Tensor


class _Decodes(torch.nn.Module):
    """The model's forward for a step of decodes only, its plan's tensors as flat arguments
    (_decode_arguments), the form torch.export takes."""

    def __init__(self, model, kv: PagedKV, no_mask: torch.Tensor):
        super().__init__()
        self.model, self.kernel, self.block_size, self.no_mask = model, kv.kernel, kv.block_size, no_mask

    def forward(self, input_ids, keep, positions, write_slots, query_positions, key_slots, *pools):
        order = torch.arange(input_ids.shape[1], device=input_ids.device)
        # The pools as PagedKV holds them: those passed in, which the program writes in place.
        kv = types.SimpleNamespace(layers=list(pools), kernel=self.kernel, block_size=self.block_size)
        plan = StepPlan(kv, positions, write_slots, Attending(order[:, None], query_positions, key_slots, order),
                        Attending.empty(input_ids.device))
        return self.model(input_ids=input_ids, position_ids=positions[None], attention_mask=self.no_mask,
                          use_cache=False, logits_to_keep=keep, **{STEP_ARGUMENT: plan}).logits


def _decode_arguments(inputs: dict) -> tuple:
    step: StepPlan = inputs[STEP_ARGUMENT]
    return (inputs["input_ids"], inputs["logits_to_keep"], step.positions, step.write_slots,
            step.decodes.query_positions, step.decodes.key_slots, *step.kv.layers)


def _decodes_only(inputs: dict) -> bool:
    """Whether a step is one that _Decodes runs: up to FEW_ROWS decodes, each keeping its logits."""
    rows = inputs["input_ids"].shape[1]
    return (rows <= FEW_ROWS and not inputs[STEP_ARGUMENT].prompts.token_rows.numel()
            and inputs["logits_to_keep"].shape[0] == rows)


@contextmanager
def _few_rows_only(model):
    """`model` without its layers' formats for steps of many rows (ByRows.many), which a step
    of few rows never runs (and fbgemm's packed weights, among them, torch.export cannot take)."""
    layers = [(layer, layer.many) for layer in model.modules() if isinstance(layer, ByRows)]
    for layer, _ in layers:
        layer.many = torch.nn.Identity()
    try:
        yield
    finally:
        for layer, many in layers:
            layer.many = many


def _code_of_its_own(model):
    """`model`'s forward through a function whose code object no other function shares."""
    def step(**inputs):
        return model(**inputs)

    step.__code__ = step.__code__.replace()  # a new code object: Dynamo's cache of graphs is per code object
    return step


def _unspecialised(inputs: dict) -> None:
    """Mark the sizes that change from step to step (tokens, chunks, keys, logits kept) as
    unbacked, so that one compiled graph serves every step: torch.compile would otherwise
    specialise on the first sizes it sees and on sizes of 1, compiling again for each."""
    step: StepPlan = inputs[STEP_ARGUMENT]
    varying = [(inputs["input_ids"], (1,)), (inputs["position_ids"], (1,)), (inputs["logits_to_keep"], (0,)),
               (step.positions, (0,)), (step.write_slots, (0,))]
    for group in (step.decodes, step.prompts):
        varying += [(group.token_rows, (0,)), (group.query_index, (0, 1)), (group.query_positions, (0, 1)),
                    (group.key_slots, (0, 1))]
    for tensor, dims in varying:
        for dim in dims:
            torch._dynamo.decorators.mark_unbacked(tensor, dim)


def slots_from_memory(token_budget: int) -> int:
    """Sequences a worker takes at once when no --max-batch is given: as many as its KV budget
    holds at SLOT_TOKENS each (the scheduler still admits by each sequence's real size)."""
    return max(1, min(MAX_SLOTS_FROM_MEMORY, token_budget // SLOT_TOKENS))


def default_token_budget(model, device: str) -> int:
    """Tokens of KV cache that fit in half the memory free on `device` after loading; on a CPU,
    whose memory the machine's other processes share, in at most CPU_KV_CACHE_BYTES."""
    layers, kv_heads, head_dim = kv_shape(model.config)
    bytes_per_token = 2 * layers * kv_heads * head_dim * model.dtype.itemsize
    if device.startswith("cuda"):
        budget = torch.cuda.mem_get_info(torch.device(device))[0] * 0.5
    else:
        budget = min(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.5, CPU_KV_CACHE_BYTES)
    return max(1024, int(budget / bytes_per_token))
