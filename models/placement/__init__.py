"""Expert placement: logical experts -> physical experts (replicas) -> devices.

- `plan`: the immutable placement model (`Placement`, `LayerPlan`, `PhysicalExpert`).
- `planner`: pure, deterministic planning (`plan()` balanced; `place()` for every policy).
- `executor`: runs each MoE layer's experts on their devices (`MoEBlock.executor`).
- `manager`: builds and installs both from the engine config, rebalances online, records traces.
- `trace`: routing trace files; `cost`: the host-tier (CPU) compute-vs-copy cost model.
See docs/placement.md.
"""

from models.placement.plan import (
           HOST_DEVICE,
           LayerPlan,
           PhysicalExpert,
           Placement,
           balancedness_of,
)
from models.placement.planner import POLICIES, default_capacity, place, plan

__all__ = ["HOST_DEVICE", "POLICIES", "LayerPlan", "PhysicalExpert", "Placement", "balancedness_of",
           "default_capacity", "place", "plan"]
