"""Expert capacity (Switch Transformer / GShard): at most `capacity` token assignments per
expert per forward pass; assignments past it are dropped (the token keeps its other experts
and its residual path).

capacity = ceil(capacity_factor * num_tokens * top_k / num_experts). Assignments are served in
priority order: every token's first choice before any second choice, and within one choice
rank in token order (GShard's slot-major priority), so a token loses its lower-ranked experts
first. Computed on the device with a sort, no host sync.
"""

from __future__ import annotations

import math

import torch


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def apply_capacity(
    topk_ids: torch.Tensor,  # [T, k]
    topk_w: torch.Tensor,  # [T, k]
    num_experts: int,
    capacity_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights with dropped assignments zeroed [T, k], dropped mask [T, k] bool)."""
    T, k = topk_ids.shape
    capacity = expert_capacity(T, k, num_experts, capacity_factor)
    slot_major = topk_ids.t().reshape(-1)  # [k * T]: all first choices, then all second ...
    order = torch.argsort(slot_major, stable=True)  # [k * T] grouped by expert, priority kept
    counts = torch.bincount(slot_major, minlength=num_experts)  # [E]
    group_start = torch.cumsum(counts, 0) - counts  # [E]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device) - group_start[slot_major[order]]
    dropped = (rank >= capacity).view(k, T).t()  # [T, k]
    return topk_w.masked_fill(dropped, 0.0), dropped
