"""Mixture-of-Experts feed-forward: router, grouped SwiGLU experts, optional shared expert.

The router variants live in `models/layers/router.py`. Experts are stored stacked: `w13 [E, 2 * I,
H]` (gate rows, then up rows) and `w2 [E, H, I]` (gpt-oss's biases ride as one more column).
Execution is grouped (`models.kernels.fused_moe`): the (token, slot) pairs are sorted by expert
and each expert's rows run as one GEMM, by the kernel the plan chose (`apply_kernels`), family
variants (biases, clamped SwiGLU, input scaling) included (`ExpertVariant`). No loop over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.kernels.fused_moe import ExpertVariant, fused_experts
from models.kernels.packed import PackedExperts, PackedWeight, packed_linear
from models.kernels.plan import CPU_KERNEL_PAIRS_PER_EXPERT, KernelPlan, LayerKernels, MoEKernel
from models.layers.capacity import apply_capacity
from models.layers.router import Router
from models.quant.stack import QStack, qmoe_stack


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


class DenseMLP(nn.Module):
    """SwiGLU MLP with gate and up fused: w13 [2I, H], w2 [H, I]."""

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.inter = inter
        self.w13 = nn.Linear(hidden, 2 * inter, bias=bias)
        self.w2 = nn.Linear(inter, hidden, bias=bias)
        # the kernel plan's quantized weights (--quantization: only these exist; apply_plan)
        self.packed: tuple[PackedWeight, PackedWeight] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            h = packed_linear(x, self.packed[0], self.w13.bias)
            return packed_linear(F.silu(h[:, : self.inter]) * h[:, self.inter :], self.packed[1], self.w2.bias)
        h = self.w13(x)  # [T, 2I]
        return self.w2(F.silu(h[:, : self.inter]) * h[:, self.inter :])


def expert_variant(cfg) -> ExpertVariant | None:
    """The family's expert variant, or None for plain SwiGLU experts."""
    if not (cfg.expert_bias or cfg.swiglu_limit is not None or cfg.expert_input_scaling):
        return None
    return ExpertVariant(bias=cfg.expert_bias, limit=cfg.swiglu_limit, alpha=cfg.swiglu_alpha,
                         weight_on_input=cfg.expert_input_scaling)


class PlacedExpertsFn:
    """How the placement executor computes a device's subset of a layer's experts: the plan's
    kernel for that device type. Where that is the C kernel (`c_kernel`), the executor keeps a
    packed copy of the subset and calls it itself; this function then serves the batches above
    the C kernel's sizes, with the loop. Stacks kept in a checkpoint's quantized format (`QStack`)
    are computed by `models.quant.ops.qmoe` (`qmoe_stack`) on every device type."""

    def __init__(self, plan: KernelPlan, variant: ExpertVariant | None):
        self.kernels = dict(plan.placed_moe)
        self.variant = variant

    def c_kernel(self, device_type: str) -> bool:
        return self.kernels.get(device_type) == MoEKernel.CPU

    def __call__(self, x, w13, w2, topk_ids, topk_w) -> torch.Tensor:
        if isinstance(w13, QStack):  # kept in the checkpoint's format: `qmoe` on any device
            return qmoe_stack(x, w13, w2, topk_ids, topk_w, self.variant)
        kernel = self.kernels[w13.device.type]
        if kernel == MoEKernel.CPU:
            kernel = MoEKernel.LOOP
        return fused_experts(x, w13, w2, topk_ids, topk_w, kernel, self.variant)


