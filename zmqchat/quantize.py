"""Lighter weights for a loaded model's Linear layers: `--quantize auto|none|fp16|int8|int4`.

A decode step of a small model reads every weight once per step, so fewer bytes per weight
and the CPU's fast kernels are the levers:

- fp16: weights stored in float16, activations and sums kept in float32 (fbgemm's fp16 GEMM,
  through PyTorch's dynamic quantisation, which converts each weight as it is read). Half the
  bytes of float32 and float32's arithmetic: on the default model it keeps float32's greedy
  answers (15 of 16 prompts identical for 64 tokens) and serves 1.2x to 1.5x faster on this
  CPU. x86 CPUs only (fbgemm), and the LM head too.
- int8: PyTorch's dynamic quantisation (int8 weights, activations quantised per step, fbgemm
  kernels using VNNI). Activations are quantised per tensor, across the whole batch, which
  this tiny model's outlier channels do not survive: its answers drift within a few tokens.
- int4: groupwise 4-bit weights (a float16 scale and minimum per 32 weights, as GGUF's Q4_1, so
  the embedded default model, shipped as Q4_1, keeps its own 4-bit grid) run by zmqchat's own
  kernel on CPUs with AVX-512 VNNI (kernels/int4_linear.cpp: integer products of the codes and
  15-bit activations), elsewhere by PyTorch's int4pack kernel, gpt-fast's path, whose bfloat16
  activations, scales and minimums depart further from float32. The LM head ranks every logit
  in 4 bits in steps of few rows, in bfloat16 in steps of many where AMX runs, and computes the
  highest again exactly (ShortlistHead); without AMX, steps of many rows run it in float16 as
  fp16's does. The kernels read the weights again for every FEW_ROWS rows, so on CPUs with AMX
  each layer also keeps its weights in bfloat16 (the same values: 2.5 bytes a weight in all) for
  steps of more rows, which then run as bf16's do (ByRows); compiled, steps of few rows and the
  rest are a graph each. The fastest format at one stream. CPU only here: CUDA's int4pack layout
  differs and is not tested yet, so it is refused rather than guessed.
- bf16: weights stored in bfloat16 and each product's input rounded to bfloat16, for CPUs with
  AMX (Intel Sapphire Rapids and later), whose tiles multiply bfloat16 matrices many times faster
  than float32 vectors do. Compiled (--compile), Inductor's AMX GEMM template runs the products
  and keeps the float32 sums of those whose output goes on alone (inductor_options); eager,
  PyTorch's product rounds every output to bfloat16, so eager and compiled answers may differ.
  Fastest at many streams on such a CPU, but it keeps only 9 or 10 of the 16 benchmark replies.

`auto` (the default) is fp16 where it applies (a float32 model on an x86 CPU) and none
elsewhere: GPUs already run bfloat16 weights. fp16's and int8's layers (PackedLinear) are
operators of their own to torch.compile, so a compiled step compiles everything between them.
In every format a block's layers that read one input (q/k/v, gate/up) are one product
(fuse_siblings): stacked before bf16's and int4's conversion, after fp16's and int8's packing.
README (Performance) has the served and bare figures and each format's greedy agreement.
bf16 is never auto's choice: it trades answers for speed, as int8 and int4 do.
Layers whose shape the kernel cannot take stay as they are.
"""

from __future__ import annotations

import itertools
import logging
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from zmqchat.config import QUANTIZE_METHODS
from zmqchat.models import LoadError
from zmqchat.ranking import top_indices

log = logging.getLogger("zmqchat.quantize")

INT4_GROUP = 32  # weights sharing a scale and a minimum: GGUF's Q4_0/Q4_1 block size
INT4_PACKED_OUTPUTS = 16  # the int4 kernels compute a layer's outputs in blocks of this many
FEW_ROWS = 4  # the int4 kernels' block of rows: they read the weights once a block
CANDIDATES = 64  # int4's LM head: the logits of a step of few rows computed again exactly (ShortlistHead)
CANDIDATES_BFLOAT16 = 16  # and of a step of many rows, ranked in bfloat16 on AMX


