"""Quantized CPU weights (models/kernels/quant.py, csrc/quant_gemm.h): each kernel at each
instruction-set level this CPU runs against a float64 reference of the dequantized math; the
formats' bytes; quantize-at-load keeping only the quantized weights; batch invariance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import load_model
from models.kernels import cpu_ops
from models.kernels import quant as Q
from models.kernels.plan import LinearLayout, MoEKernel
from tests.conftest import BUNDLED, skip_or_fail
from tests.models.conftest import make_checkpoint
from tests.models.kernels.conftest import rel_err, torch_threads
from tests.models.simple_runner import greedy_generate, prefill_logits

FORMATS = list(Q.FORMATS)


def needs_kernels():
    if cpu_ops.load() is None:
        skip_or_fail("the C kernels are not built here (no C compiler or no AVX2 + FMA)")


def levels_here() -> list[str]:
    """The levels this CPU runs, by the features the kernels' dispatch checks (csrc/linear_quant_cpu.c):
    the tests force each of them (the code of every level is compiled into every build; a level the
    CPU lacks cannot run here and is not collected)."""
    from models.kernels.cpu_build import cpu_flags

    flags = cpu_flags()
    levels = ["avx2"]
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        levels.append("avx512")
        if "avx512_vnni" in flags:
            levels.append("avx512vnni")
    return levels


@pytest.fixture(params=levels_here())
def isa(request):
    """Each level this CPU runs, forced; the best level is restored afterwards."""
    needs_kernels()
    best = Q.isa()[1]
    assert Q.ISA_LEVELS[request.param] <= Q.ISA_LEVELS[best], (
        f"/proc/cpuinfo lists {request.param}'s features but the kernels' dispatch runs at most {best}")
    Q.set_isa(request.param)
    yield request.param
    Q.set_isa(None)


def reference_linear(x, qw: Q.QuantWeight, bias=None):
    """float64: the kernels' int8 activations times the dequantized weights."""
    y = Q.quantize_activations(x).double() @ qw.dequantize().double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_matches_dequantized_math(isa, fmt):
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(48, 96, generator=g), torch.randn(48, generator=g)
    qw = Q.QuantWeight.of(w, fmt)
    for rows in (1, 7):  # odd M: a partial 4-row tile
        x = torch.randn(rows, 96, generator=g)
        assert rel_err(Q.quant_linear(x, qw, b), reference_linear(x, qw, b)) < 1e-5
    assert Q.quant_linear(torch.randn(0, 96), qw).shape == (0, 48)
    # a last chunk of one 8-row group
    qw40 = Q.QuantWeight.of(torch.randn(40, 64, generator=g), fmt)
    x = torch.randn(5, 64, generator=g)
    assert rel_err(Q.quant_linear(x, qw40), reference_linear(x, qw40)) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_tiles_and_batch_rows(isa, fmt):
    """Every tiling path: M = 1, 7, 33, 300 (partial 4-row tiles, several 64-row passes), N = 40
    (two 16-row chunks, then a chunk of one 8-row group), K = 352 (11 blocks: a block count that
    is not a multiple of anything the kernel steps by); and each row's output is the same bits
    whatever rows share its call (batch invariance at the kernel)."""
    g = torch.Generator().manual_seed(11)
    qw = Q.QuantWeight.of(torch.randn(40, 352, generator=g) * 0.2, fmt)
    b = torch.randn(40, generator=g)
    x = torch.randn(300, 352, generator=g) * torch.rand(300, 1, generator=g) * 4  # rows of different scales
    full = Q.quant_linear(x, qw, b)
    assert rel_err(full, reference_linear(x, qw, b)) < 1e-5
    for rows in (1, 7, 33):
        part = Q.quant_linear(x[-rows:], qw, b)
        assert torch.equal(part, full[-rows:]), rows
        assert rel_err(part, reference_linear(x[-rows:], qw, b)) < 1e-5


