"""Expert placement: logical experts -> physical experts (replicas) -> devices.

- `plan`: the immutable placement model (`Placement`, `LayerPlan`, `PhysicalExpert`).
- `planner`: pure, deterministic planning (`plan()` balanced; `place()` for every policy).
- `executor`: runs each MoE layer's experts on their devices (`MoEBlock.executor`).
The engine side (the manager that installs and rebalances a placement, routing traces, the
host-tier cost model) is `server/engine/native/placement/`: this package imports nothing from
`server/`.
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
