"""Running a layer's experts where a placement put them (`MoEBlock.executor` semantics).

Per MoE layer a `LayerState` holds, for every device, the stacked weights of the physical
experts it hosts (`w13 [n_d, 2I, H]`, `w2 [n_d, H, I]`) and index tables mapping each
(token, slot) pair to a physical expert. A forward pass:
1. picks a replica for every pair: the pair's rank among the pairs routed to the same logical
   expert, modulo that expert's replica count (deterministic; spreads counts evenly);
2. per device: moves the distinct tokens it needs there, runs the block's experts on its stack,
   sums each token's pairs on the device, brings the partial sums back and `index_add`s them
   into the output in token order;
3. host-tier experts (the CPU tier) are either computed on the CPU or copied to the token's
   device for this pass, per expert, by a token-count threshold (see `HostTier`).
`PlacedExperts` is the object installed as every block's `executor`; swapping a layer's state
is one dict assignment, so a rebalance between engine steps never mixes placements in a pass.

Virtual devices `cpu:N` are distinct placement devices backed by host memory (tests, CPU-only).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable

import torch

from models.placement.plan import LayerPlan, Placement

# (x [n, H], w13, w2 stacks, ids [n, k], weights [n, k]) -> [n, H]: a block's experts on one
# device's stacks (`MoEBlock.placed_fn`: the kernel plan's choice for that device type)
ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def torch_device(name: str) -> torch.device:
    """Placement device name -> torch device (`cpu:N` virtual devices are the CPU)."""
    if name == "cpu" or name.startswith("cpu:"):
        if name != "cpu" and not name[4:].isdigit():
            raise ValueError(f"bad virtual CPU device {name!r}; use cpu or cpu:N")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"unknown expert device {name!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"expert device {name!r} requested but CUDA is not available")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"expert device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        dev = torch.device("cuda", index)
    return dev


@dataclass(frozen=True)
class DeviceGroup:
    name: str  # placement device name
    device: torch.device
    logicals: tuple[int, ...]  # logical expert of each stack row
    w13: torch.Tensor  # [n, 2I, H]
    w2: torch.Tensor  # [n, H, I]


@dataclass(frozen=True)
class HostTier:
    """Experts beyond the accelerator budget, computed on the CPU or copied in per pass.

    An expert with at least `fetch_threshold` tokens in a pass is copied to the tokens' device
    and computed there; with fewer it is computed on the CPU (0: always copy; a huge value:
    never copy). Weights are the master copy in host memory, indexed by logical id.
    """

    group: int  # index of the host group in LayerState.groups
    fetch_threshold: int


@dataclass(frozen=True)
class LayerState:
    plan: LayerPlan
    groups: tuple[DeviceGroup, ...]
    rep_table: torch.Tensor  # [num_logical, max_replicas] physical slot of each replica (padded)
    num_rep: torch.Tensor  # [num_logical]
    slot_group: torch.Tensor  # [num_physical] group index of each slot
    slot_local: torch.Tensor  # [num_physical] row in that group's stack
    expert_fn: ExpertFn
    host: HostTier | None = None

    def assign(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, k] logical ids -> [T * k] physical slots.

        Among the pairs routed to one logical expert (in token order), pair r goes to replica
        (r + t0) mod n, where t0 is the token index of the expert's first pair: counts differ by
        at most one between replicas, and which replica gets the extra pair follows the batch
        (not always replica 0, which would overload it at small decode batches). Deterministic."""
        k = topk_ids.shape[1]
        flat_ids = topk_ids.reshape(-1)  # [N]
        n = flat_ids.numel()
        num_logical = self.num_rep.numel()
        order = torch.argsort(flat_ids, stable=True)  # [N] pairs grouped by expert, token order inside
        counts = torch.bincount(flat_ids, minlength=num_logical)  # [E]
        starts = torch.cumsum(counts, 0) - counts  # [E]
        sorted_ids = flat_ids[order]
        first_token = order[starts[sorted_ids]] // k  # [N] token of the expert's first pair
        rank = torch.empty_like(flat_ids)
        rank[order] = torch.arange(n, device=flat_ids.device) - starts[sorted_ids] + first_token  # [N]
        replica = rank % self.num_rep[flat_ids]  # [N]
        return self.rep_table[flat_ids, replica]

    def pair_groups(self, topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(group index [T * k], stack row [T * k]) of each (token, slot) pair."""
        slots = self.assign(topk_ids)
        return self.slot_group[slots], self.slot_local[slots]


def is_virtual(name: str) -> bool:
    """`cpu:N`: a separate placement device backed by host memory (tests, simulation)."""
    return name.startswith("cpu:")


def _run_on(device: torch.device, w13: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor,
            rows: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, remote: bool,
            fn: ExpertFn) -> None:
    """out[t] += sum of weights * expert(x[t]) over the given pairs, computed on `device`.

    Remote (another device, or a virtual one standing in for it): each distinct token travels
    once, its pairs are summed on the device, one partial sum per token comes back."""
    if not remote:  # nothing travels: compute the pairs in place
        xs = x.index_select(0, tokens)  # [n, H]
        ys = fn(xs, w13, w2, rows.view(-1, 1), weights.view(-1, 1))  # [n, H]
        out.index_add_(0, tokens, ys)
        return
    uniq, inv = torch.unique(tokens, return_inverse=True)  # distinct tokens; pair -> its token
    xd = x.index_select(0, uniq).to(device)  # [U, H]: each token travels once
    inv_d = inv.to(device)
    xs = xd.index_select(0, inv_d)  # [n, H]
    ys = fn(xs, w13, w2, rows.to(device).view(-1, 1), weights.to(device).view(-1, 1))  # [n, H]
    partial = torch.zeros_like(xd).index_add_(0, inv_d, ys)  # [U, H]: summed on the device
    out.index_add_(0, uniq, partial.to(out.device))


def run_layer(state: LayerState, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
    T, k = topk_ids.shape
    group, rows = state.pair_groups(topk_ids)  # [T * k] each
    if len(state.groups) == 1 and state.groups[0].device == x.device and state.host is None \
            and not is_virtual(state.groups[0].name):
        g = state.groups[0]
        return state.expert_fn(x, g.w13, g.w2, rows.view(T, k), topk_w)
    tokens = torch.arange(T * k, device=x.device) // k  # [T * k]
    weights = topk_w.reshape(-1)  # [T * k]
    out = torch.zeros_like(x)
    present = torch.bincount(group, minlength=len(state.groups)).tolist()
    for gi, g in enumerate(state.groups):
        if present[gi] == 0:
            continue
        sel = (group == gi).nonzero().squeeze(1)  # [n_g]
        if state.host is not None and gi == state.host.group:
            _run_host(state.host, g, x, tokens[sel], rows[sel], weights[sel], out, state.expert_fn)
        else:
            remote = g.device != x.device or is_virtual(g.name)
            _run_on(g.device, g.w13, g.w2, x, tokens[sel], rows[sel], weights[sel], out, remote, state.expert_fn)
    return out


def _run_host(tier: HostTier, g: DeviceGroup, x, tokens, rows, weights, out, fn: ExpertFn) -> None:
    """Host experts: copy the busy ones to x's device, compute the rest on the CPU."""
    counts = torch.bincount(rows, minlength=g.w13.shape[0])  # [E] pairs per host expert (rows = logical)
    fetch = counts >= max(tier.fetch_threshold, 1)
    remote = g.device != x.device
    if not bool(fetch.any()):
        _run_on(g.device, g.w13, g.w2, x, tokens, rows, weights, out, remote, fn)
        return
    fetched = fetch.nonzero().squeeze(1)  # [F] logical ids to copy in
    remap = torch.full_like(counts, -1)
    remap[fetched] = torch.arange(fetched.numel(), device=remap.device)
    hot = fetch[rows]  # [n] pairs whose expert is copied in
    w13 = g.w13.index_select(0, fetched.to(g.w13.device)).to(x.device)  # [F, 2I, H]
    w2 = g.w2.index_select(0, fetched.to(g.w2.device)).to(x.device)  # [F, H, I]
    _run_on(x.device, w13, w2, x, tokens[hot], remap[rows[hot]], weights[hot], out, False, fn)
    cold = ~hot
    if bool(cold.any()):
        _run_on(g.device, g.w13, g.w2, x, tokens[cold], rows[cold], weights[cold], out, remote, fn)


def build_layer_state(plan: LayerPlan, master_w13: torch.Tensor, master_w2: torch.Tensor, index_device: torch.device,
                      expert_fn: ExpertFn, *, host: str | None = None, fetch_threshold: int = 1 << 62,
                      previous: LayerState | None = None) -> tuple[LayerState, int]:
    """Build a layer's stacks (reusing rows already on a device) -> (state, experts copied).

    `master_w13 [E, 2I, H]` / `master_w2 [E, H, I]` are the full expert weights (the host tier
    computes straight from them, so they must be in host memory when a host tier is used).
    """
    old = {g.name: g for g in previous.groups} if previous is not None else {}
    names = list(dict.fromkeys(p.device for p in plan.physical))
    groups: list[DeviceGroup] = []
    slot_group = [0] * plan.num_physical
    slot_local = [0] * plan.num_physical
    copied = 0
    host_tier = None
    for name in names:
        slots = plan.device_slots(name)
        gi = len(groups)
        if name == host:
            if master_w13.device.type != "cpu":
                raise ValueError("the host tier needs the master expert weights in host memory")
            logicals = tuple(plan.physical[s].logical for s in slots)
            groups.append(DeviceGroup(name, master_w13.device, logicals, master_w13, master_w2))
            for s in slots:
                slot_group[s], slot_local[s] = gi, plan.physical[s].logical
            host_tier = HostTier(gi, fetch_threshold)
            continue
        logicals = tuple(plan.physical[s].logical for s in slots)
        prev = old.get(name)
        if prev is not None and prev.logicals == logicals:
            groups.append(prev)
        else:
            w13, w2, n = _stack(torch_device(name), logicals, master_w13, master_w2, prev)
            copied += n
            groups.append(DeviceGroup(name, torch_device(name), logicals, w13, w2))
        for j, s in enumerate(slots):
            slot_group[s], slot_local[s] = gi, j
    max_rep = max(len(r) for r in plan.replicas)
    table = [list(r) + [r[0]] * (max_rep - len(r)) for r in plan.replicas]
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=index_device)
    state = LayerState(plan, tuple(groups), as_t(table), as_t([len(r) for r in plan.replicas]),
                       as_t(slot_group), as_t(slot_local), expert_fn, host_tier)
    return state, copied