def reference_experts(x, ids, tw, w13: Q.QuantWeight, w2: Q.QuantWeight):
    """float64 experts over the dequantized weights and the kernels' int8 activations."""
    A, B = w13.dequantize().double(), w2.dequantize().double()
    xq = Q.quantize_activations(x).double()
    I = B.shape[-1]
    h = torch.einsum("tkoh,th->tko", A[ids], xq)  # [T, k, 2I]
    act = F.silu(h[..., :I]) * h[..., I:]
    act = Q.quantize_activations(act.reshape(-1, I).float()).double().reshape(act.shape)
    return (tw.double()[..., None] * torch.einsum("tkhi,tki->tkh", B[ids], act)).sum(1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_experts_match_dequantized_math(isa, fmt):
    g = torch.Generator().manual_seed(5)
    E, H, I, T, k = 4, 64, 96, 7, 2
    w13, w2 = Q.QuantWeight.of(torch.randn(E, 2 * I, H, generator=g) * 0.1, fmt), Q.QuantWeight.of(
        torch.randn(E, H, I, generator=g) * 0.1, fmt)
    x, ids, tw = torch.randn(T, H, generator=g), torch.randint(0, E, (T, k), generator=g), torch.rand(T, k, generator=g)
    out = Q.quant_moe(x, ids, tw, w13, w2)
    assert rel_err(out, reference_experts(x, ids, tw, w13, w2)) < 1e-5
    # prefill-sized: ~75 tokens per expert (several 4-row tiles per expert and panel), and each
    # token's output the same bits as when it runs alone
    xp, idp = torch.randn(150, H, generator=g), torch.randint(0, E, (150, k), generator=g)
    twp = torch.rand(150, k, generator=g)
    outp = Q.quant_moe(xp, idp, twp, w13, w2)
    assert rel_err(outp, reference_experts(xp, idp, twp, w13, w2)) < 1e-5
    assert torch.equal(Q.quant_moe(xp[:3], idp[:3], twp[:3], w13, w2), outp[:3])
    with pytest.raises(IndexError, match="out of range"):
        Q.quant_moe(x, torch.full((T, k), E), tw, w13, w2)


@pytest.mark.parametrize("fmt", [*FORMATS, Q.BF16, "float32"])
def test_decode_sized_calls_of_large_experts_thread_with_the_same_bits(fmt):
    """Two tokens on experts of 1024 x 2048 (4 pairs, 25M multiply-adds): above the threading
    threshold in work (csrc/ops.cpp moe_threads), so the call runs on both threads, and each
    output element is still computed whole by one thread: the same bits as on one thread."""
    needs_kernels()
    g = torch.Generator().manual_seed(11)
    E, H, I, T, k = 2, 1024, 2048, 2, 2
    w13f, w2f = torch.randn(E, 2 * I, H, generator=g) * 0.03, torch.randn(E, H, I, generator=g) * 0.03
    x, tw = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
    ids = torch.tensor([[0, 1], [1, 0]])
    if fmt == "float32":
        p13, p2 = torch.ops.moe_serve.moe_pack_cpu(w13f, w2f)
        def run():
            return torch.ops.moe_serve.moe_experts_cpu(x, ids, tw, p13, p2)
    else:
        w13, w2 = Q.QuantWeight.of(w13f, fmt), Q.QuantWeight.of(w2f, fmt)
        def run():
            return Q.quant_moe(x, ids, tw, w13, w2)
    with torch_threads(1):
        one = run()
    with torch_threads(2):
        two = run()
    assert torch.equal(one, two)
    if fmt in ("float32", Q.BF16):  # float32 math on the float32 / bf16-rounded weights
        a, b = (w.bfloat16().double() if fmt == Q.BF16 else w.double() for w in (w13f, w2f))
        # the bf16 kernel's avx512bf16 level rounds the activations to bf16 (x, then silu(g) * u)
        bf = (lambda v: v.float().bfloat16().double()) if fmt == Q.BF16 and Q.bf16_isa()[0] == "avx512bf16" \
            else (lambda v: v)
        ref = (tw.double()[..., None] * torch.stack([torch.stack([
            b[e] @ bf(F.silu(a[e, :I] @ bf(x[t].double())) * (a[e, I:] @ bf(x[t].double()))) for e in ids[t].tolist()])
            for t in range(T)])).sum(1)
    else:
        ref = reference_experts(x, ids, tw, w13, w2)
    assert rel_err(two, ref) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_formats_bytes_and_rounding(fmt):
    w = torch.randn(3, 32, 64)
    qw = Q.QuantWeight.of(w, fmt)
    assert qw.nbytes == round(w.numel() * Q.bytes_per_weight(fmt, 64))
    err = rel_err(qw.dequantize(), w)
    assert err < (0.01 if fmt.startswith("int8") else 0.12), err  # round to nearest: int8 ~0.5%, int4 ~8%
    # a row written on its own quantizes as in the whole tensor (the loader streams slices)
    part = Q.QuantWeight.empty(tuple(w.shape), fmt)
    for e in range(3):
        part.write((e, slice(0, 16)), w[e, :16])
        part.write((e, slice(16, 32)), w[e, 16:])
    assert torch.equal(part.q, qw.q) and torch.equal(part.scales, qw.scales)
    with pytest.raises(Q.QuantError, match="multiple of 32"):
        Q.quantize(torch.randn(4, 40), fmt)
    # stored in the kernel order; `rows` gives quantize's row-major form back
    for got, want in zip(qw.rows(), Q.quantize(w, fmt)):
        assert (got is None and want is None) or torch.equal(got, want)
    with pytest.raises(Q.QuantError, match="groups of 8 rows"):
        part.write((0, slice(4, 12)), w[0, 4:12])
    with pytest.raises(Q.QuantError, match="multiple of 8"):
        Q.QuantWeight.of(torch.randn(12, 64), fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_order_is_the_documented_layout(fmt):
    """csrc/quant_gemm.h: per group of 8 rows and block, the 8 rows' 4 values of each k-group of
    4 side by side (int4: k-groups g and g + 4 in one byte's low and high nibbles); the block's 8
    scales side by side."""
    g = torch.Generator().manual_seed(3)
    N, K = 16, 64
    q, d, m = Q.quantize(torch.randn(N, K, generator=g), fmt)
    kq, kd, km = Q.to_kernel_order(q, d, m, fmt)
    vals = Q.dequantize(q, torch.ones_like(d), None if m is None else torch.zeros_like(m), fmt)  # q's values
    if fmt.startswith("int4"):
        vals = vals + 8 if fmt == "int4" else vals
    vals = vals.round().to(torch.int64)
    stride = 256 if fmt.startswith("int8") else 128  # bytes of a block of a group
    for G in range(N // 8):
        for b in range(K // 32):
            blk = kq[8 * G:8 * G + 8].reshape(-1)[b * stride:(b + 1) * stride].to(torch.int64)
            for c in range(8):
                for j in range(4):
                    if fmt.startswith("int8"):
                        for kg in range(8):
                            assert (blk[32 * kg + 4 * c + j].item() - vals[8 * G + c, 32 * b + 4 * kg + j].item()) % 256 == 0
                    else:
                        for kg in range(4):
                            byte = blk[32 * kg + 4 * c + j].item()
                            assert byte & 15 == vals[8 * G + c, 32 * b + 4 * kg + j]
                            assert byte >> 4 == vals[8 * G + c, 32 * b + 4 * (kg + 4) + j]
            if fmt != "int8_channel":
                assert torch.equal(kd[8 * G:8 * G + 8].reshape(-1)[8 * b:8 * b + 8], d[8 * G:8 * G + 8, b])
    assert all(torch.equal(a, b) for a, b in zip(Q.from_kernel_order(kq, kd, km, fmt)[:2], (q, d)))


def test_isa_override_and_bad_shapes(monkeypatch):
    needs_kernels()
    best = Q.isa()[1]
    try:
        monkeypatch.setenv(Q.ISA_ENV, "avx2")
        assert Q.select_isa() == "avx2" and Q.isa()[0] == "avx2"
        monkeypatch.setenv(Q.ISA_ENV, "sse2")
        with pytest.raises(Q.QuantError, match="one of auto, avx2"):
            Q.select_isa()
        if best != "avx512vnni":
            with pytest.raises(Q.QuantError, match=f"at most {best}"):
                Q.set_isa("avx512vnni")
    finally:
        Q.set_isa(None)
    assert Q.isa()[0] == best
    qw = Q.QuantWeight.of(torch.randn(16, 64), "int4")
    with pytest.raises(RuntimeError, match="x must be"):
        Q.quant_linear(torch.randn(2, 32), qw)


def test_quantized_load_keeps_only_the_quantized_weights(tmp_path):
    """A model with shared experts: q/k/v, o, experts, shared experts and LM head exist only
    quantized (their parameters are shapes on the meta device), in exactly the format's bytes."""
    needs_kernels()
    make_checkpoint("qwen2_moe", tmp_path, moe_intermediate_size=64, shared_expert_intermediate_size=96)
    ref = load_model(str(tmp_path), dtype="float32", progress=False)
    model = load_model(str(tmp_path), progress=False, quantization="int8")
    plan = model.kernel_plan
    names = set(model.quantized)
    assert {"lm_head.weight", "layers.0.attn.qkv.weight", "layers.0.moe.w13", "layers.0.moe.w2",
            "layers.0.moe.shared.w13.weight", "layers.2.attn.o_proj.weight"} <= names
    params = dict(model.named_parameters())
    assert all(params[n].is_meta for n in names)
    assert not any(p.is_meta for n, p in params.items() if n not in names)
    assert sum(q.nbytes for q in model.quantized.values()) == plan.quantized_bytes > 0
    for n in names:
        assert model.quantized[n].nbytes == round(params[n].numel() * Q.bytes_per_weight("int8", params[n].shape[-1]))
    assert plan.lm_head == LinearLayout.QUANTIZED and plan.layers[0].moe == MoEKernel.CPU
    assert plan.layers[0].moe_large is None and plan.packed_bytes == 0
    assert plan.to_dict()["quantization"] == "int8" and "int8" in plan.table()
    prompts = [[3, 17, 40, 99, 5], [7, 8]]
    for a, b in zip(prefill_logits(model, prompts), prefill_logits(ref, prompts)):
        assert rel_err(a, b) < 0.05  # random weights, 64 wide: int8 weights and activations, 3 layers


def test_int4_keeps_the_lm_head_in_int8():
    """--quantization int4 is llama-quantize Q4_0's mix: the LM head in int8 (Q4_0 keeps it in
    Q6_K), everything else 4 bits; the plan counts the real bytes and says so."""
    needs_kernels()
    model = load_model(str(BUNDLED), progress=False, quantization="int4")
    fmts = {n: q.fmt for n, q in model.quantized.items()}
    assert fmts.pop("lm_head.weight") == "int8" and set(fmts.values()) == {"int4"}
    assert {"layers.0.attn.qkv.weight", "layers.0.moe.w13"} <= set(fmts)
    plan = model.kernel_plan
    assert plan.quantized_bytes == sum(q.nbytes for q in model.quantized.values())
    assert plan.to_dict()["quantization"] == "int4" and "int8: lm_head.weight" in plan.table()


def test_quantized_bundled_model_is_batch_invariant():
    """Greedy tokens of a prompt do not depend on the prompts batched with it (int4; the random
    model above runs int8)."""
    needs_kernels()
    model = load_model(str(BUNDLED), progress=False, quantization="int4")
    prompts = [[0, 450, 1601, 1153, 906], [0, 5], [0, 77, 78, 79, 80, 81, 82]]
    alone = [greedy_generate(model, [p], 6)[0] for p in prompts]
    assert greedy_generate(model, prompts, 6) == alone


def test_quantization_refused_where_it_cannot_serve():
    needs_kernels()
    from models.kernels.plan import KernelPlanError
    from models.kernels.flags import KernelFlags

    with pytest.raises(KernelPlanError, match="compute in float32"):
        load_model(str(BUNDLED), dtype="bfloat16", progress=False, quantization="int8")
    with pytest.raises(KernelPlanError, match="C experts kernel"):
        load_model(str(BUNDLED), progress=False, quantization="int4", kernels=KernelFlags(moe="loop"))
