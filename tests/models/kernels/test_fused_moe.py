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


# -- the CPU experts kernel (models/kernels/csrc/moe_cpu.c) -----------------------------------
CPU_SHAPES = [  # T, H, I, E, k: H and I multiples of the kernel's 16-wide panels
    (1, 64, 48, 8, 2),  # one decode token
    (7, 32, 16, 4, 1),  # top-1
    (24, 48, 32, 16, 4),  # more experts than active ones; 7 rows for some experts (2 micro-kernel blocks)
    (40, 32, 64, 4, 2),  # 20 rows per expert on average: several row blocks per panel
]


def needs_cpu_kernel():
    from models.kernels import cpu_moe

    if not cpu_moe.available():
        from tests.conftest import skip_or_fail

        skip_or_fail("the CPU experts kernel is not built here (no C compiler or no AVX2 + FMA)")


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=[f"T{s[0]}-H{s[1]}-I{s[2]}-E{s[3]}-k{s[4]}" for s in CPU_SHAPES])
@pytest.mark.parametrize("skew", [False, True])
def test_cpu_kernel_matches_reference(shape, skew):
    from models.kernels.cpu_moe import PackedExperts, moe_cpu

    needs_cpu_kernel()
    x, w13, w2, ids, w = make_case(*shape, skew=skew)
    packed = PackedExperts(w13, w2)
    out = moe_cpu(x, packed, ids, w)
    assert rel_err(out, moe_exact(x, w13, w2, ids, w)) < 1e-6
    # through the backend switch, which picks the kernel for these batch sizes
    assert torch.equal(fused_experts(x, w13, w2, ids, w, "cpu", packed_experts=packed), out)


def test_cpu_backend_falls_back_to_the_loop():
    """Sizes the kernel does not serve (I not a multiple of 16), batches above its pairs per
    expert bound and calls without a packed copy run through the loop, with the same results."""
    from models.kernels.fused_moe import CPU_KERNEL_PAIRS_PER_EXPERT

    from models.kernels.cpu_moe import PackedExperts

    x, w13, w2, ids, w = make_case(19, 32, 40, 4, 1)
    out = fused_experts(x, w13, w2, ids, w, "cpu", packed_experts=PackedExperts(w13, w2))
    assert rel_err(out, moe_exact(x, w13, w2, ids, w)) < 1e-6
    T = CPU_KERNEL_PAIRS_PER_EXPERT * 4 // 2 + 5  # just above the bound for E=4, k=2
    x, w13, w2, ids, w = make_case(T, 32, 32, 4, 2)
    out = fused_experts(x, w13, w2, ids, w, "cpu", packed_experts=PackedExperts(w13, w2))
    assert rel_err(out, moe_exact(x, w13, w2, ids, w)) < 1e-6
    # no packed copy (the placement executor's expert subsets, inference tensors): the loop
    with torch.inference_mode():
        x, w13, w2, ids, w = make_case(3, 32, 32, 4, 2)
    assert rel_err(fused_experts(x, w13, w2, ids, w, "cpu"), moe_exact(x, w13, w2, ids, w)) < 1e-6


def test_cpu_kernel_is_batch_invariant_and_thread_invariant():
    """A token's output does not depend on the other tokens of the step, nor on the thread count."""
    from models.kernels.cpu_moe import MIN_PAIRS_PER_THREADING, PackedExperts, moe_cpu

    needs_cpu_kernel()
    x, w13, w2, ids, w = make_case(MIN_PAIRS_PER_THREADING, 64, 32, 8, 2)
    packed = PackedExperts(w13, w2)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = moe_cpu(x, packed, ids, w)
        torch.set_num_threads(3)  # split over threads (the pairs are at the threading bound)
        three = moe_cpu(x, packed, ids, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    for t in (0, 5, x.shape[0] - 1):
        assert torch.equal(moe_cpu(x[t : t + 1], packed, ids[t : t + 1], w[t : t + 1])[0], one[t])


def test_cpu_kernel_repacks_after_an_in_place_change_and_checks_ids():
    from models.kernels.cpu_moe import PackedExperts, moe_cpu

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
    """The bundled-family Mixtral checkpoint on CPU float32 picks the kernel, whose logits
    match the loop backend's (the parity tests compare the auto path with transformers)."""
    from models import load_model
    from models.kernels import KernelConfig
    from models.generate import prefill_logits

    needs_cpu_kernel()
    path, _ = family_checkpoint("mixtral")
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    model.set_kernels(KernelConfig())
    assert set(model.kernel_backends()["moe"]) == {"cpu"}
    assert all(b.packed_experts is not None for b in model.moe_blocks())
    prompts = [[5, 9, 23, 7, 81, 3], [11, 2, 40]]
    fast = torch.cat(prefill_logits(model, prompts))
    model.set_kernels(KernelConfig(moe="loop"))
    assert all(b.packed_experts is None for b in model.moe_blocks())
    assert rel_err(fast, torch.cat(prefill_logits(model, prompts))) < 1e-5


def test_cpu_kernels_share_pytorchs_openmp_pool():
    """Where PyTorch runs libgomp, the kernels are built with -fopenmp and bind to that same
    runtime: one libgomp in the process, so their threads are PyTorch's pool (no second set of
    threads spinning beside it)."""
    from models.kernels import cpu_build

    needs_cpu_kernel()
    if not cpu_build.torch_runs_gomp():
        pytest.skip("this PyTorch build does not run libgomp.so.1 (the kernels use pthreads)")
    lib = cpu_build.load()
    assert lib.cpu_kernels_openmp() == 1
    maps = open("/proc/self/maps").read().splitlines()
    gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, gomp


def test_pthread_build_matches_the_default_build():
    """The kernels built without OpenMP (threads of their own: PyTorch builds on another
    runtime, or -fopenmp unavailable) give bitwise the same results on several threads."""
    import ctypes
    import shutil

    from models.kernels import cpu_build
    from models.kernels.cpu_moe import PackedExperts, moe_cpu

    needs_cpu_kernel()
    cc = shutil.which("cc") or shutil.which("gcc")
    path = cpu_build._build(cc, list(cpu_build.FLAGS))
    assert path is not None
    plain = cpu_build._declare(ctypes.CDLL(str(path)))
    assert plain.cpu_kernels_openmp() == 0
    x, w13, w2, ids, w = make_case(40, 32, 64, 4, 2)
    packed = PackedExperts(w13, w2)
    expected = moe_cpu(x, packed, ids, w)
    p13, p2 = packed.get()
    out = torch.empty_like(expected)
    assert plain.moe_fused_f32(x.data_ptr(), ids.contiguous().data_ptr(), w.contiguous().data_ptr(), p13.data_ptr(),
                               p2.data_ptr(), out.data_ptr(), 40, 2, 4, 32, 64, 3) == 0
    assert torch.equal(out, expected)
