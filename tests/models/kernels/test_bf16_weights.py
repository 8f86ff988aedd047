"""bf16 weights with float32 math on the CPU (csrc/linear_bf16_cpu.c, moe_bf16_cpu.c;
models/kernels/quant.py's "bf16" format): the linear kernel at each instruction-set level this
CPU runs against a float64 reference of the bf16 weights' math; the panel layout the loader writes
into; `--dtype auto` on the bundled bf16 checkpoint keeping its weights in bf16 only, with the
float32 engine's logits and greedy tokens, batch invariant; the dtype rule."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from models import load_model
from models.build import cpu_bf16_weights
from models.kernels import quant as Q
from models.kernels.flags import KernelFlags
from models.kernels.plan import LinearLayout, MoEKernel
from tests.conftest import BUNDLED
from tests.models.conftest import make_checkpoint
from tests.models.kernels.conftest import rel_err
from tests.models.kernels.test_quant import needs_kernels
from tests.models.simple_runner import greedy_generate, prefill_logits


def bf16_levels_here() -> list[str]:
    """The bf16 kernel's levels this CPU runs, by the features its dispatch checks: each is forced
    (a level the CPU lacks is compiled in but cannot run here, and is not collected)."""
    from models.kernels.cpu_build import cpu_flags

    flags = cpu_flags()
    levels = ["avx2"]
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        levels.append("avx512")
        if "avx512_bf16" in flags:
            levels.append("avx512bf16")
    return levels


@pytest.fixture(params=bf16_levels_here())
def level(request):
    needs_kernels()
    best = Q.bf16_isa()[1]
    assert Q.ISA_LEVELS[request.param] <= Q.ISA_LEVELS[best], (
        f"/proc/cpuinfo lists {request.param}'s features but the bf16 kernel's dispatch runs at most {best}")
    Q.set_isa(request.param)
    assert Q.bf16_isa()[0] == request.param
    yield request.param
    Q.set_isa(None)


def reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, level: str):
    """float64 of the kernel's operands: the bf16 weights, and the activations (rounded to bf16 at
    the avx512bf16 level, which multiplies bf16 pairs); with the float32 rounding bound of a sum
    of K products, |y - ref| <= 2 K 2^-24 sum_k |x_k w_k|."""
    xs = x.bfloat16().double() if level == "avx512bf16" else x.double()
    y = xs @ w.double().T
    bound = 2 * x.shape[1] * 2.0**-24 * (xs.abs() @ w.double().abs().T) + 1e-30
    return (y if bias is None else y + bias.double()), bound


# K tails: odd, not a multiple of 8 or 16; 13 and 7 panels: the AVX-512 levels' groups of 8, 4 and 2
# panels (1, 2 and more rows) and the panels left over
@pytest.mark.parametrize("N,K", [(48, 64), (16, 71), (80, 9), (208, 40), (112, 33)])
def test_bf16_linear_matches_float64_reference(level, N, K):
    g = torch.Generator().manual_seed(N + K)
    w = torch.randn(N, K, generator=g).bfloat16()
    b = torch.randn(N, generator=g)
    qw = Q.QuantWeight.of(w, Q.BF16)
    assert torch.equal(qw.dequantize(), w.float()) and qw.nbytes == 2 * N * (K + K % 2)
    x = torch.randn(33, K, generator=g)
    alone = Q.quant_linear(x[:1], qw, b)
    for M in (1, 2, 3, 7, 33):  # 7 and 33: partial 6-row tiles
        y = Q.quant_linear(x[:M], qw, b if M != 7 else None)
        ref, bound = reference(x[:M], w, b if M != 7 else None, level)
        assert ((y.double() - ref).abs() <= bound).all(), (M, (y.double() - ref).abs().max())
        if M != 7:  # a row's result does not depend on the rows batched with it
            assert torch.equal(y[:1], alone)
    assert Q.quant_linear(torch.randn(0, K), qw).shape == (0, N)


@pytest.mark.parametrize("H,inter", [(64, 48), (48, 80)])  # a 16-weight tail of the 32-weight steps in H, then I
def test_bf16_experts_match_float64_reference(level, H, inter):
    """The experts kernel (csrc/moe_bf16_cpu.c) at each level over the bf16 holders' row-major
    stacks; at avx512bf16 the reference rounds the activations (x, then silu(g) * u) to bf16 as the
    kernel does: a reference without that rounding is 100x further off (checked)."""
    g = torch.Generator().manual_seed(5)
    E, T, k = 4, 7, 2
    w13 = Q.QuantWeight.of(torch.randn(E, 2 * inter, H, generator=g) * 0.1, Q.BF16)
    w2 = Q.QuantWeight.of(torch.randn(E, H, inter, generator=g) * 0.1, Q.BF16)
    assert w13.q.dtype == torch.bfloat16 and w13.q.shape == (E, 2 * inter, H)
    x = torch.randn(T, H, generator=g)
    ids = torch.randint(0, E, (T, k), generator=g)
    tw = torch.rand(T, k, generator=g)
    out = Q.quant_moe(x, ids, tw, w13, w2)
    a, c = w13.dequantize().double(), w2.dequantize().double()

    def reference(rounded: bool) -> torch.Tensor:
        bf = (lambda v: v.float().bfloat16().double()) if rounded else (lambda v: v)
        ref = torch.zeros(T, H, dtype=torch.float64)
        for t in range(T):
            for s in range(k):
                e = int(ids[t, s])
                gu = a[e] @ bf(x[t].double())
                act = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
                ref[t] += tw[t, s].double() * (c[e] @ bf(act))
        return ref

    assert rel_err(out, reference(level == "avx512bf16")) < 1e-5
    if level == "avx512bf16":
        assert rel_err(out, reference(False)) > 1e-3
    alone = Q.quant_moe(x[:1], ids[:1], tw[:1], w13, w2)  # batch invariant: token 0 alone, then with 6 more
    assert torch.equal(out[:1], alone)


def test_panels_written_in_row_slices_equal_the_whole():
    """The loader writes a fused weight's pieces (q, k, v rows) one at a time into the panels."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 37, generator=g)
    qw = Q.QuantWeight.empty((64, 37), Q.BF16)
    qw.write((slice(0, 40),), w[:40])
    qw.write((slice(40, 56),), w[40:56])
    for r in range(56, 64):
        qw.write((r,), w[r])
    assert torch.equal(qw.q, Q.bf16_panels(w)) and torch.equal(Q.bf16_unpanel(qw.q, 37), w.bfloat16())
    with pytest.raises(Q.QuantError, match="multiple of 16"):
        Q.QuantWeight.empty((40, 64), Q.BF16)


