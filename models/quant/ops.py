"""Compute over QTensor weights: `qlinear` (a dense linear) and `qmoe` (an MoE layer's experts).

On CUDA they call the Triton kernels (`models.kernels.triton_qmoe`: dequantization inside the
GEMM's inner loop), imported on first use so that the CPU never needs them. On the CPU they run the
torch reference: the weights are dequantized per call, only the experts a batch routes to (one
expert's w13 and w2 at a time, freed after use) and each linear's weight for that call: transient,
never resident. Both compute in x's dtype with float32 dequantization.

`qmoe` computes, for x [T, H], w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]:
    sum_k topk_w[t, k] * (w2[e] @ act(w13[e] @ x[t] + b13[e]) + b2[e]),  e = topk_ids[t, k]
with act the SwiGLU `silu(gate) * up`, or gpt-oss's clamped one where `limit` is given
(`clamped_swiglu`), and with `weight_on_input` (Llama 4) the routing weight
scaling the expert's input instead of its output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.quant.formats import QTensor


def clamped_swiglu(h: torch.Tensor, inter: int, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss activation of h [n, 2I] (gate columns, then up columns) -> [n, I]."""
    gate = h[:, :inter].clamp(max=limit)
    up = h[:, inter:].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def qlinear(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None, triton: bool | None = None
            ) -> torch.Tensor:
    """x [M, K] @ w.T (+ bias) -> [M, N] in x.dtype; `triton`: the Triton kernel (None: on CUDA
    tensors; on CPU tensors it runs under TRITON_INTERPRET=1, which is how the CPU tests the CUDA path)."""
    if x.is_cuda if triton is None else triton:
        from models.kernels.triton_qmoe import qlinear_triton

        return qlinear_triton(x, w, bias)
    return qlinear_reference(x, w, bias)


def qlinear_reference(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w.dequant(x.dtype), None if bias is None else bias.to(x.dtype))


def qmoe(x: torch.Tensor, w13: QTensor, w2: QTensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, *,
         b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, limit: float | None = None,
         alpha: float = 1.702, weight_on_input: bool = False, triton: bool | None = None) -> torch.Tensor:
    """[T, H] in x.dtype: the experts over quantized stacks (see the module docstring); `triton` as
    `qlinear`'s."""
    if x.is_cuda if triton is None else triton:
        from models.kernels.triton_qmoe import qmoe_triton

        return qmoe_triton(x, w13, w2, topk_ids, topk_w, b13=b13, b2=b2, limit=limit, alpha=alpha,
                           weight_on_input=weight_on_input)
    return qmoe_reference(x, w13, w2, topk_ids, topk_w, b13=b13, b2=b2, limit=limit, alpha=alpha,
                          weight_on_input=weight_on_input)


def qmoe_reference(x: torch.Tensor, w13: QTensor, w2: QTensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, *,
                   b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, limit: float | None = None,
                   alpha: float = 1.702, weight_on_input: bool = False) -> torch.Tensor:
    """The torch reference of `qmoe`: the pairs sorted by expert, each active expert's weights
    dequantized for its matmuls only (the counts are read on the host)."""
    from models.kernels.moe_align import expert_runs, sort_pairs

    E, inter = w13.shape[0], w2.shape[-1]
    order, token_of, counts = sort_pairs(topk_ids, E)
    pair_w = topk_w.reshape(-1)[order].to(x.dtype)[:, None]  # [P, 1]
    xs = x.index_select(0, token_of)  # [P, H] in expert order
    if weight_on_input:
        xs = xs * pair_w
    ys = torch.empty_like(xs)
    for e, start, end in expert_runs(counts):
        h = F.linear(xs[start:end], w13[e].dequant(x.dtype), None if b13 is None else b13[e].to(x.dtype))
        a = F.silu(h[:, :inter]) * h[:, inter:] if limit is None else clamped_swiglu(h, inter, alpha, limit)
        ys[start:end] = F.linear(a, w2[e].dequant(x.dtype), None if b2 is None else b2[e].to(x.dtype))
    if not weight_on_input:
        ys.mul_(pair_w)
    return torch.zeros_like(x).index_add_(0, token_of, ys)


# the transient dequantized weights of one chunk of pairs in `qmoe_pairs` (float32 bytes)
PAIR_CHUNK_BYTES = 32 * 2**20


def qmoe_pairs(x: torch.Tensor, w13: QTensor, w2: QTensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, *,
               b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, limit: float | None = None,
               alpha: float = 1.702, weight_on_input: bool = False) -> torch.Tensor:
    """`qmoe` with nothing read back to the host (the placement executor's decode steps on the
    CPU): each (token, slot) pair's expert is gathered from the quantized stacks and dequantized
    for that pair, in chunks of at most PAIR_CHUNK_BYTES of transient float weights; no counts,
    no sort. Same math as `qmoe_reference` (summation order aside)."""
    T, k = topk_ids.shape
    H, inter = x.shape[1], w2.shape[-1]
    flat = topk_ids.reshape(-1)  # [P]
    pair_w = topk_w.reshape(-1).to(x.dtype)[:, None]  # [P, 1]
    xs = x.repeat_interleave(k, dim=0)  # [P, H]
    if weight_on_input:
        xs = xs * pair_w
    chunk = max(1, PAIR_CHUNK_BYTES // (4 * 3 * H * inter))
    ys = []
    for s in range(0, flat.numel(), chunk):
        e = flat[s:s + chunk]
        h = torch.bmm(w13[e].dequant(x.dtype), xs[s:s + chunk, :, None]).squeeze(-1)  # [c, 2I]
        if b13 is not None:
            h = h + b13.index_select(0, e).to(x.dtype)
        a = F.silu(h[:, :inter]) * h[:, inter:] if limit is None else clamped_swiglu(h, inter, alpha, limit)
        y = torch.bmm(w2[e].dequant(x.dtype), a[:, :, None]).squeeze(-1)  # [c, H]
        if b2 is not None:
            y = y + b2.index_select(0, e).to(x.dtype)
        ys.append(y)
    out = torch.cat(ys) if ys else xs.new_zeros(0, H)
    if not weight_on_input:
        out = out * pair_w
    return out.view(T, k, H).sum(dim=1)