class MoEBlock(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.renormalize = cfg.norm_topk_prob
        # LongCat: the router also scores `zero_experts` zero-computation experts (ids num_experts
        # and up), each of which returns its input times its routing weight
        self.zero_experts = cfg.zero_experts
        H, inter = cfg.hidden_size, cfg.moe_intermediate_size
        extra = 1 if cfg.expert_bias else 0  # gpt-oss: the bias rides as a last input column
        self.gate = Router(H, self.num_experts + self.zero_experts, self.top_k, cfg.norm_topk_prob, cfg.router)
        self.w13 = nn.Parameter(torch.empty(self.num_experts, 2 * inter, H + extra))
        self.w2 = nn.Parameter(torch.empty(self.num_experts, H, inter + extra))
        self.variant = expert_variant(cfg)
        shared = cfg.shared_expert_intermediate_size
        self.shared = DenseMLP(H, shared, bias=cfg.mlp_bias) if shared else None
        self.shared_gate = nn.Linear(H, 1, bias=False) if cfg.shared_expert_gate else None
        # set by models.placement to run experts on other devices; None: all local
        self.executor = None
        # Switch-style expert capacity per forward pass (models/layers/capacity.py); None: off
        self.capacity_factor: float | None = None
        # the kernel plan's choices (apply_kernels): the kernel, the one above the C kernel's
        # batch size, their packed weight copies (CPU), the placement executor's function
        self.kernel: MoEKernel | None = None
        self.kernel_large: MoEKernel | None = None
        self.packed_w13: list[PackedWeight] | None = None
        self.packed_experts: PackedExperts | None = None
        self.placed_fn: PlacedExpertsFn | None = None

    def apply_kernels(self, kernels: LayerKernels, plan: KernelPlan, packed_w13: list[PackedWeight] | None,
                      packed_experts: PackedExperts | None) -> None:
        self.kernel, self.kernel_large = kernels.moe, kernels.moe_large
        self.gate.kernel = None if kernels.router == "reference" else kernels.router
        self.packed_w13, self.packed_experts = packed_w13, packed_experts
        self.placed_fn = PlacedExpertsFn(plan, self.variant)

    def _zero_experts(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor):
        """(ids, weights, identity output [T, H]): the zero-computation assignments' weights summed
        into one input scaling; in the expert pass they become real ids with weight 0 (spread over
        the experts as the reference does), so every expert kernel and the placement executor
        see only real ids."""
        E, Z = self.num_experts, self.zero_experts
        zero = topk_ids >= E  # [T, k]
        # in float32 (the weights' dtype), then the model dtype, as the reference rounds it
        identity = (x * topk_w.masked_fill(~zero, 0.0).sum(dim=-1, keepdim=True)).to(x.dtype)  # [T, H]
        ids = torch.where(zero, (topk_ids - E) * E // Z, topk_ids)
        return ids, topk_w.masked_fill(zero, 0.0), identity

    def forward(self, x: torch.Tensor, capture: RoutingCapture | None = None) -> torch.Tensor:
        topk_w, topk_ids = self.gate(x)  # [T, k] each
        dropped = None
        if self.capacity_factor is not None:
            topk_w, dropped = apply_capacity(topk_ids, topk_w, self.num_experts + self.zero_experts,
                                             self.capacity_factor)
        if capture is not None:  # zero-computation experts recorded under their own ids (>= num_experts)
            capture.record(self.layer_idx, topk_ids, topk_w, dropped)
        identity = None
        if self.zero_experts:
            topk_ids, topk_w, identity = self._zero_experts(x, topk_ids, topk_w)
        join = None
        if self.executor is not None:  # launched; the CPU tier computes while the shared expert runs
            join = self.executor.start(self.layer_idx, x, topk_ids, topk_w)
            out = None
        else:
            kernel = self.kernel
            if self.kernel_large is not None and topk_ids.numel() > CPU_KERNEL_PAIRS_PER_EXPERT * self.num_experts:
                kernel = self.kernel_large  # the plan's rule: past the C kernel's batch sizes
            out = fused_experts(x, self.w13, self.w2, topk_ids, topk_w, kernel, self.variant, self.packed_w13,
                                self.packed_experts)
        shared = None
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
        if join is not None:
            out = join()
        if identity is not None:
            out = out + identity
        if shared is not None:
            out = out + shared
        return out
