"""Lighter weights (--quantize): which format auto picks, the int4 layer's arithmetic, and the
default model served in each format through a real worker."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from openai import OpenAI
from test_engine import job, run_to_end, submit
from torch import nn

from zmqchat import models
from zmqchat.engine import Engine, HFRunner, kernels
from zmqchat.models import DEFAULT_MODEL_NAME, LoadError
from zmqchat.quantize import (CANDIDATES, CANDIDATES_BFLOAT16, FEW_ROWS, INT4_GROUP, BFloat16Linear, ByRows,
                              Int4Linear, LinearPart, PackedLinear, ShortlistHead, chosen, dequantized,
                              inductor_options, int4_by_rows, quantize, quantize_groups, step_rows)


def tiny_llama(vocab_size: int = 96, tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def test_auto_serves_float32_weights_on_a_cpu_in_float16_and_others_as_they_are():
    assert chosen("auto", tiny_llama()) == "fp16"  # this x86 CPU has fbgemm
    assert chosen("auto", tiny_llama().bfloat16()) == "none"
    assert chosen("int4", tiny_llama()) == "int4"


def test_fp16_refuses_a_model_loaded_in_another_dtype_with_the_option_to_use():
    with pytest.raises(LoadError, match=r"--dtype auto or float32\), not bfloat16"):
        quantize(tiny_llama().bfloat16(), "fp16")


def test_fp16_computes_in_float32_with_its_weights_rounded_to_float16():
    model, rounded = tiny_llama(), tiny_llama()
    with torch.no_grad():
        for linear in [m for m in rounded.modules() if isinstance(m, nn.Linear)]:
            linear.weight.copy_(linear.weight.half().float())
    ids = torch.randint(0, 96, (2, 7))
    with torch.inference_mode():
        expected = rounded(ids).logits
        got = quantize(model, "fp16")(ids).logits
    assert got.dtype == torch.float32
    # float32 sums of float16 weights (the LM head's too), not float16 arithmetic (~1e-3 off)
    assert torch.allclose(got, expected, atol=1e-5)


def tiny_qwen2() -> nn.Module:
    """Biases on q, k and v, unlike Llama."""
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["fp16", "int8"])
@pytest.mark.parametrize("model", [tiny_llama, tiny_qwen2])
def test_sibling_layers_made_one_product_give_pytorchs_own_quantised_answers(method, model):
    """q/k/v and gate/up run as one fbgemm product each, with the very weights PyTorch's
    dynamic quantisation gives each layer (int8's each keeping its own scale)."""
    ids = torch.randint(0, 96, (2, 7))
    reference = pytorch_quantized(model(), method)
    fused = quantize(model(), method)
    block = fused.model.layers[0]
    assert isinstance(block.self_attn.q_proj, LinearPart) and isinstance(block.mlp.up_proj, LinearPart)
    products = {id(m) for m in fused.modules() if isinstance(m, PackedLinear)}
    assert len(products) == 2 * 4 + (method == "fp16")  # per block: q/k/v, o, gate/up, down; fp16's LM head
    with torch.inference_mode():
        assert torch.equal(fused(ids).logits, reference(ids).logits)


def pytorch_quantized(model: nn.Module, method: str) -> nn.Module:
    """`model` with PyTorch's own dynamic quantisation of its Linear layers, as quantize() chooses them."""
    layers = {name for name, m in model.named_modules()  # int8 leaves the LM head as it is
              if isinstance(m, nn.Linear) and (method == "fp16" or m is not model.get_output_embeddings())}
    return torch.ao.quantization.quantize_dynamic(model, layers, inplace=True,
                                                  dtype=torch.float16 if method == "fp16" else torch.qint8)


@pytest.mark.parametrize("method", ["bf16", "int4"])
@pytest.mark.parametrize("model", [tiny_llama, tiny_qwen2])
def test_bf16_and_int4_make_sibling_layers_one_product_giving_each_layers_own_answer(method, model, monkeypatch):
    """Stacked before conversion, each part's share of the one product is what its own layer
    computes converted alone."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # bf16 runs eager on any CPU
    kind = BFloat16Linear if method == "bf16" else Int4Linear
    fused, alone = quantize(model(), method), model()
    products = {id(m) for m in fused.modules() if isinstance(m, kind)}
    assert len(products) == 2 * 4 + 1  # per block: q/k/v, o, gate/up, down; the LM head (int4's shortlist's)
    x = torch.randn(3, 64)
    with torch.inference_mode():
        for block, original in zip(fused.model.layers, alone.model.layers):
            for name in ("q_proj", "k_proj", "v_proj"):
                assert isinstance(getattr(block.self_attn, name), LinearPart)
                assert torch.equal(getattr(block.self_attn, name)(x), kind(getattr(original.self_attn, name))(x))
            for name in ("gate_proj", "up_proj"):
                assert torch.equal(getattr(block.mlp, name)(x), kind(getattr(original.mlp, name))(x))


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_int4_shortlists_the_lm_head_in_4_bits_for_few_rows_and_in_bfloat16_or_float16_for_many(amx, tied, monkeypatch,
                                                                                                 step_of):
    """Few rows: every logit from the 4-bit weights, the CANDIDATES highest of them computed
    again, so the top of the ranking is the exact head's: from the float32 weights of a head that
    is the input embedding (shared), else from a float16 copy (the float16 head's values). Many
    rows (where int4's other layers run in bfloat16 on AMX) likewise from bfloat16 weights; on
    CPUs without AMX, float16, as fp16's head."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    model = quantize(tiny_llama(tied=tied), "int4")
    assert isinstance(model.model.layers[0].mlp.down_proj, ByRows if amx else Int4Linear)
    head = model.get_output_embeddings()
    if tied:
        assert head.few.weight is model.get_input_embeddings().weight
    else:
        assert head.few.weight.dtype == torch.float16
    reference = pytorch_quantized(tiny_llama(tied=tied), "fp16").get_output_embeddings()
    exact = tiny_llama(tied=tied).get_output_embeddings()
    x = torch.randn(3, 64) * 4  # spread the logits beyond int4's error
    with torch.inference_mode():
        step_of(FEW_ROWS)
        assert_shortlisted(head(x), (exact if tied else reference)(x), Int4Linear(exact)(x), CANDIDATES)
        step_of(FEW_ROWS + 1)
        if amx:
            assert head.many.weight is head.few.weight  # one copy of the exact weights
            assert_shortlisted(head(x), (exact if tied else reference)(x), BFloat16Linear(exact)(x),
                               CANDIDATES_BFLOAT16)
        else:
            assert isinstance(head.many, PackedLinear) and head.many.fp16
            assert torch.equal(head(x), reference(x))


def assert_shortlisted(got: torch.Tensor, expected: torch.Tensor, rough: torch.Tensor, candidates: int) -> None:
    """`got` has the exact logits where `rough` ranks them highest, the rough ones elsewhere."""
    top = rough.topk(candidates, dim=-1).indices
    assert torch.allclose(got.gather(-1, top), expected.gather(-1, top), rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    outside = torch.ones_like(got, dtype=torch.bool).scatter(-1, top, False)
    assert torch.equal(got[outside], rough[outside]) and not torch.allclose(rough, expected, atol=1e-5)


def test_the_shortlisted_head_adds_its_bias_to_the_logits_it_computes_again():
    torch.manual_seed(0)
    head = nn.Linear(64, 96, bias=True)
    with torch.no_grad():
        head.bias.mul_(10)  # large enough to reorder the logits
    x = torch.randn(2, 64)
    with torch.inference_mode():
        got, expected, rough = ShortlistHead.in_int4(head, head.weight)(x), head(x), Int4Linear(head)(x)
    top = rough.topk(CANDIDATES, dim=-1).indices
    assert torch.allclose(got.gather(-1, top), expected.gather(-1, top), rtol=0, atol=1e-5)


def test_int4_keeps_a_bfloat16_models_lm_head_in_bfloat16():
    model = quantize(tiny_llama().bfloat16(), "int4")
    assert type(model.get_output_embeddings()) is nn.Linear
    with torch.inference_mode():
        assert model(torch.randint(0, 96, (2, 7))).logits.dtype == torch.bfloat16


def test_a_fused_layer_called_on_its_own_input_gives_its_own_answer():
    """Out of the usual order, or each on another input, every part still computes its own layer."""
    reference = pytorch_quantized(tiny_qwen2(), "fp16")
    fused = quantize(tiny_qwen2(), "fp16")
    names = ["v_proj", "q_proj", "v_proj", "k_proj"]
    inputs = [torch.randn(3, 64) for _ in names]
    with torch.inference_mode():
        for name, x in zip(names, inputs):
            got = getattr(fused.model.layers[1].self_attn, name)(x)
            assert torch.equal(got, getattr(reference.model.layers[1].self_attn, name)(x))


AMX = torch.cpu._is_amx_tile_supported()


def bfloat16_products(model: nn.Module) -> nn.Module:
    """`model` whose Linear layers multiply bfloat16-rounded inputs and weights, summing in float32."""
    for linear in [m for m in model.modules() if isinstance(m, nn.Linear)]:
        weight = linear.weight.detach().bfloat16().float()
        linear.forward = lambda x, w=weight: F.linear(x.bfloat16().float(), w)
    return model


def test_bf16_refuses_a_cpu_without_amx_naming_the_format_to_use(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(LoadError, match=r"AMX.*--quantize fp16"):
        quantize(tiny_llama(), "bf16")


def test_bf16_stores_bfloat16_weights_and_keeps_float32_activations(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)  # eager runs on any CPU
    ids = torch.randint(0, 96, (2, 7))
    model = quantize(tiny_llama(), "bf16")
    assert {m.weight.dtype for m in model.modules() if isinstance(m, BFloat16Linear)} == {torch.bfloat16}
    assert not any(isinstance(m, nn.Linear) for m in model.modules())  # the LM head too
    with torch.inference_mode():
        got, exact = model(ids).logits, bfloat16_products(tiny_llama())(ids).logits
    assert got.dtype == torch.float32
    # Eager, PyTorch's bfloat16 product also rounds each output to bfloat16: close, not equal.
    assert torch.allclose(got, exact, atol=0.02 * exact.abs().max().item())


@pytest.mark.skipif(not AMX, reason="bf16 runs only on CPUs with AMX")
def test_bf16_compiled_keeps_a_products_float32_sums():
    """Compiled with inductor_options, a bf16 layer's product runs in Inductor's AMX GEMM template,
    which sums in float32 and, where the output goes on in float32, does not round it to bfloat16
    as PyTorch's eager product does."""
    layer = BFloat16Linear(nn.Linear(576, 960, bias=False))
    x = torch.randn(7, 576)
    exact = F.linear(x.bfloat16().float(), layer.weight.float())
    options = inductor_options(nn.Sequential(layer), many_rows=False)
    with torch.inference_mode(), torch._inductor.config.patch(options):
        compiled = torch.compile(layer)(x)
        eager = layer(x)
    assert (compiled - exact).abs().max() < 1e-5 < 1e-3 < (eager - exact).abs().max()


def test_inductors_amx_template_runs_bfloat16_products_only():
    """bf16's layers always; int4's bfloat16 copies in steps of many rows; int4's kernel never
    (Inductor's AMX template for 4-bit weights unpacks them on every call)."""
    bf16 = nn.Sequential(BFloat16Linear(nn.Linear(64, 16)))
    int4_by_row_count = nn.Sequential(nn.Sequential(int4_by_rows(nn.Linear(64, 16))))
    int4 = nn.Sequential(Int4Linear(nn.Linear(64, 16)))
    template = inductor_options(bf16, many_rows=False)
    assert template["max_autotune"] and template == inductor_options(bf16, many_rows=True)
    assert inductor_options(int4_by_row_count, many_rows=True) == template
    assert inductor_options(int4_by_row_count, many_rows=False) == inductor_options(int4, many_rows=True) == {}


def test_int4_codes_rebuild_weights_already_on_a_4_bit_grid_exactly():
    # What a GGUF Q4_1 block holds: codes 0..15, a float16 scale and minimum per 32 weights.
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (8, 4 * INT4_GROUP))
    codes[:, ::INT4_GROUP] = 0  # each group spans its whole range, as Q4_1's own rounding makes it
    codes[:, 1::INT4_GROUP] = 15
    scales = (torch.rand(8, 4) / 10).half().float()
    minimums = torch.randn(8, 4).half().float()
    weight = dequantized(codes, scales, minimums)
    found = quantize_groups(weight, INT4_GROUP)
    assert torch.equal(found[0], codes.to(torch.int32))
    assert torch.equal(found[1], scales) and torch.equal(found[2], minimums)
    assert torch.equal(dequantized(*found), weight)


KERNELS = [pytest.param(True, id="own", marks=pytest.mark.skipif(kernels.int4_linear() is None,
                                                                 reason="zmqchat's int4 kernel needs AVX-512 VNNI")),
           pytest.param(False, id="int4pack")]


@pytest.mark.parametrize("own_kernel", KERNELS)
@pytest.mark.parametrize("shape", [(1, 128), (3, 128), (2, 5, 128), (4, 3 * 128)])
def test_int4_kernels_compute_what_the_dequantised_weights_do(shape, own_kernel):
    """zmqchat's kernel holds activations to 15 bits and scales to float16: within 1e-3 of the
    float32 product of the same weights; int4pack's bfloat16 arithmetic, within 1e-2."""
    torch.manual_seed(0)
    linear = nn.Linear(shape[-1], 96, bias=True)
    groups = quantize_groups(linear.weight.detach(), INT4_GROUP)
    layer = Int4Linear(linear, groups, own_kernel)
    x = torch.randn(*shape)
    expected = x @ dequantized(*groups).T + linear.bias
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (*shape[:-1], 96) and got.dtype == torch.float32
    error = ((got - expected).norm() / expected.norm()).item()
    assert error < (1e-3 if own_kernel else 1e-2)
    assert layer.own_kernel == own_kernel


@pytest.fixture
def step_of():
    """Runs the test's layers as in a step of `rows` rows (quantize.step_rows), then as before."""
    yield step_rows
    step_rows(0)


@pytest.mark.parametrize("rows", [1, FEW_ROWS, FEW_ROWS + 1, 64])
def test_int4_runs_steps_of_few_rows_through_its_kernel_and_of_many_in_bfloat16(rows, step_of):
    """A step of few rows runs the int4 kernel, one of many the same weights in bfloat16."""
    torch.manual_seed(0)
    linear = nn.Linear(4 * INT4_GROUP, 96, bias=True)
    x = torch.randn(3, 5, 4 * INT4_GROUP)
    dequantised = dequantized(*quantize_groups(linear.weight.detach(), INT4_GROUP))
    by_rows = int4_by_rows(linear)
    assert torch.equal(by_rows.many.weight, dequantised.bfloat16())
    many = step_of(rows)
    assert many == (rows > FEW_ROWS)
    with torch.inference_mode():
        got, kernel = by_rows(x), Int4Linear(linear)(x)
        in_bfloat16 = F.linear(x.bfloat16(), dequantised.bfloat16()).float() + linear.bias
    assert got.shape == (3, 5, 96) and got.dtype == torch.float32
    assert torch.equal(got, in_bfloat16 if many else kernel)


def test_a_layer_the_int4_kernel_cannot_pack_is_left_alone():
    """Its inputs must fill whole groups and its outputs the kernel's blocks of 16: a vocabulary
    of another size (GPT-2's 50,257) keeps its LM head in float16 for every step."""
    assert Int4Linear.fits(nn.Linear(64, 16))
    assert not Int4Linear.fits(nn.Linear(40, 16)) and not Int4Linear.fits(nn.Linear(64, 8))
    model = quantize(tiny_llama(vocab_size=100), "int4")
    head = model.get_output_embeddings()
    assert isinstance(head, PackedLinear) and head.fp16
    with torch.inference_mode():
        assert model(torch.randint(0, 100, (1, 5))).logits.shape == (1, 5, 100)


@pytest.fixture(scope="module")
def float32_answers() -> dict[str, str]:
    return greedy_answers(models.load(device="cpu"))


def greedy_answers(loaded) -> dict[str, str]:
    engine = Engine(HFRunner(loaded), slots=len(QUESTIONS))
    for question in QUESTIONS:
        submit(engine, job(question, question, temperature=0, max_tokens=24))
    return {question: result["text"] for question, result in run_to_end(engine).items()}


QUESTIONS = ["What is the capital of France?", "Explain in two sentences why the sky is blue.",
             "Write a haiku about the sea."]


@pytest.mark.model
def test_int4_keeps_the_default_models_greedy_answers(float32_answers):
    """The default model's file is 4-bit already: int4 keeps its grid, so only the bfloat16
    arithmetic of the kernel differs, and the answers start the same (the README gives the
    agreement over 64 tokens of 16 prompts)."""
    answers = greedy_answers(models.load(device="cpu", quantize="int4"))
    for question, answer in answers.items():
        assert answer[:40] == float32_answers[question][:40]


@pytest.mark.model
def test_fp16_the_default_keeps_the_default_models_greedy_answers(float32_answers):
    assert greedy_answers(models.load(device="cpu", quantize="auto")) == float32_answers


@pytest.mark.model
def test_int8_computes_pytorchs_dynamic_int8_on_the_default_model():
    """int8 quantises activations too, per tensor, and this tiny model's greedy answers drift from
    float32's within a few tokens, on any change of rounding (README: the agreement figures). So
    what is held is the arithmetic: on the default model's own shapes, the logits are those of
    PyTorch's own dynamic int8 layers, with the fused sibling layers."""
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = pytorch_quantized(models.load(device="cpu").model, "int8")
    ours = models.load(device="cpu", quantize="int8").model
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, reference(ids).logits)


@pytest.mark.model
def test_a_worker_started_with_quantize_serves_and_reports_its_format(cluster):
    cluster.broker()
    cluster.worker("--quantize", "int4", "--device", "cpu", fake=False)
    cluster.api()
    assert cluster.status()["workers"][0]["device"] == "cpu float32 int4"
    client = OpenAI(base_url=f"{cluster.url}/v1", api_key="unused")
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, temperature=0, max_tokens=12,
                                           messages=[{"role": "user", "content": QUESTIONS[0]}])
    assert "Paris" in reply.choices[0].message.content
