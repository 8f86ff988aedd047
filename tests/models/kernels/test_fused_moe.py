"""Fused MoE: the pair alignment's invariants, and every expert backend against the reference."""

from __future__ import annotations

import pytest
import torch

from models.kernels import cpu_ops
from models.kernels.fused_moe import ExpertVariant, fused_experts, moe_loop
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
    if backend == "grouped_mm" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm needs bf16 on sm90+")
    x, w13, w2, ids, w = make_case(T, 1024, 512, 16, 2, dtype=torch.bfloat16, device="cuda", seed=T)
    exact = moe_exact(x, w13, w2, ids, w)
    ref_err = rel_err(moe_reference(x, w13, w2, ids, w).cpu(), exact)
    out = fused_experts(x, w13, w2, ids, w, backend)
    assert rel_err(out.cpu(), exact) <= max(2 * ref_err, 1e-2), (rel_err(out.cpu(), exact), ref_err)


# -- the CPU experts kernel (models/kernels/csrc/moe_cpu.c) -----------------------------------
CPU_SHAPES = [  # T, H, I, E, k: H and I multiples of the kernel's 16-wide panels
    (1, 64, 48, 8, 2),  # one decode token
    (7, 32, 16, 4, 1),  # top-1
    (24, 48, 32, 16, 4),  # more experts than active ones; 7 rows for some experts (2 micro-kernel blocks)
    (40, 32, 64, 4, 2),  # 20 rows per expert on average: several row blocks per panel
]


MIN_PAIRS_PER_THREADING = 32  # kMinPairsPerThreading in csrc/ops.cpp: past it the kernel uses every thread


def needs_cpu_kernel():
    if cpu_ops.load() is None:
        from tests.conftest import skip_or_fail

        skip_or_fail("the CPU experts kernel is not built here (no C compiler or no AVX2 + FMA)")


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=[f"T{s[0]}-H{s[1]}-I{s[2]}-E{s[3]}-k{s[4]}" for s in CPU_SHAPES])
@pytest.mark.parametrize("skew", [False, True])
def test_cpu_kernel_matches_reference(shape, skew):
    from models.kernels.packed import PackedExperts, moe_cpu

    needs_cpu_kernel()
    x, w13, w2, ids, w = make_case(*shape, skew=skew)
    packed = PackedExperts(w13, w2)
    out = moe_cpu(x, packed, ids, w)
    assert rel_err(out, moe_exact(x, w13, w2, ids, w)) < 1e-6
    assert torch.equal(fused_experts(x, w13, w2, ids, w, "cpu", packed_experts=packed), out)


def test_cpu_kernel_needs_its_packed_copy_and_variants_need_the_loop():
    x, w13, w2, ids, w = make_case(3, 32, 32, 4, 2)
    with pytest.raises(ValueError, match="packed weights"):
        fused_experts(x, w13, w2, ids, w, "cpu")
    with pytest.raises(ValueError, match="variants run the loop"):
        fused_experts(x, w13, w2, ids, w, "reference", ExpertVariant(limit=1.0))


def test_loop_variants_match_their_definition():
    """The one expert loop with each family variant against the variant written out per token."""
    import torch.nn.functional as F

    from models.kernels.fused_moe import clamped_swiglu

    g = torch.Generator().manual_seed(3)
    T, H, inter, E, k = 6, 16, 8, 4, 2
    x = torch.randn(T, H, generator=g, dtype=torch.float64)
    w13 = torch.randn(E, 2 * inter, H + 1, generator=g, dtype=torch.float64)  # the bias as a last column
    w2 = torch.randn(E, H, inter + 1, generator=g, dtype=torch.float64)
    ids = torch.randint(0, E, (T, k), generator=g)
    w = torch.rand(T, k, generator=g, dtype=torch.float64)
    for v in (ExpertVariant(bias=True, limit=0.7, alpha=1.5), ExpertVariant(weight_on_input=True)):
        a13, a2 = (w13, w2) if v.bias else (w13[:, :, :H].contiguous(), w2[:, :, :inter].contiguous())
        expected = torch.zeros_like(x)
        for t in range(T):
            for s in range(k):
                e, xe = int(ids[t, s]), x[t] * (w[t, s] if v.weight_on_input else 1.0)
                h = F.linear(xe[None], a13[e, :, :H], a13[e, :, H] if v.bias else None)
                act = clamped_swiglu(h, inter, v.alpha, v.limit) if v.limit is not None else \
                    F.silu(h[:, :inter]) * h[:, inter:]
                y = F.linear(act, a2[e, :, :inter], a2[e, :, inter] if v.bias else None)[0]
                expected[t] += y if v.weight_on_input else w[t, s] * y
        assert rel_err(moe_loop(x, a13, a2, ids, w, v), expected) < 1e-12


