"""The experts of an MoE layer, by the kernel the plan chose (`models.kernels.plan.MoEKernel`).

Every kernel computes, for x [T, H], stacks w13 [E, 2I, H] (gate rows, then up rows) and
w2 [E, H, I], and the routing topk_ids / topk_w [T, k]:
    sum_k topk_w[t, k] * Expert_{topk_ids[t, k]}(x[t]),  Expert_e(v) = w2[e] @ (silu(gate) * up)
with (gate, up) = w13[e] @ v.
- TRITON: `torch.ops.moe_serve.fused_moe_triton` (CUDA; CPU tensors under TRITON_INTERPRET=1);
- GROUPED_MM: `torch._grouped_mm` over the pairs sorted by expert (Hopper, bf16);
- CPU: the C kernel over packed weights (`packed.moe_cpu`);
- LOOP: `moe_loop`, one matmul pair per active expert;
- REFERENCE: `reference.moe_reference`.
The family variants (`ExpertVariant`: biases, the clamped SwiGLU, routing weights on the input)
run in TRITON, CPU and LOOP.
TRITON, GROUPED_MM and CPU read nothing back to the host (a CUDA graph can capture them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.kernels.moe_align import expert_counts, expert_runs, sort_pairs
from models.kernels.packed import PackedExperts, PackedWeight, QTensorExperts, moe_cpu, packed_linear
from models.kernels.plan import MoEKernel
from models.kernels.reference import moe_reference
from models.quant.ops import clamped_swiglu  # noqa: F401 - the activation's home is models.quant.ops (no cycle)


@dataclass(frozen=True)
class ExpertVariant:
    """Experts that are not plain SwiGLU:
    - `bias` (gpt-oss): biases ride in the stacks as one extra input column (w13 [E, 2I, H + 1],
      w2 [E, H, I + 1], the bias last), so placement moves one tensor per projection as usual;
    - `limit` (gpt-oss): the clamped SwiGLU `(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`
      with `g = clamp(gate, max=limit)`;
    - `weight_on_input` (Llama 4): the routing weight scales the expert's input, not its output."""

    bias: bool = False
    limit: float | None = None
    alpha: float = 1.702
    weight_on_input: bool = False


def moe_loop(x, w13, w2, topk_ids, topk_w, variant: ExpertVariant | None = None,
             packed_w13: list[PackedWeight] | None = None) -> torch.Tensor:
    """The pairs sorted by expert, one gate+up and one down matmul per active expert (the counts
    are read on the host: free on the CPU, a sync on CUDA); gate+up through `packed_w13` ([E]
    packed copies) when given. Shapes as the module docstring; `variant` for the families'."""
    v = variant or ExpertVariant()
    H = x.shape[1]
    inter = w2.shape[-1] - (1 if v.bias else 0)
    order, token_of, counts = sort_pairs(topk_ids, w13.shape[0])
    pair_w = topk_w.reshape(-1)[order].to(x.dtype)[:, None]  # [P, 1]
    xs = x.index_select(0, token_of)  # [P, H] in expert order
    if v.weight_on_input:
        xs = xs * pair_w
    ys = torch.empty_like(xs)  # [P, H]
    for e, start, end in expert_runs(counts):
        xe = xs[start:end]
        if v.bias:
            h = F.linear(xe, w13[e, :, :H], w13[e, :, H])
        elif packed_w13 is not None:
            h = packed_linear(xe, packed_w13[e])
        else:
            h = F.linear(xe, w13[e])  # [n, 2I]
        a = F.silu(h[:, :inter]) * h[:, inter:] if v.limit is None else clamped_swiglu(h, inter, v.alpha, v.limit)
        if v.bias:
            ys[start:end] = F.linear(a, w2[e, :, :inter], w2[e, :, inter])
        else:
            torch.mm(a, w2[e].t(), out=ys[start:end])  # [n, H]
    if not v.weight_on_input:
        ys.mul_(pair_w)
    return torch.zeros_like(x).index_add_(0, token_of, ys)


def moe_grouped_mm(x, w13, w2, topk_ids, topk_w) -> torch.Tensor:
    """torch._grouped_mm over the pairs sorted by expert (shapes as the module docstring); no host sync."""
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
    kernel: MoEKernel,
    variant: ExpertVariant | None = None,  # LOOP, TRITON and CPU
    packed_w13: list[PackedWeight] | None = None,  # LOOP: packed gate+up copies
    packed_experts: PackedExperts | None = None,  # CPU: the kernel's packed w13 and w2
) -> torch.Tensor:
    """[T, H]: the layer's experts by `kernel` (every kernel takes these shapes); experts kept in a
    checkpoint's quantized format (`QTensorExperts`) run `models.quant.ops.qmoe` whatever the kernel
    (the plan names Triton on CUDA, the loop on the CPU: its torch reference)."""
    if isinstance(packed_experts, QTensorExperts):
        return packed_experts(x, topk_ids, topk_w, variant)
    kernel = MoEKernel(kernel)  # also takes its name
    if kernel == MoEKernel.LOOP:
        return moe_loop(x, w13, w2, topk_ids, topk_w, variant, packed_w13)
    if variant is not None and kernel not in (MoEKernel.TRITON, MoEKernel.CPU):
        raise ValueError(f"expert variants run the loop, the Triton or the C kernel, not {kernel.value}")
    if kernel == MoEKernel.TRITON:
        from models.kernels import triton_moe  # noqa: F401 - registers the op

        if variant is None:
            return torch.ops.moe_serve.fused_moe_triton(x, w13, w2, topk_ids, topk_w)
        return torch.ops.moe_serve.fused_moe_triton(x, w13, w2, topk_ids, topk_w, variant.bias, variant.limit,
                                                    variant.alpha, variant.weight_on_input)
    if kernel == MoEKernel.GROUPED_MM:
        return moe_grouped_mm(x, w13, w2, topk_ids, topk_w)
    if kernel == MoEKernel.CPU:
        if packed_experts is None:
            raise ValueError("the CPU experts kernel needs its packed weights (PackedExperts)")
        return moe_cpu(x, packed_experts, topk_ids, topk_w, variant)
    return moe_reference(x, w13, w2, topk_ids, topk_w)
