"""Routing ids -> how many tokens each expert got: the one count both engines and the output
processor use (per step, per sequence, per request)."""

from __future__ import annotations

import torch


def expert_counts(routing, num_experts: int, segments: torch.Tensor | None = None,
                  num_segments: int = 1) -> torch.Tensor:
    """[T, L, k] expert ids (a tensor, or anything `torch.as_tensor` takes) -> [S, L, E] int64
    counts on their device, the tokens grouped by `segments` [T] (values < S; default: one
    group). Ids outside [0, E) count nowhere. One scatter, no host sync."""
    routing = torch.as_tensor(routing)
    T, L, k = routing.shape
    E = num_experts
    ids = routing.to(torch.int64)
    valid = (ids >= 0) & (ids < E)  # [T, L, k]
    seg = torch.zeros(T, dtype=torch.int64, device=ids.device) if segments is None else segments.to(torch.int64)
    layer = torch.arange(L, device=ids.device)[None, :, None]  # [1, L, 1]
    flat = ((seg[:, None, None] * L + layer) * E + ids).where(valid, 0).reshape(-1)  # [T * L * k]
    counts = torch.zeros(num_segments * L * E, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, valid.reshape(-1).to(torch.int64))
    return counts.view(num_segments, L, E)