def chosen(method: str, model: nn.Module) -> str:
    """`method`, with `auto` made the fastest format that keeps float32's answers for `model`
    where it is: fp16 for a float32 model on a CPU that fbgemm serves, else none."""
    if method != "auto":
        return method
    float32_on_cpu = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    return "fp16" if float32_on_cpu and has_fbgemm() else "none"


def has_fbgemm() -> bool:
    """Whether this CPU runs fbgemm's kernels, fp16's and int8's (x86 with AVX2)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def quantize(model: nn.Module, method: str) -> nn.Module:
    """`model` with its Linear layers in `method`'s format (not auto: see chosen()), changed in place."""
    if method == "none":
        return model
    devices = {str(p.device) for p in model.parameters()}
    if devices != {"cpu"}:
        raise LoadError(f"--quantize {method} runs on the CPU only for now (the model is on "
                        f"{', '.join(sorted(devices))})")
    # Below 16 bits the LM head keeps at least 16: it is the tied input embedding (8-bit in the
    # default model's file), and quantised again the next-token ranking suffers most (int4's
    # ranks in 4 bits only to shortlist the tokens it then computes exactly: ShortlistHead).
    head = model.get_output_embeddings()
    linears = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if method in ("fp16", "int8", "bf16") and (dtypes := {str(p.dtype)[6:] for p in model.parameters()} - {"float32"}):
        raise LoadError(f"--quantize {method} keeps activations in float32: load the model in float32 "
                        f"(--dtype auto or float32), not {', '.join(sorted(dtypes))}")
    if method == "bf16":
        if not torch.cpu._is_amx_tile_supported():
            raise LoadError("--quantize bf16 needs a CPU with AMX (Intel Sapphire Rapids or later); without it "
                            "PyTorch's bfloat16 products are slower than fp16's (--quantize fp16)")
        fused = fuse_siblings(model)
        replaced = _replace_modules(model, lambda module: isinstance(module, nn.Linear), BFloat16Linear)
        log.info("bf16: %d Linear layers in bfloat16 (%d groups of siblings made one each)", replaced, fused)
        return model
    if method in ("fp16", "int8"):
        if not has_fbgemm():
            raise LoadError(f"--quantize {method} needs fbgemm's kernels, which this CPU lacks (x86 with AVX2)")
        layers = set(linears) if method == "fp16" else {name for name, m in linears.items() if m is not head}
        _pack_for_fbgemm(model, layers, torch.float16 if method == "fp16" else torch.qint8)
        log.info("%s: %d groups of Linear layers that read one input made one product each", method,
                 fuse_siblings(model))
        return model
    if method == "int4":
        # Where AMX multiplies bfloat16 fast, steps of many rows run int4's weights in bfloat16
        # (int4_by_rows): the int4 kernels read them again for every FEW_ROWS rows.
        amx = torch.cpu._is_amx_tile_supported()
        fused = fuse_siblings(model)
        replaced = _replace_modules(model, lambda module: isinstance(module, nn.Linear) and module is not head
                                    and Int4Linear.fits(module), int4_by_rows if amx else Int4Linear)
        head_format = "its own dtype"
        if head is not None and head.weight.dtype == torch.float32 and has_fbgemm():
            head_format = _shortlisted_head(model, head, amx)
        log.info("int4: %d Linear layers in groups of %d weights (%d groups of siblings made one each)%s; the LM "
                 "head in %s", replaced, INT4_GROUP, fused, f", in bfloat16 for steps of over {FEW_ROWS} rows"
                 if amx else "", head_format)
        return model
    raise LoadError(f"unknown quantization {method!r}; choose from {', '.join(QUANTIZE_METHODS)}")


def inductor_options(model: nn.Module, many_rows: bool) -> dict:
    """torch.compile's Inductor options for `model`'s steps of many rows or few (step_rows()):
    where bf16's layers run, its C++ GEMM template (AMX micro-kernels, weights packed once:
    `freezing`), which keeps a product's float32 sums where its output goes on alone (PyTorch's
    own bfloat16 product rounds them); nothing otherwise (with the template int4's products would
    go to its AMX template for 4-bit weights, which unpacks every weight on each call when the
    row count is unknown)."""
    if not _runs_bfloat16(model, many_rows):
        return {}
    return {"max_autotune": True, "max_autotune_gemm_backends": "CPP", "freezing": True}


