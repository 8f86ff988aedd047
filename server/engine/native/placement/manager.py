"""PlacementManager: builds the plan and the executor, installs them, rebalances online.

It lives with the engine (it reads the engine's config and reports `server.engine.stats`
types); the pure parts (plan, planner, executor) stay in `models/placement`.

Engine contract (server/engine/native/core.py, which receives the manager in its constructor):
the core calls `device_tokens(routing)` after each forward pass and then every routing listener
(`on_routing`: the manager is one, a routing trace recorder another), both on the engine thread
between steps; `info()` may be called from any thread (it reads one immutable Placement).
A rebalance therefore happens between two steps: per layer the new weight stacks are built
completely, then the layer's state reference is swapped; no pass ever sees a partial layer.
"""

from __future__ import annotations

import logging
import re
from dataclasses import replace
from collections.abc import Callable, Sequence

import numpy as np
import torch

from server.engine.native.placement.cost import measure
from models.placement.executor import PlacedExperts, build_layer_state, torch_device
from models.placement.executor import tier_expert_bytes
from models.placement.executor import tier_format as tier_fmt
from models.placement.plan import HOST_DEVICE, Placement
from models.placement.planner import default_capacity, place
from models.quant.stack import QStack
from server.config import parse_bytes
from server.engine.stats import PlacementInfo, RoutingStats

log = logging.getLogger(__name__)

NEVER_FETCH = 1 << 62
MIN_GAIN = 0.02  # a rebalance must raise balancedness by this much (on its window) to move weights
# the routing statistics a rebalance plans on: per (layer, expert) a frequency that halves every
# `rebalance_interval` steps (recent steps weigh most, older ones still count), and recency: an
# expert seen in the latest steps gets up to RECENCY more (a tie-break between experts about as
# frequent: the one routed to lately stays on the fast device)
RECENCY = 1e-3


