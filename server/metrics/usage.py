"""The per-request MoE usage summary returned in a response's `usage.moe`.

From the engine's per-request counts of token-expert assignments per (MoE layer, expert):
how many distinct experts each layer used, how evenly the request spread over them (routing
entropy, in bits; log2(num_experts) is perfectly even, 0 is one expert), and the share of
expert computations each device served (GPU vs the CPU tier under expert placement).
"""

from __future__ import annotations

import math
from typing import Any
from collections.abc import Iterable


def moe_usage(metrics: Iterable[Any]) -> dict[str, Any] | None:
    """Summary over one or more finished engine requests' `RequestMetrics`; None when the
    engine did not observe routing."""
    counts: list[list[int]] | None = None
    devices: dict[str, int] = {}
    dropped: int | None = None
    zero: int | None = None
    for m in metrics:
        if m is None or m.expert_counts is None:
            continue
        if getattr(m, "num_dropped_assignments", None) is not None:
            dropped = (dropped or 0) + m.num_dropped_assignments
        if getattr(m, "num_zero_expert_assignments", None) is not None:
            zero = (zero or 0) + m.num_zero_expert_assignments
        if counts is None:
            counts = [list(row) for row in m.expert_counts]
        else:
            counts = [[a + b for a, b in zip(r1, r2)] for r1, r2 in zip(counts, m.expert_counts)]
        for dev, n in (m.device_expert_tokens or {}).items():
            devices[dev] = devices.get(dev, 0) + n
    if counts is None:
        return None
    entropies = []
    for row in counts:
        total = sum(row)
        entropies.append(-sum(c / total * math.log2(c / total) for c in row if c) if total else 0.0)
    assignments = sum(sum(row) for row in counts)
    dev_total = sum(devices.values())
    summary = {
        "expert_assignments": assignments,
        "distinct_experts_per_layer": [sum(1 for c in row if c) for row in counts],
        "routing_entropy_bits": round(sum(entropies) / len(entropies), 4) if entropies else 0.0,
        "max_routing_entropy_bits": round(math.log2(len(counts[0])), 4) if counts and counts[0] else 0.0,
        "device_share": {d: round(n / dev_total, 4) for d, n in sorted(devices.items())} if dev_total else {},
    }
    if dropped is not None:  # only when the engine runs with an expert capacity
        summary["dropped_assignments"] = dropped
    if zero is not None:  # only for models with zero-computation experts (LongCat)
        summary["zero_expert_assignments"] = zero
    return summary
