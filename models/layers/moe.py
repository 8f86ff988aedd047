"""Mixture-of-Experts feed-forward: router, grouped SwiGLU experts, optional shared expert.

The router variants live in `models/layers/router.py`, expert variants (biases, clamped SwiGLU,
input scaling) in `models/layers/experts.py`.

Experts are stored stacked: `w13 [E, 2 * I, H]` (gate rows, then up rows) and
`w2 [E, H, I]`. Execution is grouped (`models.kernels.fused_moe`): the (token, slot) pairs
are sorted by expert and each expert's rows run as one GEMM (a fused Triton grouped GEMM or
`torch._grouped_mm` on CUDA, one matmul per active expert on CPU); no loop over tokens.
Family variants (biases, clamped SwiGLU, input scaling) keep the PyTorch path of experts.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.kernels import KernelConfig, cpu_moe
from models.kernels.fused_moe import fused_experts
from models.layers.capacity import apply_capacity
from models.layers.router import Router


class RoutingCapture:
    """Collects the router's choices per MoE layer during one forward pass, when asked."""

    def __init__(self, with_weights: bool = False):
        self.with_weights = with_weights
        self.expert_ids: dict[int, torch.Tensor] = {}  # layer -> [num_tokens, top_k]
        self.weights: dict[int, torch.Tensor] = {}  # layer -> [num_tokens, top_k]
        self.dropped: dict[int, torch.Tensor] = {}  # layer -> [num_tokens, top_k] bool (expert capacity)

    def record(self, layer: int, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
               dropped: torch.Tensor | None = None) -> None:
        self.expert_ids[layer] = topk_ids
        if self.with_weights:
            self.weights[layer] = topk_weights
        if dropped is not None:
            self.dropped[layer] = dropped

    def stacked_ids(self) -> torch.Tensor:
        """[num_tokens, num_moe_layers, top_k] in layer order."""
        return torch.stack([self.expert_ids[k] for k in sorted(self.expert_ids)], dim=1)

    def stacked_weights(self) -> torch.Tensor | None:
        """[num_tokens, num_moe_layers, top_k] router weights (after capacity), or None."""
        if not self.weights:
            return None
        return torch.stack([self.weights[k] for k in sorted(self.weights)], dim=1)

    def stacked_dropped(self) -> torch.Tensor | None:
        """[num_tokens, num_moe_layers, top_k] dropped assignments, or None (no capacity limit)."""
        if not self.dropped:
            return None
        return torch.stack([self.dropped[k] for k in sorted(self.dropped)], dim=1)


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts, top-k, optional renormalisation -> (weights [T, k] float32, ids [T, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    topk_w, topk_ids = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if renormalize:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
    return topk_w, topk_ids


def grouped_experts(
    x, w13, w2, topk_ids, topk_w,  # [T, H], [E, 2I, H], [E, H, I], [T, k], [T, k]
    backend: str | None = None,
    packed_w13=None,  # CPU "loop" backend: [E] oneDNN-packed gate+up weights (models.kernels.cpu_linear)
    packed_experts=None,  # CPU "cpu" backend: the C kernel's packed weights (models.kernels.cpu_moe)
) -> torch.Tensor:
    """sum_k w[t, k] * Expert_{ids[t, k]}(x[t]) for every token, grouped by expert.
    `backend`: a `models.kernels.MOE_BACKENDS` name; None picks by device and dtype."""
    if backend is None or backend == "auto":
        backend = KernelConfig().moe_backend(x.device, x.dtype)
    return fused_experts(x, w13, w2, topk_ids, topk_w, backend, packed_w13, packed_experts)


class DenseMLP(nn.Module):
    """SwiGLU MLP with gate and up fused: w13 [2I, H], w2 [H, I]."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.inter = inter
        self.w13 = nn.Linear(hidden, 2 * inter, bias=bias)
        self.w2 = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w13(x)  # [T, 2I]
        return self.w2(F.silu(h[:, : self.inter]) * h[:, self.inter :])


class MoEBlock(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        from models.layers.experts import expert_function  # experts.py builds on grouped_experts above

        self.layer_idx = layer_idx
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.renormalize = cfg.norm_topk_prob
        H, inter = cfg.hidden_size, cfg.moe_intermediate_size
        extra = 1 if cfg.expert_bias else 0  # gpt-oss: the bias rides as a last input column
        self.gate = Router(H, self.num_experts, self.top_k, cfg.norm_topk_prob, cfg.router)
        self.w13 = nn.Parameter(torch.empty(self.num_experts, 2 * inter, H + extra))
        self.w2 = nn.Parameter(torch.empty(self.num_experts, H, inter + extra))
        # (x, w13, w2, topk_ids, topk_w) -> [T, H]: grouped_experts or a family's variant
        self.expert_fn = expert_function(cfg)
        shared = cfg.shared_expert_intermediate_size
        self.shared = DenseMLP(H, shared, bias=cfg.mlp_bias) if shared else None
        self.shared_gate = nn.Linear(H, 1, bias=False) if cfg.shared_expert_gate else None
        # set by models.placement to run experts on other devices; None: all local
        self.executor = None
        # Switch-style expert capacity per forward pass (models/layers/capacity.py); None: off
        self.capacity_factor: float | None = None
        self.moe_backend = "auto"  # resolved on first use, or set by MoEForCausalLM.set_kernels
        self.packed_w13 = None  # CPU: oneDNN-packed gate+up weights per expert (set_kernels)
        self.packed_experts = None  # CPU "cpu" backend: the C kernel's packed w13 and w2 (set_kernels)

    def set_kernels(self, kernels: KernelConfig, device: torch.device, dtype: torch.dtype) -> None:
        """Plain SwiGLU experts get the configured kernel; a family variant keeps experts.py."""
        self.moe_backend = kernels.moe_backend(device, dtype) if self.expert_fn is grouped_experts else "variant"
        if self.moe_backend == "cpu" and not cpu_moe.supports(self.w13, self.w2):
            self.moe_backend = "loop"  # e.g. sizes that are not multiples of the kernel's panel

    def forward(self, x: torch.Tensor, capture: RoutingCapture | None = None) -> torch.Tensor:
        topk_w, topk_ids = self.gate(x)  # [T, k] each
        dropped = None
        if self.capacity_factor is not None:
            topk_w, dropped = apply_capacity(topk_ids, topk_w, self.num_experts, self.capacity_factor)
        if capture is not None:
            capture.record(self.layer_idx, topk_ids, topk_w, dropped)
        if self.executor is not None:
            out = self.executor(self.layer_idx, x, topk_ids, topk_w)
        else:
            if self.moe_backend == "auto":
                self.set_kernels(KernelConfig(), x.device, x.dtype)
            if self.moe_backend == "variant":
                out = self.expert_fn(x, self.w13, self.w2, topk_ids, topk_w)
            else:
                out = grouped_experts(x, self.w13, self.w2, topk_ids, topk_w, self.moe_backend, self.packed_w13,
                                      self.packed_experts)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        return out
