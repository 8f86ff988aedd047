"""The bfloat16 KV cache of a float32 model (`--kv-cache-dtype bfloat16`): writes round to
nearest even, every reader widens exactly; the C and Triton decode kernels over a bfloat16 cache
against a float64 reference of the attention over the same (rounded) cache contents."""

from __future__ import annotations

import math

import pytest
import torch

from models.kernels import cpu_ops
from models.kernels.paged_attention import paged_decode
from models.layers.attention_variants import AttentionVariant, decode_variant, prefill_variant
from models.layers.paged import gather_kv, kv_roundtrip, write_kv
from tests.models.kernels.conftest import DEVICES, rel_err, torch_threads
from tests.models.kernels.test_kv_fp8 import CASES, VARIANTS, VIDS, exact
from tests.models.kernels.test_paged_attention import make_case


def bf16_case(case, device="cpu"):
    """float32 q and a bfloat16 cache holding make_case's K/V rounded; also the float64 values
    the reference reads (exactly the cache's)."""
    q, k, v, tables, lens = make_case(*case, device=device)
    k16, v16 = k.bfloat16(), v.bfloat16()
    return q, k16, v16, k16.double(), v16.double(), tables, lens


def test_write_and_gather_round_trip():
    k, v = torch.randn(7, 2, 8), torch.randn(7, 2, 8)
    cache = (torch.zeros(4, 4, 2, 8, dtype=torch.bfloat16), torch.zeros(4, 4, 2, 8, dtype=torch.bfloat16))
    table = torch.tensor([2, 0])
    write_kv(cache, k, v, table[torch.arange(7) // 4] * 4 + torch.arange(7) % 4)
    kg, vg = gather_kv(cache, table, 7, dtype=torch.float32)
    assert kg.dtype == vg.dtype == torch.float32
    assert torch.equal(kg, k.bfloat16().float()) and torch.equal(vg, v.bfloat16().float())
    assert torch.equal(kv_roundtrip(k, torch.bfloat16), k.bfloat16().float())
    assert kv_roundtrip(k, torch.float32) is k
    assert not torch.equal(kg, k)  # the cache did round (random floats are not bfloat16 values)


@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}" for c in CASES])
def test_cpu_kernel_bf16_matches_float64(case, variant):
    assert cpu_ops.load() is not None, "the C kernel must build here (a C compiler is a test requirement)"
    window, chunk, with_sinks = variant
    q, k16, v16, kd, vd, tables, lens = bf16_case(case)
    sinks = torch.randn(case[1]) if with_sinks else None
    scale = 1 / math.sqrt(case[3])
    ref = exact(q, kd, vd, tables, lens, scale, window, chunk, sinks)
    for threads in (1, 2):
        with torch_threads(threads):
            out = paged_decode(q, k16, v16, tables, lens, scale, "cpu", window, chunk, sinks)
        assert out.dtype == torch.float32
        assert rel_err(out, ref) < 1e-5, threads
    # the same values in a float32 cache: the same kernel routine, the same result up to rounding
    f32 = paged_decode(q, k16.float(), v16.float(), tables, lens, scale, "cpu", window, chunk, sinks)
    assert torch.allclose(out, f32, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
def test_triton_kernel_bf16_matches_float64(variant, device):
    """Under TRITON_INTERPRET=1 on CPU tensors, compiled on CUDA: float32 queries, bfloat16 cache."""
    window, chunk, with_sinks = variant
    case = CASES[2]
    q, k16, v16, kd, vd, tables, lens = bf16_case(case, device=device)
    sinks = torch.randn(case[1], device=device) if with_sinks else None
    scale = 1 / math.sqrt(case[3])
    out = paged_decode(q, k16, v16, tables, lens, scale, "triton", window, chunk, sinks)
    assert out.dtype == torch.float32
    assert rel_err(out, exact(q, kd, vd, tables, lens, scale, window, chunk, sinks)) < 1e-5


def test_reference_paths_read_bf16():
    """The PyTorch decode reference, the variants' decode and a prefill over cached blocks read
    the bfloat16 cache as float32 (its exact values)."""
    case = CASES[1]
    q, k16, v16, kd, vd, tables, lens = bf16_case(case)
    scale = 1 / math.sqrt(case[3])
    out = paged_decode(q, k16, v16, tables, lens, scale, "reference")
    assert out.dtype == torch.float32 and rel_err(out, exact(q, kd, vd, tables, lens, scale)) < 1e-5
    spec = AttentionVariant(12, None, True)
    sinks = torch.randn(case[1])
    out = decode_variant(q, (k16, v16), tables, lens, scale, spec, sinks)
    assert out.dtype == torch.float32 and rel_err(out, exact(q, kd, vd, tables, lens, scale, 12, 0, sinks)) < 1e-5
    b = int(lens.argmax())
    n, L = 10, int(lens[b])
    qp = torch.randn(n, case[1], case[3])
    out = prefill_variant(qp, None, None, (k16, v16), tables[b], L, scale, spec, sinks)
    want = prefill_variant(qp.double(), None, None, (kd, vd), tables[b], L, scale, spec, sinks.double())
    assert rel_err(out, want) < 1e-5


def test_opcheck_bf16_cpu_op():
    assert cpu_ops.load() is not None
    q, k16, v16, _, _, tables, lens = bf16_case(CASES[2])
    torch.library.opcheck(torch.ops.moe_serve.paged_decode_cpu.default, (q, k16, v16, tables, lens, 0.25, 0, 0, None))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.moe_serve.paged_decode_cpu(q, k16, v16.float(), tables, lens, 0.25)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.moe_serve.paged_decode_cpu(q, k16.half(), v16.half(), tables, lens, 0.25)
