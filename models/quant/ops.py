"""Compute over QTensor weights: `qlinear` (a dense linear) and `qmoe` (an MoE layer's experts).

On CUDA they call the Triton kernels (`models.kernels.triton_qmoe`: dequantization inside the
GEMM's inner loop), imported on first use so that the CPU never needs them. On the CPU, the fp8
formats (fp8_block, fp8_channel, fp8_tensor) run the C kernels where they are loaded
(`torch.ops.moe_serve.fp8_linear_cpu` / `fp8_moe_cpu`, csrc/fp8_cpu.c: the e4m3 bytes converted to
float32 in registers, the scales applied per block, float32 sums; activations of another dtype are
computed in float32 and cast back) unless the caller says `cpu=False` (the kernel plan's choice).
Otherwise, and for the other formats, they run the torch reference: the weights are dequantized per
call, only the experts a batch routes to (one expert's w13 and w2 at a time, freed after use) and each
linear's weight for that call: transient, never resident. The reference computes in x's dtype with
float32 dequantization.

`qmoe` computes, for x [T, H], w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I]:
    sum_k topk_w[t, k] * (w2[e] @ act(w13[e] @ x[t] + b13[e]) + b2[e]),  e = topk_ids[t, k]
with act the SwiGLU `silu(gate) * up`, or gpt-oss's clamped one where `limit` is given
(`clamped_swiglu`), and with `weight_on_input` (Llama 4) the routing weight
scaling the expert's input instead of its output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.quant.formats import QTensor, WeightFormat

FP8_FORMATS = frozenset({WeightFormat.FP8_BLOCK, WeightFormat.FP8_CHANNEL, WeightFormat.FP8_TENSOR})


def fp8_blocks(w: QTensor) -> tuple[int, int]:
    """(bn, bk): the rows and inputs each scale of an fp8 QTensor covers (the C kernels' form:
    fp8_block its block, fp8_channel (1, K), fp8_tensor (N, K))."""
    N, K = w.shape[-2:]
    fmt = WeightFormat(w.fmt)
    if fmt == WeightFormat.FP8_BLOCK:
        if w.block is None:
            raise ValueError("fp8_block needs its block size")
        return int(w.block[0]), int(w.block[1])
    return (1, K) if fmt == WeightFormat.FP8_CHANNEL else (N, K)


def cpu_fp8_serves(x: torch.Tensor, *ws: QTensor) -> bool:
    """Whether the C fp8 kernels compute over `ws` for x: CPU tensors, fp8 formats, the kernels loaded."""
    if x.device.type != "cpu" or not x.is_floating_point():
        return False
    if any(WeightFormat(w.fmt) not in FP8_FORMATS or w.data.device.type != "cpu" for w in ws):
        return False
    from models.kernels import cpu_ops

    return cpu_ops.available()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def qlinear_cpu(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`qlinear` by the C fp8 kernel (x [..., K]; float32 math, the result in x's dtype)."""
    bn, bk = fp8_blocks(w)
    K = w.shape[-1]
    y = torch.ops.moe_serve.fp8_linear_cpu(_f32(x.reshape(-1, K)), w.data.contiguous(),
                                           _f32(w.scale).contiguous(), bn, bk, bias)
    return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)


def qmoe_cpu(x: torch.Tensor, w13: QTensor, w2: QTensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, *,
             b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, limit: float | None = None,
             alpha: float = 1.702, weight_on_input: bool = False) -> torch.Tensor:
    """`qmoe` by the C fp8 experts kernel (float32 math, the result in x's dtype)."""
    bn13, bk13 = fp8_blocks(w13)
    bn2, bk2 = fp8_blocks(w2)
    out = torch.ops.moe_serve.fp8_moe_cpu(_f32(x), topk_ids, topk_w, w13.data.contiguous(),
                                          _f32(w13.scale).contiguous(), bn13, bk13, w2.data.contiguous(),
                                          _f32(w2.scale).contiguous(), bn2, bk2, b13, b2,
                                          None if limit is None else float(limit), float(alpha), weight_on_input)
    return out.to(x.dtype)


def clamped_swiglu(h: torch.Tensor, inter: int, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss activation of h [n, 2I] (gate columns, then up columns) -> [n, I]."""
    gate = h[:, :inter].clamp(max=limit)
    up = h[:, inter:].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def qlinear(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None, triton: bool | None = None,
            cpu: bool | None = None) -> torch.Tensor:
    """x [M, K] @ w.T (+ bias) -> [M, N] in x.dtype; `triton`: the Triton kernel (None: on CUDA
    tensors; on CPU tensors it runs under TRITON_INTERPRET=1, which is how the CPU tests the CUDA path);
    `cpu`: the C fp8 kernel where it serves (None or True), or the torch reference (False)."""
    if x.is_cuda if triton is None else triton:
        from models.kernels.triton_qmoe import qlinear_triton

        return qlinear_triton(x, w, bias)
    if cpu is not False and cpu_fp8_serves(x, w):
        return qlinear_cpu(x, w, bias)
    return qlinear_reference(x, w, bias)


def qlinear_reference(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, w.dequant(x.dtype), None if bias is None else bias.to(x.dtype))


def qmoe(x: torch.Tensor, w13: QTensor, w2: QTensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, *,
         b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, limit: float | None = None,
         alpha: float = 1.702, weight_on_input: bool = False, triton: bool | None = None,
         cpu: bool | None = None) -> torch.Tensor:
    """[T, H] in x.dtype: the experts over quantized stacks (see the module docstring); `triton` and
    `cpu` as `qlinear`'s."""
    if x.is_cuda if triton is None else triton:
        from models.kernels.triton_qmoe import qmoe_triton

        return qmoe_triton(x, w13, w2, topk_ids, topk_w, b13=b13, b2=b2, limit=limit, alpha=alpha,
                           weight_on_input=weight_on_input)
    if cpu is not False and cpu_fp8_serves(x, w13, w2):
        return qmoe_cpu(x, w13, w2, topk_ids, topk_w, b13=b13, b2=b2, limit=limit, alpha=alpha,
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
