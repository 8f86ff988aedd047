"""The experts of an MoE layer, by backend (resolved by `KernelConfig.moe_backend`).

- "triton": `triton_moe.fused_moe_triton` (CUDA; CPU tensors only under TRITON_INTERPRET=1)
- "grouped_mm": `torch._grouped_mm` over the pairs sorted by expert (Hopper, bf16)
- "cpu": the C kernel of `cpu_moe` (float32, AVX2 + FMA) for batches of up to
  `CPU_KERNEL_PAIRS_PER_EXPERT` token-expert pairs per expert on average (decode, small
  prefill chunks), "loop" above that (where oneDNN's GEMMs are faster: docs/benchmarks.md)
- "loop": one matmul pair per active expert (CPU; the counts are read once per layer, which
  costs nothing there), gate+up through oneDNN-packed weights when given (`cpu_linear`)
- "reference": `reference.moe_reference`
"Triton" and "grouped_mm" read nothing back to the host, so they can run in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.kernels.cpu_linear import PackedWeight, packed_linear
from models.kernels.cpu_moe import PackedExperts, moe_cpu
from models.kernels.cpu_moe import supports as cpu_moe_supports
from models.kernels.moe_align import expert_counts, expert_runs, sort_pairs
from models.kernels.reference import moe_reference


# "cpu": the C kernel up to this many pairs per expert on average; "loop" above (measured
# on the benchmark CPU, H 512, I 1024, top-2 of 8: the kernel is faster up to here at one and
# two threads, even at one thread up to 256 pairs per expert; the loop at 2048 tokens, two threads)
CPU_KERNEL_PAIRS_PER_EXPERT = 64


def moe_loop(x, w13, w2, topk_ids, topk_w, packed_w13: list[PackedWeight] | None = None) -> torch.Tensor:
    """The CPU path (shapes as `fused_experts`): pairs sorted by expert, one gate+up and one
    down matmul per active expert, gate+up through `packed_w13` ([E] oneDNN-packed) when given.
    The counts are read on the host, which costs nothing on the CPU."""
    inter = w2.shape[-1]
    order, token_of, counts = sort_pairs(topk_ids, w13.shape[0])
    xs = x.index_select(0, token_of)  # [P, H]
    ys = torch.empty_like(xs)
    for e, start, end in expert_runs(counts):
        xe = xs[start:end]
        h = packed_linear(xe, packed_w13[e]) if packed_w13 is not None else F.linear(xe, w13[e])  # [n, 2I]
        torch.mm(F.silu(h[:, :inter]) * h[:, inter:], w2[e].t(), out=ys[start:end])  # [n, H]
    ys.mul_(topk_w.reshape(-1)[order].to(ys.dtype)[:, None])
    return torch.zeros_like(x).index_add_(0, token_of, ys)


def moe_grouped_mm(x, w13, w2, topk_ids, topk_w) -> torch.Tensor:
    """torch._grouped_mm over the pairs sorted by expert (shapes as `fused_experts`); no host sync."""
    T, k = topk_ids.shape
    E, inter = w13.shape[0], w2.shape[-1]
    flat = topk_ids.reshape(-1).to(torch.int64)  # [P]
    order = torch.argsort(flat, stable=True)  # [P] pairs sorted by expert
    offs = expert_counts(flat, E).cumsum(0).to(torch.int32)  # [E] end row of each expert
    xs = x.index_select(0, order // k)  # [P, H]
    h = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)  # [P, 2I]
    a = F.silu(h[:, :inter]) * h[:, inter:]  # [P, I]
    ys = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)  # [P, H] in sorted order
    ys = ys * topk_w.reshape(-1)[order].to(ys.dtype)[:, None]
    y = torch.empty_like(ys).index_copy_(0, order, ys)  # [P, H] back in (token, slot) order
    return y.view(T, k, -1).sum(dim=1)


def fused_experts(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H] gate rows, then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_ids: torch.Tensor,  # [T, k]
    topk_w: torch.Tensor,  # [T, k]
    backend: str,
    packed_w13: list[PackedWeight] | None = None,
    packed_experts: PackedExperts | None = None,  # "cpu": the kernel's packed w13 / w2 (cpu_moe)
) -> torch.Tensor:
    """sum_k topk_w[t, k] * Expert_{topk_ids[t, k]}(x[t]) -> [T, H], where Expert_e(v) =
    w2[e] @ (silu(gate) * up) and (gate, up) = w13[e] @ v. Every backend takes these shapes."""
    if backend == "triton":
        from models.kernels.triton_moe import fused_moe_triton

        return fused_moe_triton(x, w13, w2, topk_ids, topk_w)
    if backend == "grouped_mm":
        return moe_grouped_mm(x, w13, w2, topk_ids, topk_w)
    if backend == "cpu":
        T, k = topk_ids.shape
        # without a kept packed copy (e.g. the placement executor's per-device expert subsets)
        # packing per call would cost more than it saves: the loop
        if (packed_experts is not None and T * k <= CPU_KERNEL_PAIRS_PER_EXPERT * w13.shape[0]
                and cpu_moe_supports(w13, w2)):
            return moe_cpu(x, packed_experts, topk_ids, topk_w)
        return moe_loop(x, w13, w2, topk_ids, topk_w, packed_w13)
    if backend == "loop":
        return moe_loop(x, w13, w2, topk_ids, topk_w, packed_w13)
    return moe_reference(x, w13, w2, topk_ids, topk_w)