def _stack(device: torch.device, logicals: tuple[int, ...], master_w13, master_w2, prev: DeviceGroup | None):
    """New stacks for a device: rows it already holds are copied on the device, others come from
    the master copy. Returns (w13, w2, number of experts brought in)."""
    n = len(logicals)
    w13 = torch.empty((n,) + tuple(master_w13.shape[1:]), dtype=master_w13.dtype, device=device)
    w2 = torch.empty((n,) + tuple(master_w2.shape[1:]), dtype=master_w2.dtype, device=device)
    have = {e: i for i, e in enumerate(prev.logicals)} if prev is not None else {}
    keep = [(j, have[e]) for j, e in enumerate(logicals) if e in have]
    bring = [(j, e) for j, e in enumerate(logicals) if e not in have]
    if keep:
        dst = torch.tensor([j for j, _ in keep], device=device)
        src = torch.tensor([i for _, i in keep], device=device)
        w13[dst] = prev.w13[src]
        w2[dst] = prev.w2[src]
    if bring:
        dst = torch.tensor([j for j, _ in bring], device=device)
        src = torch.tensor([e for _, e in bring], device=master_w13.device)
        w13[dst] = master_w13.index_select(0, src).to(device)
        w2[dst] = master_w2.index_select(0, src).to(device)
    return w13, w2, len(bring)