def test_cpu_kernel_is_batch_invariant_and_thread_invariant():
    """A token's output does not depend on the other tokens of the step, nor on the thread count."""
    from models.kernels.packed import PackedExperts, moe_cpu

    needs_cpu_kernel()
    x, w13, w2, ids, w = make_case(MIN_PAIRS_PER_THREADING, 64, 32, 8, 2)
    packed = PackedExperts(w13, w2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = moe_cpu(x, packed, ids, w)
        torch.set_num_threads(3)  # split over threads (the pairs are past the threading bound)
        three = moe_cpu(x, packed, ids, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    for t in (0, 5, x.shape[0] - 1):
        assert torch.equal(moe_cpu(x[t : t + 1], packed, ids[t : t + 1], w[t : t + 1])[0], one[t])


def test_cpu_kernel_repacks_after_an_in_place_change_and_checks_ids():
    from models.kernels.packed import PackedExperts, moe_cpu

    needs_cpu_kernel()
    x, w13, w2, ids, w = make_case(5, 32, 16, 4, 2)
    packed = PackedExperts(w13, w2)
    moe_cpu(x, packed, ids, w)
    w13.mul_(0.5)  # e.g. weights reloaded in place
    w2[1].add_(0.25)
    assert rel_err(moe_cpu(x, packed, ids, w), moe_exact(x, w13, w2, ids, w)) < 1e-6
    assert moe_cpu(x[:0], packed, ids[:0], w[:0]).shape == (0, 32)
    with pytest.raises(IndexError, match="expert id"):
        moe_cpu(x, packed, torch.full_like(ids, 4), w)


def test_model_uses_the_cpu_kernel_and_matches_the_loop(family_checkpoint):
    """The Mixtral checkpoint on CPU float32 gets the kernel from the plan (the loop above its
    batch sizes); its logits match the loop's (the parity tests compare the plan's default path
    with transformers). Prefill here runs 9 tokens x 2 of 8 experts: the kernel's range."""
    from models import load_model
    from tests.models.simple_runner import prefill_logits
    from models.kernels.flags import KernelFlags
    from models.kernels.plan import MoEKernel

    needs_cpu_kernel()
    path, _ = family_checkpoint("mixtral")
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    assert {(b.kernel, b.kernel_large) for b in model.moe_blocks()} == {(MoEKernel.CPU, MoEKernel.LOOP)}
    assert all(b.packed_experts is not None for b in model.moe_blocks())
    prompts = [[5, 9, 23, 7, 81, 3], [11, 2, 40]]
    fast = torch.cat(prefill_logits(model, prompts))
    model.plan_kernels(KernelFlags(moe="loop"))
    assert all(b.packed_experts is None and b.kernel == MoEKernel.LOOP for b in model.moe_blocks())
    assert rel_err(fast, torch.cat(prefill_logits(model, prompts))) < 1e-5


def test_cpu_kernels_share_pytorchs_openmp_pool():
    """Where PyTorch runs libgomp, the kernels are built with -fopenmp and bind to that same
    runtime: one libgomp in the process, so their threads are PyTorch's pool (no second set of
    threads spinning beside it)."""
    from models.kernels import cpu_build

    needs_cpu_kernel()
    if not cpu_build.torch_runs_gomp():
        pytest.skip("this PyTorch build does not run libgomp.so.1 (the kernels use pthreads)")
    assert cpu_ops.load() == "openmp" and cpu_ops.ops().cpu_kernels_info()[1] == 1
    maps = open("/proc/self/maps").read().splitlines()
    gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, gomp


@pytest.mark.slow  # the slow group: CI runs it (`pytest -m slow`), the default suite does not
def test_pthread_build_matches_the_default_build():
    """The kernels built without OpenMP (threads of their own: PyTorch builds on another
    runtime, or --cpu-kernels pthreads) give bitwise the same results on several threads. That
    build is loaded beside the default one under another op namespace."""
    from models.kernels.packed import PackedExperts, moe_cpu

    needs_cpu_kernel()
    assert cpu_ops.load("pthreads", namespace="moe_serve_pthreads") == "pthreads"
    plain = cpu_ops.ops("moe_serve_pthreads")
    x, w13, w2, ids, w = make_case(40, 32, 64, 4, 2)
    packed = PackedExperts(w13, w2)
    expected = moe_cpu(x, packed, ids, w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        out = plain.moe_experts_cpu(x, ids, w, *plain.moe_pack_cpu(w13, w2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, expected)
