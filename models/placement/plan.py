"""The placement model: logical experts -> physical experts (replicas) -> devices.

A *logical* expert is the model's expert index; a *physical* expert is one placed copy of it
on a device (replica 0 is the first copy, replicas 1.. are redundant copies of hot experts).
`LayerPlan` holds one MoE layer's physical experts and the inverse map; `Placement` holds
every MoE layer plus the device list. Both are immutable: a rebalance builds a new one.

Layers are numbered by MoE-layer ordinal (0 .. num_moe_layers - 1), the same index the
routing statistics and the `moe_expert_*` metrics use.

Devices are placement names: `cuda:N`, `cpu` (the host tier for experts beyond the GPU
budget) and, for tests and simulation, *virtual* devices `cpu:N` that are distinct placement
devices all backed by host memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

HOST_DEVICE = "cpu"


@dataclass(frozen=True)
class PhysicalExpert:
    logical: int  # the model's expert index
    device: str  # placement device name
    replica: int  # 0 .. num_replicas(logical) - 1


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer: its physical experts (slots), and logical -> physical slots."""

    num_logical: int
    physical: tuple[PhysicalExpert, ...]
    replicas: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        reps: list[list[tuple[int, int]]] = [[] for _ in range(self.num_logical)]
        for slot, p in enumerate(self.physical):
            if not 0 <= p.logical < self.num_logical:
                raise ValueError(f"physical expert {p} names a logical expert outside 0..{self.num_logical - 1}")
            reps[p.logical].append((p.replica, slot))
        for e, r in enumerate(reps):
            if not r:
                raise ValueError(f"logical expert {e} has no physical copy")
            if sorted(x for x, _ in r) != list(range(len(r))):
                raise ValueError(f"logical expert {e} has replica indices {sorted(x for x, _ in r)}, "
                                 f"expected 0..{len(r) - 1}")
            devices = [self.physical[s].device for _, s in r]
            if len(set(devices)) != len(devices):
                raise ValueError(f"logical expert {e} has two replicas on one device ({devices})")
        object.__setattr__(self, "replicas", tuple(tuple(s for _, s in sorted(r)) for r in reps))

    @property
    def num_physical(self) -> int:
        return len(self.physical)

    def num_replicas(self, logical: int) -> int:
        return len(self.replicas[logical])

    def device_slots(self, device: str) -> list[int]:
        """Physical slots on `device`, in slot order (the order of that device's weight stack)."""
        return [s for s, p in enumerate(self.physical) if p.device == device]

    def device_logicals(self, device: str) -> tuple[int, ...]:
        return tuple(self.physical[s].logical for s in self.device_slots(device))

    def device_loads(self, load: np.ndarray, devices: tuple[str, ...]) -> np.ndarray:
        """Expected load per device: an expert's load split evenly over its replicas."""
        load = np.asarray(load, dtype=np.float64)  # [num_logical]
        index = {d: i for i, d in enumerate(devices)}
        out = np.zeros(len(devices))  # [num_devices]
        for p in self.physical:
            if p.device in index:
                out[index[p.device]] += load[p.logical] / len(self.replicas[p.logical])
        return out


def balancedness_of(device_loads: np.ndarray) -> float:
    """mean / max over devices (1.0 = perfectly balanced; 1.0 too when there is no load)."""
    peak = float(np.max(device_loads)) if len(device_loads) else 0.0
    return 1.0 if peak <= 0 else float(np.mean(device_loads)) / peak


@dataclass(frozen=True)
class Placement:
    devices: tuple[str, ...]  # compute devices (balanced over), in order
    layers: tuple[LayerPlan, ...]
    policy: str = "contiguous"
    host: str | None = None  # overflow tier for experts beyond the devices' capacity

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a placement needs at least one MoE layer")
        known = set(self.all_devices)
        for i, layer in enumerate(self.layers):
            for p in layer.physical:
                if p.device not in known:
                    raise ValueError(f"layer {i}: physical expert {p} is on unknown device {p.device!r}")

    @property
    def all_devices(self) -> tuple[str, ...]:
        return self.devices + ((self.host,) if self.host is not None else ())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_logical(self) -> int:
        return self.layers[0].num_logical

    @property
    def num_replicas_used(self) -> int:
        """Redundant physical experts (beyond one per logical expert), over all layers."""
        return sum(layer.num_physical - layer.num_logical for layer in self.layers)

    def rows(self) -> list[tuple[int, int, str, int]]:
        """(layer, expert, device, replica) for every physical expert (PlacementInfo rows)."""
        return [(i, p.logical, p.device, p.replica) for i, layer in enumerate(self.layers) for p in layer.physical]

    def slots_per_device(self) -> dict[str, list[int]]:
        """device -> number of physical experts it holds in each layer."""
        return {d: [len(layer.device_slots(d)) for layer in self.layers] for d in self.all_devices}

    def device_loads(self, loads: np.ndarray) -> np.ndarray:
        """[num_layers, len(all_devices)] expected load per device."""
        loads = self._check_loads(loads)
        return np.stack([layer.device_loads(row, self.all_devices) for layer, row in zip(self.layers, loads)])

    def layer_balancedness(self, loads: np.ndarray) -> np.ndarray:
        """[num_layers] mean/max load over the compute devices (the host tier excluded)."""
        per_dev = self.device_loads(loads)[:, : len(self.devices)]
        return np.array([balancedness_of(row) for row in per_dev])

    def balancedness(self, loads: np.ndarray) -> float:
        """Mean over layers of mean/max device load."""
        return float(np.mean(self.layer_balancedness(loads)))

    def host_fraction(self, loads: np.ndarray) -> float:
        """Share of the load that lands on the host tier (0 without one)."""
        if self.host is None:
            return 0.0
        per_dev = self.device_loads(loads)
        total = per_dev.sum()
        return 0.0 if total <= 0 else float(per_dev[:, -1].sum() / total)

    def moved_experts(self, old: Placement) -> int:
        """Physical experts present here but not in `old` (per layer and device): weights to copy."""
        moved = 0
        for new_layer, old_layer in zip(self.layers, old.layers):
            before = {(p.logical, p.device) for p in old_layer.physical}
            moved += sum((p.logical, p.device) not in before for p in new_layer.physical)
        return moved

    def _check_loads(self, loads: np.ndarray) -> np.ndarray:
        loads = np.asarray(loads, dtype=np.float64)
        if loads.shape != (self.num_layers, self.num_logical):
            raise ValueError(f"loads must have shape {(self.num_layers, self.num_logical)}, got {loads.shape}")
        return loads
