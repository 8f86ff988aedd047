"""Paged decode attention with the variants (sliding window, chunked attention, sinks): the C
and Triton kernels against a float64 softmax written out by hand per sequence and head, over
scattered block tables and ragged lengths; and that the kernels never read a key outside the
window (those cache rows hold NaN here)."""

from __future__ import annotations

import math

import pytest
import torch

from models.kernels import cpu_ops
from models.kernels.paged_attention import paged_decode
from models.layers.attention_variants import AttentionVariant, decode_variant
from tests.models.kernels.conftest import DEVICES, rel_err, torch_threads
from tests.models.kernels.test_paged_attention import make_case


def first_visible(L: int, window: int, chunk: int) -> int:
    p, lo = L - 1, 0
    if window:
        lo = max(lo, p - window + 1)
    if chunk:
        lo = max(lo, (p // chunk) * chunk)
    return lo


def naive(q, k, v, tables, lens, scale, window=0, chunk=0, sinks=None):
    """float64: each sequence's query (position lens[b] - 1) over its visible keys, per head,
    with the sink's logit in the denominator."""
    B, heads, d = q.shape
    bs, kvh = k.shape[1], k.shape[2]
    out = torch.zeros(B, heads, d, dtype=torch.float64)
    for b in range(B):
        L = int(lens[b])
        if L == 0:
            continue
        pos = range(first_visible(L, window, chunk), L)
        slots = [int(tables[b, t // bs]) * bs + t % bs for t in pos]
        kk = k.reshape(-1, kvh, d)[slots].double().cpu()
        vv = v.reshape(-1, kvh, d)[slots].double().cpu()
        kv = torch.arange(heads) // (heads // kvh)  # each query head's KV head
        logits = torch.einsum("hd,lhd->hl", q[b].double().cpu(), kk[:, kv]) * scale  # [heads, L]
        if sinks is not None:
            logits = torch.cat((logits, sinks.double().cpu()[:, None]), dim=1)
        p = torch.softmax(logits, dim=1)[:, : len(slots)]
        out[b] = torch.einsum("hl,lhd->hd", p, vv[:, kv])
    return out


def poison_outside(k, v, tables, lens, window, chunk):
    """NaN in every cached key/value a query cannot see: a kernel that reads one fails."""
    k, v = k.clone(), v.clone()
    bs = k.shape[1]
    for b in range(tables.shape[0]):
        for t in range(first_visible(int(lens[b]), window, chunk)):
            blk = int(tables[b, t // bs])
            k[blk, t % bs] = float("nan")
            v[blk, t % bs] = float("nan")
    return k, v


VARIANTS = [  # window, chunk, sinks
    (8, 0, False),  # sliding window (Mixtral / Qwen checkpoints)
    (5, 0, True),  # window + sinks (gpt-oss's sliding layers), window not a block multiple
    (0, 0, True),  # sinks alone (gpt-oss's full layers)
    (0, 16, False),  # chunked attention (Llama 4)
    (0, 7, True),  # chunk not a block multiple, with sinks
    (1, 0, False),  # a window of one key
]
CASES = [  # B, heads, kv heads, head dim, block size, longest context
    (1, 8, 2, 32, 4, 45),  # one sequence: work split per KV head
    (9, 8, 4, 16, 8, 60),  # many sequences: whole sequences per thread
    (5, 4, 1, 24, 4, 33),  # multi-query, head dim not a power of two
]
IDS = [f"w{w}-c{c}-{'sinks' if s else 'nosinks'}" for w, c, s in VARIANTS]


def _case(case, variant, device="cpu", zero_rows=()):
    window, chunk, with_sinks = variant
    q, k, v, tables, lens = make_case(*case, seed=sum(case) + window + 3 * chunk, zero_rows=zero_rows)
    k, v = poison_outside(k, v, tables, lens, window, chunk)
    sinks = torch.randn(case[1], generator=torch.Generator().manual_seed(5)) * 2 if with_sinks else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(q), to(k), to(v), to(tables), to(lens), to(sinks)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}" for c in CASES])
def test_cpu_kernel_variants_match_float64(case, variant):
    assert cpu_ops.load() is not None, "the C kernel must build here (a C compiler is a test requirement)"
    window, chunk, _ = variant
    q, k, v, tables, lens, sinks = _case(case, variant, zero_rows=(2,) if case[0] > 2 else ())
    scale = 1 / math.sqrt(case[3])
    exact = naive(q, k, v, tables, lens, scale, window, chunk, sinks)
    for threads in (1, 2):
        with torch_threads(threads):
            out = paged_decode(q, k, v, tables, lens, scale, "cpu", window, chunk, sinks)
        assert rel_err(out, exact) < 1e-5, threads
        if case[0] > 2:
            assert out[2].abs().max() == 0  # a zero-length (padding) row writes zeros


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_triton_kernel_variants_match_float64(variant, device):
    window, chunk, _ = variant
    case = CASES[1]
    q, k, v, tables, lens, sinks = _case(case, variant, device=device, zero_rows=(0,))
    scale = 1 / math.sqrt(case[3])
    out = paged_decode(q, k, v, tables, lens, scale, "triton", window, chunk, sinks)
    assert out[0].abs().max() == 0
    assert rel_err(out, naive(q, k, v, tables, lens, scale, window, chunk, sinks)) < 1e-5


def test_reference_variant_path_matches_float64():
    """The PyTorch path the plan used to give these layers (and still gives bf16 on the CPU)."""
    for window, chunk, with_sinks in VARIANTS:
        q, k, v, tables, lens, sinks = _case(CASES[1], (window, chunk, with_sinks))
        k, v = k.nan_to_num(), v.nan_to_num()
        variant = AttentionVariant(window or None, chunk or None, with_sinks)
        out = decode_variant(q, (k, v), tables, lens, 0.25, variant, sinks)
        assert rel_err(out, naive(q, k, v, tables, lens, 0.25, window, chunk, sinks)) < 1e-5


def test_reference_kernel_refuses_variants():
    q, k, v, tables, lens, _ = _case(CASES[2], VARIANTS[0])
    with pytest.raises(ValueError, match="plain causal"):
        paged_decode(q, k, v, tables, lens, 0.25, "reference", 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("variant", [(128, 0, True), (0, 256, False), (0, 0, True)], ids=["window-sinks", "chunk",
                                                                                      "sinks"])
def test_triton_bf16_variants_error_within_reference_bf16_error(variant):
    """gpt-oss / Llama 4 shapes in bf16: the kernel differs from exact math by no more than the
    bf16 reference path does."""
    window, chunk, with_sinks = variant
    q, k, v, tables, lens = make_case(B=16, heads=64, kvh=8, d=64, block_size=16, max_len=700, device="cuda")
    sinks = torch.randn(64, device="cuda") if with_sinks else None
    spec = AttentionVariant(window or None, chunk or None, with_sinks)
    exact = decode_variant(q.double(), (k.double(), v.double()), tables, lens, 0.125, spec,
                           None if sinks is None else sinks.double())
    qb, kb, vb, sb = q.bfloat16(), k.bfloat16(), v.bfloat16(), None if sinks is None else sinks.bfloat16()
    ref_err = rel_err(decode_variant(qb, (kb, vb), tables, lens, 0.125, spec, sb), exact)
    ker_err = rel_err(paged_decode(qb, kb, vb, tables, lens, 0.125, "triton", window, chunk, sb), exact)
    assert ker_err <= max(2 * ref_err, 1e-2), (ker_err, ref_err)


@pytest.mark.parametrize("variant", [(12, 0, True), (0, 16, False)], ids=["window-sinks", "chunk"])
@pytest.mark.parametrize("prefix", [0, 37], ids=["whole-context", "cached-prefix"])
def test_prefill_query_tiles_match_float64(variant, prefix, monkeypatch):
    """A prefill chunk of 100 queries in tiles of 50 (the scores budget made small), each tile
    over its visible keys only, from the chunk's own K/V or the cache (the blocks before the
    first visible key poisoned), against each query's softmax written out in float64."""
    from models.layers import attention_variants

    monkeypatch.setattr(attention_variants, "PREFILL_SCORES_BUDGET", 1)
    window, chunk, with_sinks = variant
    n, heads, kvh, d, bs = 100, 4, 2, 16, 8
    seq_len = prefix + n
    g = torch.Generator().manual_seed(3)
    width = -(-seq_len // bs)
    k, v = torch.randn(width + 4, bs, kvh, d, generator=g), torch.randn(width + 4, bs, kvh, d, generator=g)
    table = torch.randperm(width + 4, generator=g)[:width]
    q = torch.randn(n, heads, d, generator=g)
    sinks = torch.randn(heads, generator=g) if with_sinks else None
    slots = table[torch.arange(seq_len) // bs] * bs + torch.arange(seq_len) % bs
    k_new, v_new = k.view(-1, kvh, d)[slots[prefix:]], v.view(-1, kvh, d)[slots[prefix:]]
    spec = AttentionVariant(window or None, chunk or None, with_sinks)
    kp, vp = poison_outside(k, v, table[None], torch.tensor([prefix + 1]), window, chunk)
    kp, vp = kp.view(-1, kvh, d), vp.view(-1, kvh, d)
    first = spec.first_visible_at(prefix) // bs * bs  # the gather starts at this block
    kp[slots[first:]], vp[slots[first:]] = k.view(-1, kvh, d)[slots[first:]], v.view(-1, kvh, d)[slots[first:]]
    out = attention_variants.prefill_variant(q, k_new, v_new, (kp.view_as(k), vp.view_as(v)), table, seq_len, 0.25,
                                             spec, sinks)
    want = torch.cat([naive(q[i: i + 1], k, v, table[None], torch.tensor([prefix + i + 1]), 0.25, window, chunk,
                            sinks) for i in range(n)])
    assert rel_err(out, want) < 1e-5


def test_opcheck_with_variant_arguments():
    """The ops' schemas and fake implementations with a window, a chunk and sinks."""
    from models.kernels import triton_attention  # noqa: F401 - registers the op

    q, k, v, tables, lens, sinks = _case(CASES[2], (5, 0, True))
    k, v = k.nan_to_num(), v.nan_to_num()
    cpu_ops.load()
    torch.library.opcheck(torch.ops.moe_serve.paged_decode_cpu.default, (q, k, v, tables, lens, 0.25, 5, 0, sinks))
    torch.library.opcheck(torch.ops.moe_serve.paged_decode_triton.default, (q, k, v, tables, lens, 0.25, 0, 7, sinks),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    with pytest.raises(RuntimeError, match="sinks must be"):
        torch.ops.moe_serve.paged_decode_cpu(q, k, v, tables, lens, 0.25, 5, 0, sinks[:2])
    with pytest.raises(RuntimeError, match="must be >= 0"):
        torch.ops.moe_serve.paged_decode_cpu(q, k, v, tables, lens, 0.25, -1, 0, None)