def test_isa_levels_of_the_bf16_kernel():
    needs_kernels()
    best = Q.bf16_isa()[1]
    try:
        assert Q.set_isa("avx2") == "avx2" and Q.bf16_isa()[0] == "avx2" and Q.isa()[0] == "avx2"
        if best != "avx512bf16":
            with pytest.raises(Q.QuantError, match="at most"):
                Q.set_isa("avx512bf16")
    finally:
        Q.set_isa(None)
    assert Q.bf16_isa()[0] == best


@pytest.fixture(scope="module")
def bundled():
    """The bundled checkpoint (bf16) loaded with --dtype auto, and with float32 weights (--dtype auto
    without bf16 weights, as for expert placement: what --dtype float32 loads)."""
    needs_kernels()
    return load_model(str(BUNDLED), progress=False), load_model(str(BUNDLED), progress=False, bf16_weights=False)


def test_auto_dtype_keeps_a_bf16_checkpoint_in_bf16(bundled):
    model, ref = bundled
    plan = model.kernel_plan
    cfg = model.config
    names = set(model.quantized)
    expected = {"lm_head.weight"} | {f"layers.{i}.{n}" for i in range(cfg.num_layers)
                                     for n in ("attn.qkv.weight", "attn.o_proj.weight", "moe.w13", "moe.w2")}
    assert names == expected and all(q.fmt == Q.BF16 and q.q.dtype == torch.bfloat16 for q in model.quantized.values())
    params = dict(model.named_parameters())
    assert all(params[n].is_meta for n in names)  # no float32 copy of them exists
    assert not any(p.is_meta for n, p in params.items() if n not in names)
    assert model.embed.weight.dtype == torch.float32  # compute dtype: embeddings and norms as with float32
    counted, counted_ref = model.weight_bytes(), ref.weight_bytes()
    assert counted["experts_linears"] == counted["quantized"] == 2 * sum(params[n].numel() for n in names)
    assert 2 * counted["experts_linears"] == counted_ref["experts_linears"]
    assert plan.quantization == "bf16" and plan.dtype == "float32" and plan.quantized_bytes == counted["quantized"]
    assert plan.lm_head == LinearLayout.QUANTIZED and plan.packed_bytes == 0
    assert all(lk.qkv == LinearLayout.QUANTIZED and lk.moe == MoEKernel.CPU and lk.moe_large is None
               for lk in plan.layers)
    assert "weights: bf16 (fp32 math)" in plan.table() and plan.to_dict()["weights"] == "bf16 (fp32 math)"
    assert ref.kernel_plan.to_dict()["weights"] == "float32" and not ref.quantized
    assert ref.embed.weight.dtype == torch.float32 and ref.kernel_plan.quantization is None
    # the checkpoint's own bf16 values, as stored
    with safe_open(str(BUNDLED / "model.safetensors"), "pt") as f:
        head = f.get_tensor("lm_head.weight")
        down = f.get_tensor("model.layers.1.block_sparse_moe.experts.3.w2.weight")
    assert head.dtype == torch.bfloat16
    assert torch.equal(Q.bf16_unpanel(model.quantized["lm_head.weight"].q, cfg.hidden_size), head)
    assert torch.equal(model.quantized["layers.1.moe.w2"].q[3], down)


