"""Routers: hidden states -> (top-k expert ids, routing weights), for every supported family.

One `Router` module covers the variants (`RouterConfig`):
- softmax over all experts, top-k, optional renormalisation (Mixtral, Qwen, OLMoE, DeepSeek-V2);
- softmax over the top-k logits (gpt-oss, with a router bias; Granite);
- sigmoid scores (DeepSeek-V3, GLM-4.5, MiniMax-M2; Llama 4's top-1 sigmoid);
- `e_score_correction_bias` added to the scores for the choice only, the weights staying the
  unbiased scores (DeepSeek-V3, GLM-4.5, MiniMax-M2; ERNIE 4.5 on softmax scores);
- group-limited top-k: only experts of the best `topk_group` of `n_group` groups are eligible,
  a group scored by its best expert (DeepSeek-V2 `group_limited_greedy`) or its best two summed
  (DeepSeek-V3 `noaux_tc`);
- `routed_scaling_factor` on the final weights.
`select_experts` is the PyTorch formulation; `select_experts_fused` the same in one kernel
(Triton on CUDA, C on the CPU), which the kernel plan gives the router where it can.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import RouterConfig


def select_experts(
    logits: torch.Tensor,  # [T, E] float32
    top_k: int,
    renormalize: bool,
    spec: RouterConfig,
    correction_bias: torch.Tensor | None = None,  # [E]
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (weights [T, k] float32, ids [T, k])."""
    if spec.scoring == "softmax_topk":
        top_logits, ids = torch.topk(logits, top_k, dim=-1)  # [T, k]
        weights = torch.softmax(top_logits, dim=-1)
        return weights * spec.scaling_factor if spec.scaling_factor != 1.0 else weights, ids
    scores = torch.softmax(logits, dim=-1) if spec.scoring == "softmax" else torch.sigmoid(logits)  # [T, E]
    choice = scores if correction_bias is None else scores + correction_bias.float()  # [T, E]
    if spec.n_group > 1 and spec.topk_group < spec.n_group:
        choice = _limit_groups(choice, spec)
    ids = torch.topk(choice, top_k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, ids)  # [T, k]: the unbiased scores
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=spec.renorm_min)
    if spec.scaling_factor != 1.0:
        weights = weights * spec.scaling_factor
    return weights, ids


def select_experts_fused(
    logits: torch.Tensor,  # [T, E] float32
    top_k: int,
    renormalize: bool,
    spec: RouterConfig,
    correction_bias: torch.Tensor | None,  # [E]
    kernel: str,  # "triton" (torch.ops.moe_serve.route_triton) | "cpu" (the C op moe_route_cpu)
) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_experts` in one kernel: the same ids (ties aside) and weights (to rounding)."""
    args = (correction_bias, top_k, spec.scoring, renormalize, spec.renorm_min, spec.n_group, spec.topk_group,
            spec.group_score, spec.scaling_factor)
    if kernel == "triton":
        from models.kernels import triton_router  # noqa: F401 - registers the op

        return torch.ops.moe_serve.route_triton(logits, *args)
    return torch.ops.moe_serve.moe_route_cpu(logits, *args)


def _limit_groups(choice: torch.Tensor, spec: RouterConfig) -> torch.Tensor:
    """Scores outside the best `topk_group` groups set to -inf (never chosen)."""
    T, E = choice.shape
    grouped = choice.view(T, spec.n_group, E // spec.n_group)  # [T, G, E/G]
    if spec.group_score == "max":
        group_scores = grouped.max(dim=-1).values  # [T, G]
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    best = torch.topk(group_scores, spec.topk_group, dim=-1).indices  # [T, topk_group]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(T, E)


class Router(nn.Module):
    """The gate projection (plus the correction bias, where a family has one) and `select_experts`."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, renormalize: bool, spec: RouterConfig):
        super().__init__()
        self.top_k, self.renormalize, self.spec = top_k, renormalize, spec
        self.keep_fp32 = spec.fp32  # stays float32 when the model moves to bf16 (MoEForCausalLM.restore_fp32_modules)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.bias = nn.Parameter(torch.empty(num_experts)) if spec.bias else None
        self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts)) if spec.correction_bias else None
        self.kernel: str | None = None  # the plan's fused choice ("triton" | "cpu"); None: select_experts

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H] -> [T, E] float32 (computed in float32 where the family's reference does)."""
        if self.spec.fp32:
            return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        return F.linear(x, self.weight, self.bias).float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(x)
        if self.kernel is not None:
            return select_experts_fused(logits, self.top_k, self.renormalize, self.spec, self.e_score_correction_bias,
                                        self.kernel)
        return select_experts(logits, self.top_k, self.renormalize, self.spec, self.e_score_correction_bias)
