"""Planning a placement from load statistics: pure, deterministic functions of their inputs.

`plan()` is the balanced planner, in the spirit of DeepSeek's EPLB:
1. pick the experts that stay on the compute devices (all of them, or with a host tier and
   too little capacity the hottest ones; the rest go to the host tier);
2. hand the redundant slots out one at a time to the expert with the highest load per
   replica (max load per physical expert is what bounds a device);
3. pack the physical experts (weight = load / replicas) onto devices, heaviest first, each to
   the least-loaded device that has a free slot and no copy of that expert yet (greedy
   longest-processing-time with capacities), then improve by moving/swapping pairs out of the
   most-loaded device while that lowers the pair's maximum.
Objective: balancedness = mean device load / max device load, per layer.

`place()` dispatches on the policy: `contiguous` and `round_robin` put one copy of each
resident expert by index (equal contiguous ranges / cyclically), then add replicas of the
hottest experts where load is lowest; `balanced` is `plan()`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.placement.plan import LayerPlan, PhysicalExpert, Placement, balancedness_of

POLICIES = ("contiguous", "round_robin", "balanced")
_REFINE_ROUNDS = 64


# -- validation ---------------------------------------------------------------------------
def _check(loads, devices, capacity, num_redundant, host) -> tuple[np.ndarray, list[str], list[int]]:
    arr = np.asarray(loads, dtype=np.float64) if not isinstance(loads, np.ndarray) else loads.astype(np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"loads must be a non-empty [num_layers, num_experts] array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("loads must be finite and >= 0")
    devices = list(devices)
    if not devices:
        raise ValueError("at least one device is needed")
    if any(not isinstance(d, str) or not d for d in devices):
        raise ValueError(f"devices must be non-empty strings, got {devices!r}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices must be distinct, got {devices!r}")
    if host is not None and host in devices:
        raise ValueError(f"the host tier {host!r} cannot also be a compute device")
    capacity = list(capacity)
    if len(capacity) != len(devices):
        raise ValueError(f"capacity_per_device has {len(capacity)} entries for {len(devices)} devices")
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 0 for c in capacity):
        raise ValueError(f"capacity_per_device must be integers >= 0, got {capacity!r}")
    if isinstance(num_redundant, bool) or not isinstance(num_redundant, (int, np.integer)) or num_redundant < 0:
        raise ValueError(f"num_redundant must be an integer >= 0, got {num_redundant!r}")
    num_experts = arr.shape[1]
    slots = sum(capacity)
    usable = sum(1 for c in capacity if c > 0)
    if host is None:
        if slots < num_experts + num_redundant:
            raise ValueError(f"{num_experts} experts + {num_redundant} redundant need {num_experts + num_redundant} "
                             f"slots per layer, but the devices hold {slots} ({capacity}); raise the capacity, "
                             f"lower the redundancy or give a host tier")
        if num_redundant > num_experts * (usable - 1):
            raise ValueError(f"{num_redundant} redundant experts do not fit: with {usable} device(s) an expert can "
                             f"have at most {usable - 1} extra replica(s) ({num_experts * (usable - 1)} in all)")
    return arr, devices, [int(c) for c in capacity]


def default_capacity(num_experts: int, num_redundant: int, num_devices: int) -> list[int]:
    """Equal slots per device, enough for every physical expert (EPLB's layout)."""
    per = -(-(num_experts + num_redundant) // num_devices)
    return [per] * num_devices


# -- steps ----------------------------------------------------------------------------------
def _residents(load: np.ndarray, slots: int, host) -> list[int]:
    """Logical experts kept on the compute devices: all, or the hottest `slots` of them."""
    n = len(load)
    if host is None or slots >= n:
        return list(range(n))
    hottest = sorted(range(n), key=lambda e: (-load[e], e))[:slots]
    return sorted(hottest)


def replicate(load: np.ndarray, experts: Sequence[int], num_redundant: int, max_replicas: int) -> dict[int, int]:
    """Replica count per expert: each extra slot to the expert with the most load per replica."""
    counts = {e: 1 for e in experts}
    for _ in range(num_redundant):
        best, best_w = None, -1.0
        for e in experts:  # ascending index: ties go to the lowest
            if counts[e] < max_replicas and load[e] / counts[e] > best_w:
                best, best_w = e, load[e] / counts[e]
        if best is None:
            break
        counts[best] += 1
    return counts


def _items(load: np.ndarray, counts: dict[int, int]) -> list[tuple[float, int]]:
    """One (weight, logical) per physical expert, heaviest first, ties by index."""
    items = [(load[e] / c, e) for e, c in counts.items() for _ in range(c)]
    return sorted(items, key=lambda it: (-it[0], it[1]))


class _Bins:
    """Devices being filled: load, held experts, free slots."""

    def __init__(self, capacity: list[int]):
        self.cap = capacity
        self.load = [0.0] * len(capacity)
        self.held: list[list[int]] = [[] for _ in capacity]

    def free(self, d: int) -> bool:
        return len(self.held[d]) < self.cap[d]

    def add(self, d: int, e: int, w: float) -> None:
        self.held[d].append(e)
        self.load[d] += w

    def best(self, e: int, candidates=None) -> int | None:
        """Least-loaded device with a free slot and no copy of e (ties: fewer experts, lower index)."""
        ok = [d for d in (candidates if candidates is not None else range(len(self.cap)))
              if self.free(d) and e not in self.held[d]]
        return min(ok, key=lambda d: (self.load[d], len(self.held[d]), d)) if ok else None


def _lpt(load: np.ndarray, counts: dict[int, int], bins: _Bins) -> None:
    dropped = 0
    for w, e in _items(load, counts):
        d = bins.best(e)
        if d is None:  # every device with room already holds e: this replica goes elsewhere
            counts[e] -= 1
            dropped += 1
            continue
        bins.add(d, e, w)
    _top_up(load, counts, bins, dropped)


def _top_up(load: np.ndarray, counts: dict[int, int], bins: _Bins, n: int) -> None:
    """Add up to n replicas, each to the expert with the most load per replica that still has a
    device with a free slot and no copy of it (to that device's least-loaded choice)."""
    for _ in range(n):
        best = None
        for e in sorted(counts, key=lambda e: (-load[e] / counts[e], e)):
            d = bins.best(e)
            if d is not None:
                best = (e, d)
                break
        if best is None:
            break
        e, d = best
        counts[e] += 1
        bins.add(d, e, load[e] / counts[e])
    _reweigh(load, counts, bins)


def _reweigh(load: np.ndarray, counts: dict[int, int], bins: _Bins) -> None:
    bins.load = [sum(load[e] / counts[e] for e in held) for held in bins.held]


def _refine(load: np.ndarray, counts: dict[int, int], bins: _Bins) -> None:
    """Move or swap one expert out of the most-loaded device while that lowers the pair's max."""
    w = lambda e: load[e] / counts[e]
    for _ in range(_REFINE_ROUNDS):
        src = max(range(len(bins.cap)), key=lambda d: (bins.load[d], -d))
        best = None  # (new pair max, dst, index in src, index in dst or -1)
        for dst in range(len(bins.cap)):
            if dst == src:
                continue
            for i, e in enumerate(bins.held[src]):
                if e in bins.held[dst]:
                    continue
                if bins.free(dst):
                    cand = (max(bins.load[src] - w(e), bins.load[dst] + w(e)), dst, i, -1)
                    if cand[0] < bins.load[src] - 1e-12 and (best is None or cand < best):
                        best = cand
                for j, f in enumerate(bins.held[dst]):
                    if f in bins.held[src] or w(f) >= w(e):
                        continue
                    delta = w(e) - w(f)
                    cand = (max(bins.load[src] - delta, bins.load[dst] + delta), dst, i, j)
                    if cand[0] < bins.load[src] - 1e-12 and (best is None or cand < best):
                        best = cand
        if best is None:
            return
        _, dst, i, j = best
        e = bins.held[src].pop(i)
        if j >= 0:
            f = bins.held[dst].pop(j)
            bins.held[src].append(f)
        bins.held[dst].append(e)
        _reweigh(load, counts, bins)


def _relabel(bins: _Bins, old: LayerPlan, devices: list[str]) -> None:
    """Permute the packed bins among devices of equal capacity to maximise the experts that stay
    put (greedy on the overlap, largest first; ties by device index)."""
    old_sets = [set(old.device_logicals(d)) for d in devices]
    n = len(devices)
    overlap = sorted((-len(old_sets[d] & set(bins.held[b])), b, d) for b in range(n) for d in range(n)
                      if bins.cap[b] == bins.cap[d])
    target: dict[int, int] = {}
    taken: set[int] = set()
    for _, b, d in overlap:
        if b not in target and d not in taken:
            target[b] = d
            taken.add(d)
    held, load = list(bins.held), list(bins.load)
    for b, d in target.items():
        bins.held[d], bins.load[d] = held[b], load[b]


def _layer_plan(num_logical: int, devices: list[str], bins: _Bins, counts: dict[int, int],
                residents: list[int], host: str | None) -> LayerPlan:
    """Physical experts ordered by device, then logical id; replica numbers in device order."""
    physical: list[PhysicalExpert] = []
    next_replica = {e: 0 for e in counts}
    for d, name in enumerate(devices):
        for e in sorted(bins.held[d]):
            physical.append(PhysicalExpert(e, name, next_replica[e]))
            next_replica[e] += 1
    if host is not None:
        resident = set(residents)
        physical += [PhysicalExpert(e, host, 0) for e in range(num_logical) if e not in resident]
    return LayerPlan(num_logical, tuple(physical))


def _static_primaries(policy: str, residents: list[int], bins: _Bins, load: np.ndarray,
                      counts: dict[int, int]) -> None:
    n_dev = len(bins.cap)
    if policy == "contiguous":
        share = [0] * n_dev  # equal split, capped by capacity, remainder to the first devices
        for _ in residents:
            d = min((d for d in range(n_dev) if share[d] < bins.cap[d]), key=lambda d: (share[d], d))
            share[d] += 1
        it = iter(residents)
        for d in range(n_dev):
            for _ in range(share[d]):
                e = next(it)
                bins.add(d, e, load[e] / counts[e])
    else:  # round_robin
        d = 0
        for e in residents:
            while not bins.free(d):
                d = (d + 1) % n_dev
            bins.add(d, e, load[e] / counts[e])
            d = (d + 1) % n_dev


def _pack_balanced(load: np.ndarray, counts: dict[int, int], capacity: list[int]) -> tuple[_Bins, dict[int, int]]:
    bins = _Bins(capacity)
    _lpt(load, counts, bins)
    _refine(load, counts, bins)
    return bins, counts


def _pack_static(policy: str, load: np.ndarray, counts: dict[int, int], capacity: list[int],
                 residents: list[int]) -> tuple[_Bins, dict[int, int]]:
    """One copy of each resident by index, then the replicas (hottest per replica first) where
    the load is lowest, among devices with room that lack a copy."""
    bins = _Bins(capacity)
    extra = sum(counts.values()) - len(counts)
    ones = {e: 1 for e in counts}
    _static_primaries(policy, residents, bins, load, ones)
    _top_up(load, ones, bins, extra)
    return bins, ones


# -- entry points -----------------------------------------------------------------------------
def plan(loads, devices: Sequence[str], capacity_per_device: Sequence[int], num_redundant: int,
         *, host: str | None = None, previous: Placement | None = None) -> Placement:
    """Balanced placement of every layer of `loads` [num_layers, num_experts] (see module doc).

    `capacity_per_device[i]` is the number of physical-expert slots per layer on `devices[i]`.
    Without `host`, all experts plus `num_redundant` replicas must fit; with `host`, experts that
    do not fit live there (and redundant slots are only used when capacity is left over).
    With `previous` (same devices), devices of equal capacity are relabelled to keep as many
    experts where they already are as possible: same balancedness, fewer weights to move.
    """
    return place("balanced", loads, devices, capacity_per_device, num_redundant, host=host, previous=previous)


def place(policy: str, loads, devices: Sequence[str], capacity_per_device: Sequence[int], num_redundant: int,
          *, host: str | None = None, previous: Placement | None = None) -> Placement:
    """Placement for any policy; `loads` decides residency and replicas (use zeros when unknown)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r}; expected one of {', '.join(POLICIES)}")
    arr, devices, capacity = _check(loads, devices, capacity_per_device, num_redundant, host)
    num_experts = arr.shape[1]
    slots = sum(capacity)
    usable = sum(1 for c in capacity if c > 0)
    layers: list[LayerPlan] = []
    for load in arr:
        residents = _residents(load, slots, host)
        spare = min(num_redundant, slots - len(residents))
        counts = replicate(load, residents, spare, max_replicas=usable)
        if policy == "balanced":
            # LPT + refinement; the static layouts (same replicas) as fallbacks, so balanced is never worse
            candidates = [_pack_balanced(load, dict(counts), capacity),
                          _pack_static("contiguous", load, dict(counts), capacity, residents),
                          _pack_static("round_robin", load, dict(counts), capacity, residents)]
            bins, used = candidates[0]
            for cand in candidates[1:]:  # strictly better only: ties keep the LPT packing
                if balancedness_of(np.array(cand[0].load)) > balancedness_of(np.array(bins.load)) + 1e-12:
                    bins, used = cand
        else:
            bins, used = _pack_static(policy, load, dict(counts), capacity, residents)
        if previous is not None and previous.devices == tuple(devices) and len(previous.layers) == len(arr):
            _relabel(bins, previous.layers[len(layers)], devices)
        layers.append(_layer_plan(num_experts, devices, bins, used, residents, host))
    return Placement(tuple(devices), tuple(layers), policy, host)