def engine_tolerance(level: str) -> float:
    """Logits of the bf16-weights engine against the float32 engine on the same weights: float32
    sums in another order (1e-5), except at the avx512bf16 level, whose linears multiply activations
    rounded to bf16 (8 bits of mantissa: a rounding of up to 2^-9 per activation, compounded over
    the layers of a random-weight model: 2.4e-3 to 4.0e-3 seen on the test models)."""
    return 1e-2 if level == "avx512bf16" else 1e-5


def test_bf16_weights_match_the_float32_engine(bundled, level):
    model, ref = bundled
    prompts = [[0, 450, 1601, 1153, 906], [0, 5], [0, 77, 78, 79, 80, 81, 82]]
    for a, b in zip(prefill_logits(model, prompts), prefill_logits(ref, prompts)):
        assert rel_err(a, b) < engine_tolerance(level)
    alone = [greedy_generate(model, [p], 8)[0] for p in prompts]
    assert alone == [greedy_generate(ref, [p], 8)[0] for p in prompts]
    assert greedy_generate(model, prompts, 8) == alone  # batch invariant


def test_the_dtype_rule():
    needs_kernels()
    cpu = torch.device("cpu")
    assert cpu_bf16_weights("auto", "bfloat16", cpu, None)
    assert not cpu_bf16_weights("auto", "float16", cpu, None)  # bf16 would round fp16's mantissas
    assert not cpu_bf16_weights("auto", "float32", cpu, None)
    assert not cpu_bf16_weights("float32", "bfloat16", cpu, None)
    assert not cpu_bf16_weights("auto", "bfloat16", cpu, KernelFlags(moe="loop"))
    assert not cpu_bf16_weights("auto", "bfloat16", cpu, KernelFlags(cpu_kernels="off"))
    model = load_model(str(BUNDLED), dtype="bfloat16", progress=False)  # bf16 compute, as asked
    assert not model.quantized and model.embed.weight.dtype == torch.bfloat16
    assert model.kernel_plan.quantization is None


def test_shared_experts_and_dense_layers_stay_bf16(tmp_path, level):
    """A bf16 qwen2_moe with shared experts, q/k/v biases and a dense layer: shared experts and the
    dense MLP are held in bf16 too, in the plan's bytes, with the float32 engine's logits."""
    needs_kernels()
    make_checkpoint("qwen2_moe", tmp_path, dtype=torch.bfloat16, moe_intermediate_size=64,
                    shared_expert_intermediate_size=96, mlp_only_layers=[1])
    model = load_model(str(tmp_path), progress=False)
    ref = load_model(str(tmp_path), dtype="float32", progress=False)
    Q.set_isa(level)  # load_model set the level MOE_SERVE_CPU_ISA asks for (the best by default)
    plan = model.kernel_plan
    assert {"layers.0.moe.shared.w13.weight", "layers.0.moe.shared.w2.weight", "layers.1.mlp.w13.weight",
            "layers.1.mlp.w2.weight", "layers.1.attn.qkv.weight", "layers.0.moe.w13"} <= set(model.quantized)
    assert plan.layers[1].mlp == LinearLayout.QUANTIZED and plan.layers[0].shared == LinearLayout.QUANTIZED
    assert "dense MLP (bf16 (fp32 math))" in plan.table()
    assert sum(q.nbytes for q in model.quantized.values()) == plan.quantized_bytes > 0
    prompts = [[3, 17, 40, 99, 5], [7, 8]]
    for a, b in zip(prefill_logits(model, prompts), prefill_logits(ref, prompts)):
        assert rel_err(a, b) < engine_tolerance(level)