class PlacedExperts:
    """The executor installed in every MoE block: runs layer `layer_idx` per its current state."""

    def __init__(self, layer_ids: list[int]):
        self.layer_ids = list(layer_ids)  # model layer index of each MoE layer, in order
        self.states: dict[int, LayerState] = {}  # model layer index -> state

    def __call__(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        return run_layer(self.states[layer_idx], x, topk_ids, topk_w)

    def swap(self, layer_idx: int, state: LayerState) -> None:
        self.states[layer_idx] = state  # one reference assignment: a pass sees old or new, never a mix

    def device_tokens(self, routing: torch.Tensor, placement: Placement, fetch_device: str) -> dict[str, int]:
        """Token-expert computations per device for a step's routing [T, num_moe_layers, k];
        assignments to zero-computation experts (ids past the layer's experts, LongCat) compute
        nothing and count nowhere."""
        out = {d: 0 for d in placement.all_devices}
        for li, layer_idx in enumerate(self.layer_ids):
            state = self.states[layer_idx]
            ids = routing[:, li, :].to(state.num_rep.device)
            if ids.numel() and int(ids.max()) >= state.num_rep.numel():
                ids = ids[ids < state.num_rep.numel()].reshape(-1, 1)  # [real pairs, 1]
            group, rows = state.pair_groups(ids)
            per_group = torch.bincount(group, minlength=len(state.groups)).tolist()
            for gi, g in enumerate(state.groups):
                n = per_group[gi]
                if state.host is not None and gi == state.host.group and n:
                    host_rows = rows[group == gi]
                    counts = torch.bincount(host_rows, minlength=g.w13.shape[0])
                    fetched = int(counts[counts >= max(state.host.fetch_threshold, 1)].sum())
                    if fetched and fetch_device != g.name:
                        out[fetch_device] = out.get(fetch_device, 0) + fetched
                        n -= fetched
                out[g.name] += n
        return out
