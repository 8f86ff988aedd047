"""Per-token routing in responses (`return_routing`): the engine's compact tensors as JSON lists.

`routing[t][layer]` lists token t's top-k expert ids in that MoE layer, best first;
`routing_weights[t][layer]` their router weights (4 decimals; 0 for an assignment dropped over
expert capacity). Engines may hand either tensors or nested lists; merged outputs hold `RowChunks` of them.
"""

from __future__ import annotations

from typing import Any

import torch

from server.engine.request import RowChunks

WEIGHT_DECIMALS = 4


def ids_json(ids: Any) -> list:
    if ids is None:
        return []
    if isinstance(ids, RowChunks):  # accumulated deltas
        return [row for chunk in ids for row in ids_json(chunk)]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def weights_json(weights: Any) -> list:
    if weights is None:
        return []
    if isinstance(weights, RowChunks):
        return [row for chunk in weights for row in weights_json(chunk)]
    if isinstance(weights, torch.Tensor):
        scale = 10.0**WEIGHT_DECIMALS
        return (weights.double() * scale).round().div(scale).tolist()
    return list(weights)


def routing_fields(ids: Any, weights: Any, prefix: str = "") -> dict[str, list]:
    """{'routing': ..., 'routing_weights': ...} (keys prefixed, e.g. 'prompt_')."""
    return {f"{prefix}routing": ids_json(ids), f"{prefix}routing_weights": weights_json(weights)}