def _shortlisted_head(model: nn.Module, head: nn.Linear, amx: bool) -> str:
    """int4's float32 LM head made lighter: steps of many rows rank in bfloat16 on AMX and
    compute the best again (ShortlistHead; float16's bytes at a third of fbgemm's time at 16
    rows, run AF), elsewhere run in float16 (fbgemm: half float32's bytes, holding the default
    model's 8-bit values, run Z); steps of few rows rank in 4 bits (a quarter again, run AB).
    What it says of the head, for the log."""
    shortlists = Int4Linear.fits(head) and head.out_features > CANDIDATES
    if not (amx and shortlists):
        _pack_for_fbgemm(model, {next(name for name, module in model.named_modules() if module is head)}, torch.float16)
        if not shortlists:
            return "float16"
    tied = head.weight is model.get_input_embeddings().weight
    exact = head.weight if tied else nn.Parameter(head.weight.detach().half(), requires_grad=False)
    if amx:
        model.set_output_embeddings(ByRows(ShortlistHead.in_int4(head, exact), ShortlistHead.in_bfloat16(head, exact)))
        return (f"4-bit for steps of up to {FEW_ROWS} rows and bfloat16 for more, its {CANDIDATES} and "
                f"{CANDIDATES_BFLOAT16} highest logits exact")
    model.set_output_embeddings(ByRows(ShortlistHead.in_int4(head, exact), model.get_output_embeddings()))
    return f"float16 (4-bit for steps of up to {FEW_ROWS} rows, its {CANDIDATES} highest logits exact)"


def _runs_bfloat16(module: nn.Module, many_rows: bool) -> bool:
    if isinstance(module, ByRows):
        return _runs_bfloat16(module.many if many_rows else module.few, many_rows)
    return isinstance(module, BFloat16Linear) or any(_runs_bfloat16(child, many_rows) for child in module.children())


def _pack_for_fbgemm(model: nn.Module, layers: set[str], dtype: torch.dtype) -> None:
    """The Linear layers named `layers` made PackedLinear layers of `dtype` (float16 or qint8).
    Through PyTorch's dynamic quantisation, deprecated in favour of torchao, whose int8 path
    measured far slower here and which has no float16-weight kernel for CPUs: fbgemm's are the fast ones."""
    with warnings.catch_warnings():  # its deprecation, said above, is not news to whoever runs a worker
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(model, layers, inplace=True, dtype=dtype)
    _replace_modules(model, lambda module: isinstance(module, DynamicLinear), PackedLinear.of)


def _replace_modules(model: nn.Module, fits, make) -> int:
    """Each module under `model` that `fits`, replaced by what `make` makes of it; how many.
    A module found under several parents (the stacked layer of fused siblings) is made once."""
    made = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if fits(child):
                if id(child) not in made:
                    made[id(child)] = make(child)
                setattr(parent, name, made[id(child)])
    return len(made)


