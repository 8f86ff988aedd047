"""Expert routing counters, sliding-window load imbalance, and expert placement.

The engine thread calls `ExpertLoadTracker.record()` once per step; `/metrics`
(`RoutingExposition`) and `GET /v1/moe/routing` read a consistent copy via `snapshot()`.
One lock guards all state; the per-step work is one numpy add of a [num_layers, num_experts]
array.

Load imbalance of a layer = max over experts / mean over experts of the tokens routed to each
logical expert during the sliding window: 1.0 when perfectly balanced, num_experts when every
token went to one expert. The window is time-based: the last `window_seconds` (default 60 s),
kept as `slot_seconds` (1 s) buckets, so it spans between window-slot and window seconds. A
layer with no tokens in the window has no imbalance value (the series is absent).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server.engine.stats import PlacementInfo, RoutingStats

from . import names as n

logger = logging.getLogger(__name__)

PlacementRow = tuple[int, int, str, int]  # (layer, expert, device, replica)


def load_imbalance(load: np.ndarray) -> np.ndarray:
    """max/mean per row of a [num_layers, num_experts] load array; NaN where a row is all 0."""
    load = np.asarray(load, dtype=np.float64)  # [num_layers, num_experts]
    total = load.sum(axis=1)  # [num_layers]
    peak = load.max(axis=1) if load.shape[1] else np.zeros(load.shape[0])  # [num_layers]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = peak * load.shape[1] / total
    out[total <= 0] = np.nan
    return out


def _as_counts(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.int64)  # always a private copy


@dataclass
class RoutingSnapshot:
    num_layers: int | None
    num_experts: int | None
    window_seconds: float
    totals: np.ndarray | None  # [num_layers, num_experts] since start
    window: np.ndarray | None  # [num_layers, num_experts] within the window
    imbalance: np.ndarray | None  # [num_layers], NaN = no tokens in the window
    devices: dict[str, int] = field(default_factory=dict)
    dropped: np.ndarray | None = None  # [num_layers] assignments dropped over expert capacity
    zero: np.ndarray | None = None  # [num_layers] assignments to zero-computation experts (LongCat)
    placement: tuple[PlacementRow, ...] = ()
    cpu_tier: dict | None = None  # the CPU expert tier's format and bytes (PlacementInfo.cpu_tier)


class ExpertLoadTracker:
    def __init__(self, num_layers: int | None = None, num_experts: int | None = None, *,
                 window_seconds: float = 60.0, slot_seconds: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (slot_seconds > 0 and window_seconds >= slot_seconds):
            raise ValueError("need 0 < slot_seconds <= window_seconds")
        for v in (num_layers, num_experts):
            if v is not None and v <= 0:
                raise ValueError(f"num_layers/num_experts must be positive, got {v}")
        self.window_seconds = float(window_seconds)
        self._slot_seconds = float(slot_seconds)
        self._num_slots = math.ceil(window_seconds / slot_seconds)
        self._clock = clock
        self._lock = threading.Lock()
        self._num_layers = num_layers
        self._num_experts = num_experts
        self._totals: np.ndarray | None = None  # [num_layers, num_experts]
        if num_layers is not None and num_experts is not None:
            self._totals = np.zeros((num_layers, num_experts), dtype=np.int64)
        self._slots: deque[tuple[int, np.ndarray]] = deque()  # (slot index, [L, E] counts)
        self._devices: dict[str, int] = {}
        self._dropped: np.ndarray | None = None  # [num_layers]
        self._zero: np.ndarray | None = None  # [num_layers]
        self._placement: tuple[PlacementRow, ...] = ()
        self._cpu_tier: dict | None = None
        self._warned = False

    # -- engine thread -------------------------------------------------------------------
    def record(self, routing: RoutingStats) -> None:
        counts = _as_counts(routing.expert_tokens)  # [num_layers, num_experts]
        with self._lock:
            for device, tokens in routing.device_tokens.items():
                self._devices[str(device)] = self._devices.get(str(device), 0) + int(tokens)
            if not self._accept_shape(counts, routing):
                return
            if routing.dropped_tokens is not None:
                dropped = np.maximum(_as_counts(routing.dropped_tokens), 0)  # [num_layers]
                if dropped.shape == (counts.shape[0],):
                    self._dropped = dropped if self._dropped is None else self._dropped + dropped
            if getattr(routing, "zero_expert_tokens", None) is not None:
                zero = np.maximum(_as_counts(routing.zero_expert_tokens), 0)  # [num_layers]
                if zero.shape == (counts.shape[0],):
                    self._zero = zero if self._zero is None else self._zero + zero
            if self._totals is None:
                self._num_layers, self._num_experts = counts.shape
                self._totals = np.zeros(counts.shape, dtype=np.int64)
            self._totals += counts
            slot = int(self._clock() // self._slot_seconds)
            if self._slots and self._slots[-1][0] == slot:
                self._slots[-1][1][...] += counts
            else:
                self._slots.append((slot, counts))
            while self._slots and self._slots[0][0] <= slot - self._num_slots:
                self._slots.popleft()

    def _accept_shape(self, counts: np.ndarray, routing: RoutingStats) -> bool:
        expected = (self._num_layers, self._num_experts)
        ok = counts.ndim == 2 and counts.shape == (routing.num_layers, routing.num_experts)
        ok = ok and all(e is None or e == got for e, got in zip(expected, counts.shape))
        if not ok and not self._warned:
            self._warned = True
            logger.warning(
                "dropping RoutingStats: expert_tokens shape %s, declared (%s, %s), expected %s",
                counts.shape, routing.num_layers, routing.num_experts, expected)
        return ok

    # -- setup / readers -----------------------------------------------------------------
    def set_placement(self, info: PlacementInfo) -> None:
        """Replace the whole placement (duplicates collapse to one row)."""
        rows: dict[PlacementRow, None] = {}
        for row in info.rows:
            layer, expert, device, replica = row
            key = (int(layer), int(expert), str(device), int(replica))
            if min(key[0], key[1], key[3]) < 0:
                raise ValueError(f"negative index in placement row {row!r}")
            if self._num_layers is not None and key[0] >= self._num_layers:
                raise ValueError(f"layer out of range in placement row {row!r}")
            if self._num_experts is not None and key[1] >= self._num_experts:
                raise ValueError(f"expert out of range in placement row {row!r}")
            rows[key] = None
        with self._lock:
            self._placement = tuple(rows)
            self._cpu_tier = dict(info.cpu_tier) if info.cpu_tier else None

    def snapshot(self) -> RoutingSnapshot:
        with self._lock:
            now_slot = int(self._clock() // self._slot_seconds)
            totals = None if self._totals is None else self._totals.copy()
            window = None
            if totals is not None:
                window = np.zeros_like(totals)
                for slot, counts in self._slots:
                    if slot > now_slot - self._num_slots:
                        window += counts
            snap = RoutingSnapshot(
                num_layers=self._num_layers, num_experts=self._num_experts,
                window_seconds=self.window_seconds, totals=totals, window=window,
                imbalance=None, devices=dict(self._devices),
                dropped=None if self._dropped is None else self._dropped.copy(),
                zero=None if self._zero is None else self._zero.copy(),
                placement=self._placement, cpu_tier=self._cpu_tier)
        if window is not None:
            snap.imbalance = load_imbalance(window)
        return snap


def snapshot_to_json(snap: RoutingSnapshot, model_name: str) -> dict:
    """JSON-able view for `GET /v1/moe/routing`."""
    layers = []
    if snap.totals is not None and snap.window is not None and snap.imbalance is not None:
        for layer in range(snap.totals.shape[0]):
            imb = float(snap.imbalance[layer])
            layers.append({
                "layer": layer,
                "window_tokens": snap.window[layer].tolist(),
                "total_tokens": snap.totals[layer].tolist(),
                "imbalance": None if math.isnan(imb) else imb,
            })
    return {
        "model": model_name,
        "num_layers": snap.num_layers,
        "num_experts": snap.num_experts,
        "window_seconds": snap.window_seconds,
        "layers": layers,
        "device_tokens": dict(sorted(snap.devices.items())),
        "dropped_tokens": 0 if snap.dropped is None else int(snap.dropped.sum()),
        "dropped_tokens_per_layer": None if snap.dropped is None else snap.dropped.tolist(),
        "zero_expert_tokens_per_layer": None if snap.zero is None else snap.zero.tolist(),
        "placement": [
            {"layer": l, "expert": e, "device": d, "replica": r} for l, e, d, r in snap.placement
        ],
        "cpu_tier": snap.cpu_tier,
    }


def _esc(value: str) -> str:
    """Escape a label value for the Prometheus text format."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _header(spec: n.MetricSpec) -> str:
    doc = spec.help.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {spec.name} {doc}\n# TYPE {spec.name} {spec.kind}\n"


