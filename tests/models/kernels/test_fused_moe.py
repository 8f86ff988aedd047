"""Fused MoE: the pair alignment's invariants, and every expert backend against the reference."""

from __future__ import annotations

import pytest
import torch

from models.kernels import grouped_mm_available
from models.kernels.fused_moe import fused_experts
from models.kernels.moe_align import align_pairs
from models.kernels.reference import moe_reference
from tests.models.kernels.conftest import DEVICES, rel_err


def make_case(T, H, inter, E, k, dtype=torch.float32, device="cpu", seed=0, skew=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * inter, H, generator=g) / H**0.5
    w2 = torch.randn(E, H, inter, generator=g) / inter**0.5
    logits = torch.randn(T, E, generator=g)
    if skew:  # most tokens on one expert, some experts idle
        logits[:, 0] += 4.0
    topk_w, topk_ids = torch.softmax(logits, -1).topk(k, dim=-1)
    to = lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)  # noqa: E731
    return to(x), to(w13), to(w2), topk_ids.to(device), to(topk_w)


def moe_exact(x, w13, w2, ids, w):
    """The reference in float64 on the CPU: the 'exact' answer for error budgets."""
    return moe_reference(x.double().cpu(), w13.double().cpu(), w2.double().cpu(), ids.cpu(), w.double().cpu())


@pytest.mark.parametrize("T,E,k,block_m", [(1, 8, 2, 16), (13, 8, 2, 4), (40, 6, 3, 8), (5, 64, 8, 16)])
def test_align_pairs_invariants(T, E, k, block_m):
    ids = torch.randint(0, E, (T, k), generator=torch.Generator().manual_seed(T))
    a = align_pairs(ids, E, block_m)
    P = T * k
    rows = int(a.num_rows)
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert rows == int(((counts + block_m - 1) // block_m * block_m).sum())
    used = a.sorted_pairs[:rows]
    real = used[used < P]
    assert sorted(real.tolist()) == list(range(P))  # every pair exactly once
    assert (used[used >= P] == P).all()  # the rest is padding
    flat = ids.flatten()
    for blk in range(rows // block_m):
        pairs = used[blk * block_m : (blk + 1) * block_m]
        pairs = pairs[pairs < P]
        assert (flat[pairs] == a.block_experts[blk]).all()  # one expert per block of rows
    experts = a.block_experts[: rows // block_m].tolist()
    assert experts == sorted(experts)  # experts' runs in order


SHAPES = [  # T, H, I, E, k
    (1, 64, 48, 8, 2),  # one decode token
    (19, 32, 40, 4, 1),  # top-1, I not a multiple of the tile
    (24, 48, 32, 16, 4),  # more experts than active ones
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}-E{s[3]}-k{s[4]}" for s in SHAPES])
def test_triton_matches_reference(shape, device):
    x, w13, w2, ids, w = make_case(*shape, device=device, skew=shape[0] > 20)
    out = fused_experts(x, w13, w2, ids, w, "triton")
    assert rel_err(out.cpu(), moe_exact(x, w13, w2, ids, w)) < 1e-5


@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}-E{s[3]}-k{s[4]}" for s in SHAPES])
def test_cpu_loop_matches_reference(shape):
    x, w13, w2, ids, w = make_case(*shape)
    assert rel_err(fused_experts(x, w13, w2, ids, w, "loop"), moe_exact(x, w13, w2, ids, w)) < 1e-6


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_cuda_bf16_error_within_reference_bf16_error(backend, T):
    """bf16 on the GPU: each backend's error against exact math stays within twice the bf16
    reference's own error (the PyTorch loop in bf16)."""
    if backend == "grouped_mm" and not grouped_mm_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch._grouped_mm needs bf16 on sm90+")
    x, w13, w2, ids, w = make_case(T, 1024, 512, 16, 2, dtype=torch.bfloat16, device="cuda", seed=T)
    exact = moe_exact(x, w13, w2, ids, w)
    ref_err = rel_err(moe_reference(x, w13, w2, ids, w).cpu(), exact)
    out = fused_experts(x, w13, w2, ids, w, backend)
    assert rel_err(out.cpu(), exact) <= max(2 * ref_err, 1e-2), (rel_err(out.cpu(), exact), ref_err)