class PackedLinear(nn.Module):
    """A Linear layer from dynamic quantisation (fp16 or int8), its weights packed for fbgemm,
    that torch.compile can trace: the packed weights are an object Dynamo cannot see into, so a
    compiled step calls each layer as an operator of its own (`zmqchat::packed_linear`, found by
    the layer's number), and compiles everything around the layers into its kernels. Eager, the
    layer calls fbgemm itself."""

    _numbered = itertools.count()
    layers: weakref.WeakValueDictionary[int, PackedLinear] = weakref.WeakValueDictionary()

    def __init__(self, packed, fp16: bool, out_features: int):
        super().__init__()
        self.packed, self.fp16, self.out_features = packed, fp16, out_features
        self.number = next(self._numbered)
        self.layers[self.number] = self

    @classmethod
    def of(cls, dynamic: DynamicLinear) -> PackedLinear:
        params = dynamic._packed_params
        return cls(params._packed_params, params.dtype == torch.float16, dynamic.out_features)

    @classmethod
    def stacked(cls, layers: list[PackedLinear]) -> PackedLinear:
        """One layer whose outputs are `layers`' outputs side by side, with their very weights
        (int8's each keeping its own scale, as rows of a per-row quantised weight)."""
        fp16 = layers[0].fp16
        weights, biases = zip(*(layer.unpacked() for layer in layers))
        bias = None if biases[0] is None else torch.cat(biases)
        if fp16:
            packed = torch.ops.quantized.linear_prepack_fp16(torch.cat(weights), bias)
        else:
            scales = torch.cat([torch.full((w.shape[0],), w.q_scale(), dtype=torch.double) for w in weights])
            rows = torch.cat([w.int_repr() for w in weights])
            weight = torch._make_per_channel_quantized_tensor(rows, scales, torch.zeros_like(scales, dtype=torch.long),
                                                              0)
            packed = torch.ops.quantized.linear_prepack(weight, bias)
        return cls(packed, fp16, sum(layer.out_features for layer in layers))

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Its weight (float32 holding float16's values, or int8's quantised tensor) and bias."""
        unpack = torch.ops.quantized.linear_unpack_fp16 if self.fp16 else torch.ops.quantized.linear_unpack
        return unpack(self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.number) if torch.compiler.is_compiling() else self.run(x)

    def run(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp16:
            return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)
        return torch.ops.quantized.linear_dynamic(x, self.packed, reduce_range=True)  # as quantize_dynamic's layer


# Sibling layers that read one input, as the model's code calls them (vLLM's merged layers).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_siblings(model: nn.Module) -> int:
    """Each module's q/k/v projections, and gate/up, made one product (SharedInput), where they
    are layers of one kind (nn.Linear, or PackedLinear of one format) with biases alike; how many
    groups. fbgemm's product spends ~20 µs a call beyond reading its weights (it splits its work
    between the threads): at one stream a step of the default model makes 121 calls instead of
    211 and takes ~5 ms less in fp16 (README, runs S to U); bf16's compiled step gains less (run Y)."""
    fused = 0
    for module in list(model.modules()):  # as it was: the loop replaces some of them
        for names in SIBLINGS:
            layers = [getattr(module, name, None) for name in names]
            if (stacked := stacked_layer(layers)) is not None:
                shared = SharedInput(stacked, [layer.out_features for layer in layers])
                for index, name in enumerate(names):
                    setattr(module, name, LinearPart(shared, index))
                fused += 1
    return fused


def stacked_layer(layers: list) -> nn.Module | None:
    """One layer whose outputs are `layers`' outputs side by side, with their very weights, where
    they are plain Linear layers, or PackedLinear layers of one format, with biases alike; else None."""
    if all(type(layer) is nn.Linear for layer in layers) and len({layer.bias is None for layer in layers}) == 1:
        return stacked_linear(layers)
    if (all(isinstance(layer, PackedLinear) for layer in layers)
            and len({(layer.fp16, layer.packed.bias() is None) for layer in layers}) == 1):
        return PackedLinear.stacked(layers)
    return None


def stacked_linear(layers: list[nn.Linear]) -> nn.Linear:
    """`layers` as one Linear layer, their weights stacked."""
    bias = None if layers[0].bias is None else torch.cat([layer.bias.detach() for layer in layers])
    return linear_of(torch.cat([layer.weight.detach() for layer in layers]), bias)


