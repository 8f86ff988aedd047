"""Expert variants beside the plain SwiGLU `grouped_experts` (models/layers/moe.py).

- gpt-oss: experts with biases and the clamped SwiGLU
  `(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)` with `g = clamp(gate, max=limit)`.
  The biases travel inside the weight stacks as one extra input column (`w13 [E, 2I, H + 1]`,
  `w2 [E, H, I + 1]`, the bias last), so expert placement and stacking code moves one tensor
  per projection exactly as for bias-free experts.
- Llama 4: the routing weight scales the expert's input, not its output.

`expert_function(cfg)` picks the function a family needs; it has `grouped_experts`' signature,
so an MoE block and the placement executor call it the same way. The grouping is the same: the
(token, slot) pairs are sorted by expert and each active expert runs one matmul pair over its
contiguous slice.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from models.kernels.moe_align import expert_runs, sort_pairs
from models.layers.moe import grouped_experts

ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def clamped_swiglu(h: torch.Tensor, inter: int, alpha: float, limit: float) -> torch.Tensor:
    """gpt-oss activation of h [n, 2I] (gate columns, then up columns) -> [n, I]."""
    gate = h[:, :inter].clamp(max=limit)
    up = h[:, inter:].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def grouped_experts_variant(
    x, w13, w2, topk_ids, topk_w,  # shapes as grouped_experts; with `biased` w13 [E, 2I, H + 1], w2 [E, H, I + 1]
    *,
    biased: bool = False,
    limit: float | None = None,
    alpha: float = 1.702,
    weight_on_input: bool = False,
) -> torch.Tensor:
    """sum_k w[t, k] * Expert_{ids[t, k]}(x[t]) (or Expert(w[t, k] * x[t]) with weight_on_input)."""
    H = x.shape[1]
    inter = w2.shape[-1] - (1 if biased else 0)
    order, token_of, counts = sort_pairs(topk_ids, w13.shape[0])  # pairs sorted by expert
    pair_w = topk_w.reshape(-1)[order].to(x.dtype)[:, None]  # [T * k, 1]
    xs = x.index_select(0, token_of)  # [T * k, H]
    if weight_on_input:
        xs = xs * pair_w
    ys = torch.empty_like(xs)
    for e, start, end in expert_runs(counts):
        if biased:
            h = F.linear(xs[start:end], w13[e, :, :H], w13[e, :, H])  # [n, 2I]
        else:
            h = F.linear(xs[start:end], w13[e])  # [n, 2I]
        a = F.silu(h[:, :inter]) * h[:, inter:] if limit is None else clamped_swiglu(h, inter, alpha, limit)  # [n, I]
        if biased:
            ys[start:end] = F.linear(a, w2[e, :, :inter], w2[e, :, inter])  # [n, H]
        else:
            ys[start:end] = F.linear(a, w2[e])
    if not weight_on_input:
        ys = ys * pair_w
    return torch.zeros_like(x).index_add_(0, token_of, ys)


def expert_function(cfg) -> ExpertFn:
    """The expert computation a model config needs (plain SwiGLU unless a variant is set)."""
    if not (cfg.expert_bias or cfg.swiglu_limit is not None or cfg.expert_input_scaling):
        return grouped_experts
    return functools.partial(grouped_experts_variant, biased=cfg.expert_bias, limit=cfg.swiglu_limit,
                             alpha=cfg.swiglu_alpha, weight_on_input=cfg.expert_input_scaling)
