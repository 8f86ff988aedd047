"""The fp8 KV cache (`--kv-cache-dtype fp8`): writes quantize with per-tensor scales and saturate,
every reader dequantizes; the C and Triton decode kernels over a float8_e4m3fn cache against a
float64 reference of the attention over the dequantized cache."""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from models.kernels import cpu_ops
from models.kernels.paged_attention import paged_decode
from models.kernels.triton_attention import _e4m3fn_to_f32
from models.layers.attention_variants import AttentionVariant, decode_variant, prefill_variant
from models.layers.paged import FP8_KV_DTYPE, dequantize_fp8, gather_kv, quantize_fp8, write_kv
from tests.models.kernels.conftest import DEVICES, rel_err, torch_threads
from tests.models.kernels.test_paged_attention import make_case

K_SCALE, V_SCALE = 0.05, 0.5  # not 1.0: a kernel that ignored or swapped a scale would fail


def fp8_case(case, device="cpu", q_dtype=torch.float32):
    """q and an fp8 cache holding make_case's K/V quantized with K_SCALE / V_SCALE; also the
    float64 dequantized cache the reference reads."""
    q, k, v, tables, lens = make_case(*case, device=device)
    k = k * 3  # some keys past 448 * K_SCALE = 22.4 saturate
    k8, v8 = quantize_fp8(k, K_SCALE), quantize_fp8(v, V_SCALE)
    kd, vd = k8.double() * K_SCALE, v8.double() * V_SCALE
    return q.to(q_dtype), k8, v8, kd, vd, tables, lens


def exact(q, kd, vd, tables, lens, scale, window=0, chunk=0, sinks=None):
    """float64 attention over the dequantized cache (the variants' reference path, in float64)."""
    spec = AttentionVariant(window or None, chunk or None, sinks is not None)
    return decode_variant(q.double(), (kd, vd), tables, lens, scale, spec, None if sinks is None else sinks.double())


CASES = [  # B, heads, kv heads, head dim, block size, longest context
    (1, 8, 2, 32, 16, 70),  # one sequence: work split per KV head
    (9, 8, 4, 64, 16, 100),  # many sequences: whole sequences per work item
    (5, 4, 1, 24, 8, 41),  # multi-query, head dim not a power of two
]
VARIANTS = [(0, 0, False), (12, 0, True), (0, 16, False)]  # window, chunk, sinks
VIDS = ["plain", "window-sinks", "chunk"]