class RoutingExposition:
    """Text exposition (format 0.0.4) of the MoE series, from one snapshot per scrape.

    Written directly rather than through prometheus_client's generic formatter: these
    families hold layers x experts series (thousands for large models), and per-sample
    formatting there is slow on the event loop (docs/benchmarks.md, section "Numbers behind code
    choices"). Label prefixes are built once.
    """

    def __init__(self, tracker: ExpertLoadTracker, model_name: str) -> None:
        self._tracker = tracker
        self._model = _esc(model_name)
        self._token_cache: tuple[tuple[int, ...] | None, list[str]] = (None, [])
        self._placement_cache: tuple[tuple[PlacementRow, ...] | None, str] = (None, "")

    def _prefixes(self, shape: tuple[int, ...]) -> list[str]:
        cached_shape, prefixes = self._token_cache
        if shape != cached_shape:
            name, m = n.EXPERT_TOKENS.name, self._model
            prefixes = [
                f'{name}{{model_name="{m}",layer="{layer}",expert="{expert}"}} '
                for layer in range(shape[0]) for expert in range(shape[1])
            ]
            self._token_cache = (shape, prefixes)
        return prefixes

    def _placement(self, rows: tuple[PlacementRow, ...]) -> str:
        cached_rows, text = self._placement_cache
        if rows is not cached_rows:
            name, m = n.EXPERT_PLACEMENT.name, self._model
            text = "".join(
                f'{name}{{model_name="{m}",layer="{layer}",expert="{expert}",'
                f'device="{_esc(device)}",replica="{replica}"}} 1\n'
                for layer, expert, device, replica in rows)
            self._placement_cache = (rows, text)  # one atomic swap: safe across threads
        return text

    def render(self) -> str:
        snap = self._tracker.snapshot()
        m = self._model
        out = [_header(n.EXPERT_TOKENS)]
        if snap.totals is not None:
            prefixes = self._prefixes(snap.totals.shape)
            values = snap.totals.ravel().tolist()  # [num_layers * num_experts]
            out.append("".join(f"{p}{v}\n" for p, v in zip(prefixes, values)))
        out.append(_header(n.EXPERT_LOAD_IMBALANCE))
        if snap.imbalance is not None:
            name = n.EXPERT_LOAD_IMBALANCE.name
            out.extend(f'{name}{{model_name="{m}",layer="{layer}"}} {v!r}\n'
                       for layer, v in enumerate(snap.imbalance.tolist()) if not math.isnan(v))
        out.append(_header(n.EXPERT_PLACEMENT))
        out.append(self._placement(snap.placement))
        out.append(_header(n.DEVICE_EXPERT_TOKENS))
        name = n.DEVICE_EXPERT_TOKENS.name
        out.extend(f'{name}{{model_name="{m}",device="{_esc(device)}"}} {v}\n'
                   for device, v in sorted(snap.devices.items()))
        out.append(_header(n.DROPPED_TOKENS))
        if snap.dropped is not None:
            name = n.DROPPED_TOKENS.name
            out.extend(f'{name}{{model_name="{m}",layer="{layer}"}} {v}\n'
                       for layer, v in enumerate(snap.dropped.tolist()))
        out.append(_header(n.ZERO_EXPERT_TOKENS))
        if snap.zero is not None:
            name = n.ZERO_EXPERT_TOKENS.name
            out.extend(f'{name}{{model_name="{m}",layer="{layer}"}} {v}\n'
                       for layer, v in enumerate(snap.zero.tolist()))
        return "".join(out)