def linear_of(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A Linear layer of these weights and bias: made on the meta device and given them, so that
    nothing is initialised only to be replaced."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


class SharedInput(nn.Module):
    """Sibling layers' one product: the first of them called on an input computes all their
    outputs, the others take theirs, and once all are taken nothing is kept (so a compiled step
    sees no tensor left from the last). Called on another input, or out of the usual order, it
    computes again: always the right answer, one product per input in the usual case. (A
    worker's model runs in one thread, the engine's, embeddings included.)"""

    def __init__(self, stacked: PackedLinear, sizes: list[int]):
        super().__init__()
        self.stacked, self.sizes = stacked, sizes
        self.input = self.outputs = None
        self.left = 0

    def output(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.input is not x:
            self.input, self.outputs, self.left = x, self.stacked(x).split(self.sizes, -1), len(self.sizes)
        output = self.outputs[index]
        self.left -= 1
        if not self.left:
            self.input = self.outputs = None
        return output


class LinearPart(nn.Module):
    """One of sibling layers fused into a SharedInput: its share of their product."""

    def __init__(self, shared: SharedInput, index: int):
        super().__init__()
        self.shared, self.index = shared, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared.output(x, self.index)


# Defined with torch.library.Library: custom_op's Python wrapper costs twice as much per call, 211 calls a step.
_LIBRARY = torch.library.Library("zmqchat", "FRAGMENT")
_LIBRARY.define("packed_linear(Tensor x, int layer) -> Tensor")
_LIBRARY.impl("packed_linear", lambda x, layer: PackedLinear.layers[layer].run(x), "CompositeExplicitAutograd")
packed_linear = torch.ops.zmqchat.packed_linear.default


@torch.library.register_fake("zmqchat::packed_linear")
def _(x, layer):
    return x.new_empty(*x.shape[:-1], PackedLinear.layers[layer].out_features)


class BFloat16Linear(nn.Module):
    """A Linear layer whose weight is stored in bfloat16 and whose input is rounded to it for the
    product (AMX's tiles take bfloat16 pairs); its output is the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    """A Linear layer with 4-bit weights in groups along the input: zmqchat's own kernel where it
    built for this CPU (kernels/int4_linear.cpp: AVX-512 VNNI, activations to 15 bits, float16
    scales and minimums), else PyTorch's int4pack (gpt-fast's: activations, scales and minimums
    in bfloat16). Both use one set of codes, scales and minimums (quantize_groups)."""

    def __init__(self, linear: nn.Linear, groups: tuple[torch.Tensor, ...] | None = None,
                 own_kernel: bool | None = None):
        """`groups`: quantize_groups' answer for `linear`'s weights, where the caller has it already;
        `own_kernel`: whether to run zmqchat's kernel (default: where it is built)."""
        super().__init__()
        codes, scales, minimums = groups or quantize_groups(linear.weight.detach().float(), INT4_GROUP)
        built = _int4_kernel() is not None  # built and loaded, once per process
        self.own_kernel = built if own_kernel is None else own_kernel
        # Buffers, not plain attributes, which torch.compile's graph loses the sizes of ("name 's38'
        # is not defined"), so that a compiled step runs them: Inductor calls the kernel itself.
        if self.own_kernel:
            packed, scales = _packed_for_own_kernel(codes, scales, minimums)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            # [groups, out, 2]: a scale and a "zero", which int4pack takes at a group's middle (code 8)
            scales = torch.stack([scales, minimums + 8 * scales], dim=2).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.out_features = linear.out_features
        self.bias = linear.bias

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        return (linear.in_features % INT4_GROUP == 0 and linear.out_features % INT4_PACKED_OUTPUTS == 0
                and linear.weight.device.type == "cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.own_kernel:
            y = torch.ops.zmqchat_kernels.int4_linear(x, self.packed, self.scales)
        else:
            rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # float32 input takes a slow path
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _int4_kernel():
    # Imported here: zmqchat.engine imports this module.
    from zmqchat.engine import kernels
    return kernels.int4_linear()


def _packed_for_own_kernel(codes: torch.Tensor, scales: torch.Tensor,
                           minimums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_groups' answer in int4_linear.cpp's layout: (codes [out/16, in/8, 64] uint8, for
    each block of 16 outputs and 8 inputs k..k+7 the 16 outputs' codes of k..k+3 in the low
    nibbles and of k+4..k+7 in the high; scales and minimums [out/16, in/32, 2, 16] float16)."""
    out, inputs = codes.shape
    split = codes.to(torch.uint8).reshape(out // 16, 16, inputs // 8, 2, 4).permute(0, 2, 1, 3, 4)
    packed = (split[:, :, :, 0] | (split[:, :, :, 1] << 4)).reshape(out // 16, inputs // 8, 64).contiguous()
    both = torch.stack([scales, minimums])  # [2, out, groups]
    return packed, both.reshape(2, out // 16, 16, -1).permute(1, 3, 0, 2).contiguous().half()


class ShortlistHead(nn.Module):
    """The LM head ranking every logit from cheaper weights (`rough`), then computing the
    `candidates` highest again exactly, from the head's weights: float32's where the head is the
    input embedding (shared), else a float16 copy (the float16 head's values, half of float32's
    memory). Greedy decoding chooses as the exact head does where the best token is among the
    candidates (on the default model's prompts it never ranked below 4-bit's ninth or bfloat16's
    third: README, Performance, runs AB and AF). The logits ranked lower keep the rough error: so
    does the logprob of a token outside the candidates (a prompt's), and a choice that a grammar,
    logit_bias or a penalty moves off the candidates is made on rough logits."""

    def __init__(self, rough: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, candidates: int):
        super().__init__()
        self.rough, self.weight, self.bias, self.candidates = rough, weight, bias, candidates

    @classmethod
    def in_int4(cls, head: nn.Linear, weight: torch.Tensor) -> ShortlistHead:
        """For steps of few rows: a quarter of float16's bytes read (Int4Linear)."""
        return cls(Int4Linear(head), weight, head.bias, CANDIDATES)

    @classmethod
    def in_bfloat16(cls, head: nn.Linear, weight: torch.Tensor) -> ShortlistHead:
        """For steps of many rows on AMX: 3x fbgemm's float16 product at 16 rows (run AF)."""
        return cls(BFloat16Linear(head), weight, head.bias, CANDIDATES_BFLOAT16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.rough(x)
        top = top_indices(logits, self.candidates)
        exact = (self.weight[top].to(x.dtype) * x[..., None, :]).sum(-1)
        return logits.scatter(-1, top, exact if self.bias is None else exact + self.bias[top])


class ByRows(nn.Module):
    """One layer in two formats: `few` runs the steps of up to FEW_ROWS rows, `many` the larger
    ones (`many_rows`, set for each step by step_rows()). Compiled, each kind of step is a graph."""

    many_rows = False  # whether the step running has more than FEW_ROWS rows: one flag for every layer

    def __init__(self, few: nn.Module, many: nn.Module):
        super().__init__()
        self.few, self.many = few, many

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.many(x) if ByRows.many_rows else self.few(x)


def step_rows(rows: int) -> bool:
    """Tell the layers that run steps of few rows and of many in different formats (ByRows) that
    the next step has `rows` rows; whether that is many."""
    ByRows.many_rows = rows > FEW_ROWS
    return ByRows.many_rows


def int4_by_rows(linear: nn.Linear) -> ByRows:
    """`linear` in int4, and in bfloat16 on int4's grid (the same weights) for steps of many rows."""
    groups = quantize_groups(linear.weight.detach().float(), INT4_GROUP)
    return ByRows(Int4Linear(linear, groups), BFloat16Linear(linear_of(dequantized(*groups), linear.bias)))


def dequantized(codes: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor) -> torch.Tensor:
    """The float32 weights [out, in] that quantize_groups' codes, scales and minimums stand for."""
    return (codes.reshape(*scales.shape, -1) * scales[..., None] + minimums[..., None]).reshape(codes.shape)


def quantize_groups(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes 0..15 as int32 [out, in], scales and minimums [out, in/group] as float32 holding
    float16 values, as GGUF's Q4_1 keeps them) such that a weight is code * scale + minimum of its
    group: the default model's weights, on Q4_1's grid already, come back exactly."""
    groups = weight.reshape(-1, group)
    low = groups.amin(1, keepdim=True).half().float()
    scales = ((groups.amax(1, keepdim=True) - low) / 15).clamp(min=1e-6).half().float()
    codes = ((groups - low) / scales).round().clamp(0, 15).to(torch.int32).reshape_as(weight)
    return codes, scales.reshape(weight.shape[0], -1), low.reshape(weight.shape[0], -1)