def budget_slots(budget: str | int, expert_bytes: int, num_moe_layers: int) -> int:
    """`--gpu-expert-budget` -> expert slots per layer per device: '4' is a count of experts per
    layer, '2GiB' / '512MB' / '3e9B' are bytes for all MoE layers' experts on the device."""
    s = str(budget).strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+", s):
        return int(s)
    try:
        nbytes = parse_bytes(s, require_unit=True)
    except ValueError:
        raise ValueError(f"--gpu-expert-budget {budget!r}: expected a count of experts per layer ('4') "
                         f"or bytes with a unit ('2GiB', '512MB')") from None
    return int(nbytes // (expert_bytes * num_moe_layers))


def slot_capacity(names: Sequence[str], num_experts: int, num_redundant: int, capacity: Sequence[int] | None,
                  budget: str | int | None, expert_bytes: int, num_moe_layers: int) -> tuple[list[int], str | None]:
    """(expert slots per layer on each device, the host tier's device or None): from an explicit
    capacity or `--gpu-expert-budget`, else an even split; experts beyond the slots live in the
    host tier (ValueError where that cannot work)."""
    if capacity is not None and budget is not None:
        raise ValueError("give capacity or budget, not both")
    if budget is not None:
        capacity = [budget_slots(budget, expert_bytes, num_moe_layers)] * len(names)
    if capacity is None:
        return default_capacity(num_experts, num_redundant, len(names)), None
    total = sum(capacity)
    if total >= num_experts + num_redundant:
        return list(capacity), None
    what = f"the expert budget ({budget if budget is not None else list(capacity)})"
    if total == 0:
        raise ValueError(f"{what} holds no expert on any device "
                         f"(one expert is {expert_bytes} bytes x {num_moe_layers} MoE layers)")
    if num_redundant:
        raise ValueError(f"{what} gives {total} expert slots per layer over {len(names)} device(s): "
                         f"{num_experts} experts + {num_redundant} redundant need {num_experts + num_redundant}; "
                         f"lower --num-redundant-experts or raise the budget")
    if HOST_DEVICE in names:
        raise ValueError("experts beyond the budget live on 'cpu' (the host tier), so 'cpu' cannot also "
                         "be an expert device; use accelerators or virtual devices cpu:N")
    return list(capacity), HOST_DEVICE


class PlacementManager:
    def __init__(self, model, devices: Sequence[str] | None = None, *, policy: str = "contiguous",
                 num_redundant: int = 0, capacity: Sequence[int] | None = None, budget: str | int | None = None,
                 rebalance_interval: int = 0, fetch_threshold: int | None = None, min_gain: float = MIN_GAIN,
                 initial_loads: np.ndarray | None = None, tier_format: str = "auto"):
        cfg = model.config
        blocks = sorted(model.moe_blocks(), key=lambda b: b.layer_idx)
        if not blocks:
            raise ValueError("the model has no MoE layers to place")
        self.model = model
        self.layer_ids = [b.layer_idx for b in blocks]
        self.expert_fns = {b.layer_idx: b.placed_fn for b in blocks}  # the kernel plan's, per device type
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.main_device = model.embed.weight.device
        self.main_dtype = model.embed.weight.dtype
        w13 = blocks[0].w13
        # experts kept in a checkpoint's quantized format: their QParams (placed as QTensor stacks)
        kept = {id(p): q for n, p in model.named_parameters(remove_duplicate=False)
                for q in (getattr(model, "qweights", {}).get(n),) if q is not None}
        self.quantized = id(w13) in kept
        if self.quantized:
            self.expert_bytes = QStack.of(kept[id(w13)]).expert_bytes() + QStack.of(kept[id(blocks[0].w2)]).expert_bytes()
        else:
            self.expert_bytes = (w13[0].numel() + blocks[0].w2[0].numel()) * w13.element_size()
        self.rebalance_interval = int(rebalance_interval)
        self.min_gain = float(min_gain)
        self.on_change: list[Callable[[PlacementInfo], None]] = []  # e.g. refresh the placement metric
        self.num_rebalances = self.num_skipped = self.experts_moved = self.steps = 0
        self._window_steps = 0
        self._freq = np.zeros((len(blocks), self.num_experts))  # [L, E] decayed token counts
        self._last_seen = np.full((len(blocks), self.num_experts), -np.inf)  # [L, E] step last routed to
        self.placement: Placement | None = None
        self.executor: PlacedExperts | None = None

        names = tuple(devices) if devices else (_device_name(self.main_device),)
        for name in names:
            torch_device(name)  # validates, e.g. cuda:3 on a 2-GPU machine
        self.devices = names
        self.num_redundant = int(num_redundant)
        self.tier_format = tier_format
        tier_fmt(tier_format, w13.dtype)  # validates
        if self.quantized and tier_format != "auto":
            fmt = kept[id(w13)].fmt.value
            raise ValueError(f"--cpu-expert-format {tier_format}: the experts are kept in the checkpoint's {fmt} "
                             f"format and the CPU tier computes them in it (no conversion); use --cpu-expert-format "
                             f"auto")
        self.capacity, self.host = slot_capacity(names, self.num_experts, self.num_redundant, capacity, budget,
                                                 self.expert_bytes, len(blocks))
        # the master copy of every expert: host memory unless everything already lives there
        self.masters: dict[int, tuple[torch.Tensor | QStack, torch.Tensor | QStack]] = {}
        to_host = self.main_device.type != "cpu"
        for b in blocks:
            if id(b.w13) in kept:  # the QTensors and scales as they are (host memory: the QParams move there)
                masters = []
                for qp in (kept[id(b.w13)], kept[id(b.w2)]):
                    st = QStack.of(qp).map(_host_copy) if to_host else QStack.of(qp)
                    qp.q, qp.bias = st.q, st.bias
                    masters.append(st)
                self.masters[b.layer_idx] = (masters[0], masters[1])
                continue
            if to_host:
                b.w13.data = _host_copy(b.w13.data)
                b.w2.data = _host_copy(b.w2.data)
            self.masters[b.layer_idx] = (b.w13.data, b.w2.data)
        self.fetch_threshold = self._fetch_threshold(cfg, fetch_threshold)
        loads = np.zeros_like(self._freq) if initial_loads is None else initial_loads
        self.executor = PlacedExperts(self.layer_ids)
        self._install(place(policy, loads, names, self.capacity, self.num_redundant, host=self.host))
        for b in blocks:
            b.executor = self.executor
        tier = self.tier_info()
        if tier is None and tier_format != "auto":
            log.warning("--cpu-expert-format %s has no effect: every expert fits the devices (no CPU tier)",
                        tier_format)
        if tier is not None:
            plan = model.kernel_plan
            model.apply_plan(replace(plan, cpu_tier=tier["format"], cpu_tier_bytes=tier["bytes"],
                                     cpu_tier_in_place=tier["in_place"]))
        # the placed decode step is sync-free (CUDA graphs stay on; with the CPU tier they are
        # piecewise, cut at its calls; several GPUs: eager): the model's plan says so
        model.apply_plan(model.kernel_plan.for_engine(placed=True, host_tier=self.computes_on_host,
                                                      several_gpus=self.several_gpus))
        log.info("expert placement %s on %s (slots/layer %s%s%s), %d bytes per expert", policy, ", ".join(names),
                 self.capacity, f", host tier {self.host} ({tier['format']}, {tier['bytes'] / 2**20:.1f} MiB"
                 f"{' in place' if tier['in_place'] else ''}; copy-in from {self.fetch_threshold} tokens)"
                 if tier else "", f", {self.num_redundant} redundant" if self.num_redundant else "",
                 self.expert_bytes)

    @property
    def computes_on_host(self) -> bool:
        """The host computes experts in the middle of a step (the CPU tier, or CPU devices of an
        accelerator's model): the step's CUDA graphs are piecewise, cut at those calls."""
        return self.host is not None or (self.main_device.type != "cpu" and any(
            torch_device(d).type == "cpu" for d in self.devices))

    @property
    def several_gpus(self) -> bool:
        """Experts on more than one accelerator (the plan keeps decode graphs off unless asked:
        `KernelPlan.for_engine(graphs_across_gpus=True)`)."""
        return len({torch_device(d) for d in self.devices if torch_device(d).type != "cpu"}
                   | ({self.main_device} if self.main_device.type != "cpu" else set())) > 1

    @classmethod
    def from_config(cls, model, config) -> PlacementManager:
        return cls(model, config.expert_devices or None, policy=config.expert_placement,
                   num_redundant=config.num_redundant_experts, budget=config.gpu_expert_budget,
                   rebalance_interval=config.rebalance_interval, tier_format=config.cpu_expert_format)

    def _fetch_threshold(self, cfg, given: int | None) -> int:
        if self.host is None:
            return NEVER_FETCH
        if given is not None:
            return int(given)
        if self.main_device.type == "cpu":
            return NEVER_FETCH  # tokens already live in host memory: nothing to copy
        w13 = self.masters[self.layer_ids[0]][0]
        H, inter = cfg.hidden_size, cfg.moe_intermediate_size
        if isinstance(w13, QStack):  # the copy-in and the CPU both read the checkpoint's format
            wbytes = self.expert_bytes / (3 * H * inter)
            cost = measure(H, inter, self.main_dtype, self.main_device)
            return cost.fetch_threshold(H, inter, wbytes, abytes=self.main_dtype.itemsize, cpu_wbytes=wbytes)
        cost = measure(H, inter, w13.dtype, self.main_device)
        # the CPU reads the tier's format (int4: ~1/4 of bf16's bytes), the copy-in the master's
        cpu_wbytes = tier_expert_bytes(tier_fmt(self.tier_format, w13.dtype), H, inter) / (3 * H * inter)
        return cost.fetch_threshold(H, inter, w13.element_size(), cpu_wbytes=cpu_wbytes)

    # -- installing a placement ---------------------------------------------------------------
    def _install(self, placement: Placement) -> int:
        """Build every layer's stacks from the new placement and swap them in; returns experts copied."""
        copied = 0
        for li, layer_idx in enumerate(self.layer_ids):
            w13, w2 = self.masters[layer_idx]
            state, n = build_layer_state(placement.layers[li], w13, w2, self.main_device, self.expert_fns[layer_idx],
                                         host=self.host, fetch_threshold=self.fetch_threshold,
                                         previous=self.executor.states.get(layer_idx), tier_format=self.tier_format)
            self.executor.swap(layer_idx, state)
            copied += n
        self.placement = placement
        self._split = _count_split(placement, self.num_experts)
        return copied

    def tier_info(self) -> dict | None:
        """The CPU tier's format and memory: {"format", "bytes" (its experts in that format, all
        MoE layers), "in_place" (computed from the model's own weights: no copy beside them)},
        None without a tier."""
        if self.host is None or self.executor is None:
            return None
        tiers = [st.host for st in self.executor.states.values() if st.host is not None]
        if not tiers:
            return None
        return {"format": tiers[0].fmt, "bytes": sum(t.nbytes for t in tiers), "in_place": all(t.in_place for t in tiers)}

    # -- engine hooks ---------------------------------------------------------------------------
    def info(self) -> PlacementInfo | None:
        placement = self.placement
        return None if placement is None else PlacementInfo(rows=placement.rows(), cpu_tier=self.tier_info())

    def device_tokens(self, routing: torch.Tensor) -> dict[str, int]:
        """Token-expert computations per device for a step's routing [T, num_moe_layers, k]."""
        return self.executor.device_tokens(routing, self.placement, _device_name(self.main_device))

    def device_tokens_for_counts(self, expert_counts: torch.Tensor) -> dict[str, int]:
        """Token-expert computations per device for accumulated counts [num_moe_layers, experts]
        (a request's, at its end), attributed with the current placement: a replicated expert's
        count split evenly over its replicas (the first `count mod n` replicas get one more)."""
        counts = torch.as_tensor(expert_counts).detach().to("cpu", torch.long)
        flat, n, rank, dev = self._split
        c = counts.reshape(-1)[flat]  # [physical experts, all layers]
        per = c // n + (rank < c % n).long()
        totals = torch.bincount(dev, weights=per, minlength=len(self.placement.all_devices)).long().tolist()
        return dict(zip(self.placement.all_devices, totals))

    def on_routing(self, stats: RoutingStats) -> None:
        """Routing listener: update the routing statistics, rebalance every N steps on them."""
        counts = np.asarray(stats.expert_tokens, dtype=np.float64)  # [L, E]
        self.steps += 1
        if not self.rebalance_interval:
            return
        self._freq *= 0.5 ** (1.0 / self.rebalance_interval)
        self._freq += counts
        self._last_seen[counts > 0] = self.steps
        self._window_steps += 1
        if self._window_steps >= self.rebalance_interval:
            self._window_steps = 0
            self.rebalance(self.routing_loads())

    def routing_loads(self) -> np.ndarray:
        """[L, E] what a rebalance plans on: the decayed frequency, plus the recency tie-break
        (RECENCY for an expert routed to in the latest step, halving every interval since)."""
        interval = max(self.rebalance_interval, 1)
        recency = np.where(np.isfinite(self._last_seen), 0.5 ** ((self.steps - self._last_seen) / interval), 0.0)
        return self._freq + RECENCY * recency

    def rebalance(self, loads: np.ndarray) -> bool:
        """Re-plan (balanced) for these loads [L, E]; move weights if it is better. Returns whether it moved."""
        loads = np.asarray(loads, dtype=np.float64)
        old = self.placement
        new = place("balanced", loads, self.devices, self.capacity, self.num_redundant, host=self.host, previous=old)
        if not _better(new, old, loads, self.min_gain) or new.moved_experts(old) == 0:
            self.num_skipped += 1
            return False
        copied = self._install(new)
        self.num_rebalances += 1
        self.experts_moved += copied
        log.info("rebalanced experts at step %d: balancedness %.3f -> %.3f, %d expert copies moved",
                 self.steps, old.balancedness(loads), new.balancedness(loads), copied)
        info = PlacementInfo(rows=new.rows(), cpu_tier=self.tier_info())
        for callback in self.on_change:
            callback(info)
        return True

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()  # the CPU tier's thread


def _count_split(placement: Placement, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Per physical expert over all layers: (layer * E + logical, replicas, replica rank, device index)."""
    index = {d: i for i, d in enumerate(placement.all_devices)}
    rows = [(li * num_experts + p.logical, layer.num_replicas(p.logical), layer.replicas[p.logical].index(s),
             index[p.device]) for li, layer in enumerate(placement.layers) for s, p in enumerate(layer.physical)]
    return tuple(torch.tensor(col, dtype=torch.long) for col in zip(*rows))


def _better(new: Placement, old: Placement, loads: np.ndarray, min_gain: float) -> bool:
    """Less load on the host tier, or as much and a higher balancedness."""
    host_new, host_old = new.host_fraction(loads), old.host_fraction(loads)
    if host_new < host_old - 1e-9:
        return True
    if host_new > host_old + 1e-9:
        return False
    return new.balancedness(loads) > old.balancedness(loads) + min_gain + 1e-12


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda" and dev.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(dev)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    host = t.detach().to("cpu")
    return host.pin_memory() if torch.cuda.is_available() else host


def placement_from_config(model, config) -> PlacementManager | None:
    """The manager a config asks for (experts placed on the model now), or None if none asked;
    the factory passes it to the EngineCore."""
    if not config.places_experts:
        return None
    return PlacementManager.from_config(model, config)