def test_quantize_saturates_and_round_trips():
    x = torch.tensor([0.0, 1.0, -2.5, 1000.0, -1e9, 0.0625, 3.3])
    x8 = quantize_fp8(x, 0.5)
    assert x8.dtype == FP8_KV_DTYPE
    back = dequantize_fp8(x8, 0.5, torch.float32)
    assert back[:3].tolist() == [0.0, 1.0, -2.5]  # representable: exact
    assert back[3].item() == 448 * 0.5 and back[4].item() == -448 * 0.5  # saturated, not NaN
    assert abs(back[6].item() - 3.3) <= 3.3 * 2**-4  # 3 mantissa bits: within half an ulp
    # write_kv / gather_kv through a paged fp8 cache (scattered slots)
    k, v = torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    cache = (torch.zeros(4, 4, 2, 8, dtype=FP8_KV_DTYPE), torch.zeros(4, 4, 2, 8, dtype=FP8_KV_DTYPE))
    table = torch.tensor([2, 0])
    write_kv(cache, k, v, (table[torch.arange(7) // 4] * 4 + torch.arange(7) % 4), (K_SCALE, V_SCALE))
    kg, vg = gather_kv(cache, table, 7, (K_SCALE, V_SCALE), torch.float32)
    assert kg.dtype == torch.float32
    assert torch.equal(kg, dequantize_fp8(quantize_fp8(k, K_SCALE), K_SCALE, torch.float32))
    assert torch.equal(vg, dequantize_fp8(quantize_fp8(v, V_SCALE), V_SCALE, torch.float32))


@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}" for c in CASES])
def test_cpu_kernel_fp8_matches_float64(case, variant):
    assert cpu_ops.load() is not None, "the C kernel must build here (a C compiler is a test requirement)"
    window, chunk, with_sinks = variant
    q, k8, v8, kd, vd, tables, lens = fp8_case(case)
    sinks = torch.randn(case[1]) if with_sinks else None
    scale = 1 / math.sqrt(case[3])
    ref = exact(q, kd, vd, tables, lens, scale, window, chunk, sinks)
    for threads in (1, 2):
        with torch_threads(threads):
            out = paged_decode(q, k8, v8, tables, lens, scale, "cpu", window, chunk, sinks, K_SCALE, V_SCALE)
        assert out.dtype == torch.float32
        assert rel_err(out, ref) < 1e-5, threads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
def test_triton_kernel_fp8_matches_float64(variant, device):
    """Under TRITON_INTERPRET=1 on CPU tensors (the interpreter loads float8_e4m3fn), compiled on CUDA."""
    window, chunk, with_sinks = variant
    case = CASES[2]  # small: the interpreter runs each program in Python
    q, k8, v8, kd, vd, tables, lens = fp8_case(case, device=device)
    sinks = torch.randn(case[1], device=device) if with_sinks else None
    scale = 1 / math.sqrt(case[3])
    out = paged_decode(q, k8, v8, tables, lens, scale, "triton", window, chunk, sinks, K_SCALE, V_SCALE)
    assert rel_err(out, exact(q, kd, vd, tables, lens, scale, window, chunk, sinks)) < 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_triton_kernel_fp8_bf16_queries_cuda():
    """The model-dtype case on a GPU: bf16 queries over the fp8 cache, error within the bf16 path's own."""
    q, k8, v8, kd, vd, tables, lens = fp8_case((16, 32, 8, 128, 16, 400), device="cuda", q_dtype=torch.bfloat16)
    ref = exact(q, kd, vd, tables, lens, 0.088)
    bf = paged_decode(q, kd.bfloat16(), vd.bfloat16(), tables, lens, 0.088, "triton")
    out = paged_decode(q, k8, v8, tables, lens, 0.088, "triton", k_scale=K_SCALE, v_scale=V_SCALE)
    assert rel_err(out, ref) <= max(2 * rel_err(bf, ref), 1e-2)


def test_reference_paths_read_fp8():
    """The PyTorch decode reference (bf16 on the CPU takes it), the variants' decode and the
    prefill over cached blocks: each reads the fp8 cache as its dequantized values."""
    case = CASES[1]
    q, k8, v8, kd, vd, tables, lens = fp8_case(case)
    scale = 1 / math.sqrt(case[3])
    ref = exact(q, kd, vd, tables, lens, scale)
    assert rel_err(paged_decode(q, k8, v8, tables, lens, scale, "reference", k_scale=K_SCALE, v_scale=V_SCALE),
                   ref) < 1e-5
    spec = AttentionVariant(12, None, True)
    sinks = torch.randn(case[1])
    out = decode_variant(q, (k8, v8), tables, lens, scale, spec, sinks, (K_SCALE, V_SCALE))
    assert rel_err(out, exact(q, kd, vd, tables, lens, scale, 12, 0, sinks)) < 1e-5
    # a prefill chunk of 10 queries after a cached prefix: keys and values from the fp8 blocks
    b = int(lens.argmax())
    n, L = 10, int(lens[b])
    qp = torch.randn(n, case[1], case[3])
    out = prefill_variant(qp, None, None, (k8, v8), tables[b], L, scale, spec, sinks, (K_SCALE, V_SCALE))
    want = prefill_variant(qp.double(), None, None, (kd, vd), tables[b], L, scale, spec, sinks.double())
    assert rel_err(out, want) < 1e-5


def test_opcheck_fp8_cpu_op():
    """The registered op's fake (meta) implementation and dispatch agree (opcheck's schema check
    is left out: its mutation check multiplies the inputs, which float8 tensors cannot on the CPU)."""
    assert cpu_ops.load() is not None
    q, k8, v8, _, _, tables, lens = fp8_case(CASES[2])
    torch.library.opcheck(torch.ops.moe_serve.paged_decode_fp8_cpu.default,
                          (q, k8, v8, tables, lens, 0.25, K_SCALE, V_SCALE, 0, 0, None),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))
    with pytest.raises(RuntimeError, match="float8_e4m3fn"):
        torch.ops.moe_serve.paged_decode_fp8_cpu(q, k8.float(), v8.float(), tables, lens, 0.25)


@triton.jit
def _decode_bytes(src, dst, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(dst + offs, _e4m3fn_to_f32(tl.load(src + offs)))


@pytest.mark.parametrize("device", DEVICES)
def test_triton_fp8_decode_is_exact_for_every_byte(device):
    """The Triton kernels' integer decode of float8_e4m3fn bytes equals PyTorch's conversion for
    all 256 (NaN, which saturating writes never store, aside)."""
    b = torch.arange(256, dtype=torch.uint8, device=device)
    out = torch.empty(256, device=device)
    _decode_bytes[(1,)](b, out, N=256)
    ref = b.view(torch.float8_e4m3fn).float()
    finite = ~ref.isnan()
    assert finite.sum() == 254 and torch.equal(out[finite], ref[finite])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_bundled_model_fp8_kv_cache_on_cuda():
    """The GPU path end to end (bf16, the Triton decode kernel over fp8 blocks, CUDA graphs): twice
    the blocks of the bf16 cache, and greedy tokens flip only at near ties of the bf16 reference
    (the bound of tests/engine/test_kv_cache_dtype.py)."""
    from loadtest.benches.kv_fp8_quality import compare, engine, generate
    from tests.engine.test_kv_cache_dtype import MAX_FLIP_MARGIN

    ref = generate(engine("bfloat16", "auto", device="cuda"), 16)
    got = generate(engine("bfloat16", "fp8", device="cuda"), 16)
    assert got["cache_dtype"] == "float8_e4m3fn" and got["blocks"] == 2 * ref["blocks"]
    cmp = compare(ref, got)
    assert cmp["identical"] >= 5 and all(d["ref_margin"] < MAX_FLIP_MARGIN for d in cmp["differences"]), cmp
