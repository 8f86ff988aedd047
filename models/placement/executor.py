"""Running a layer's experts where a placement put them (`MoEBlock.executor` semantics).

Per MoE layer a `LayerState` holds, for every device, the stacked weights of the physical
experts it hosts (`w13 [n_d, 2I, H]`, `w2 [n_d, H, I]`) and index tables mapping each
(token, slot) pair to a physical expert. A forward pass:
1. picks a replica for every pair: the pair's rank among the pairs routed to the same logical
   expert, modulo that expert's replica count (deterministic; spreads counts evenly);
2. per device, with no host sync (steps of up to `SYNC_FREE_TOKENS` tokens: every decode step
   and every CUDA graph bucket): the device gets a fixed-size buffer of all T * k pairs (the
   capacity is the step's pair count, so nothing can overflow): its own pairs keep their stack
   row and weight, the others become padding with weight 0 on a row one of its own pairs uses
   (on no row's weights beyond those it reads anyway); the block's experts run over the buffer
   on the device and the [T, H] result is added into the output. Nothing is read back to the
   host: the step can be captured in a CUDA graph (the plan's `for_engine`), and the C experts
   kernel serves CPU devices (a float32 packed copy of each CPU stack, `DeviceGroup.packed`).
   Larger steps (prefill) move only the tokens each device needs (`nonzero`: a host sync);
3. host-tier experts (the CPU tier): in a step too small for any expert to reach the copy-in
   threshold, computed on the CPU by the C kernels over the tier's experts in the tier's format
   (`HostTier.fmt`, `--cpu-expert-format`: a float32 packed copy; bf16 with fp32 math, a bf16
   model's own weights read in place; int8 / int4 quantized), on a worker thread (`HostWorker`): the activations go to pinned, double-
   buffered staging with an asynchronous copy, the CPU computes while the caller's device runs
   its own experts (and the block its shared expert: `PlacedExperts.start`), the result comes
   back asynchronously and is added (in a piecewise decode step these calls are the cuts
   between CUDA graphs: models/placement/piecewise.py). Larger steps: per expert, by a token-count threshold,
   computed on the CPU or copied to the tokens' device for this pass (see `HostTier`).
`PlacedExperts` is the object installed as every block's `executor`; swapping a layer's state
is one dict assignment, so a rebalance between engine steps never mixes placements in a pass;
its `generation` changes with every swap (captured CUDA graphs are made again).

Virtual devices `cpu:N` are distinct placement devices backed by host memory (tests, CPU-only).

Experts kept in a checkpoint's quantized format (FP8, MXFP4, INT4/INT8: `models.quant.stack.QStack`,
a QTensor stack and its biases) are placed as they are: a device's stack is the selected experts'
quantized tensors and scales moved there (`QStack.select(...).to(device)`), a rebalance swaps
QTensor slices, a copy-in moves the expert's QTensor; the expert function (`PlacedExpertsFn`)
computes them with `models.quant.ops.qmoe`. Their CPU tier is the master stacks in place, in the
checkpoint's format, computed by `qmoe`'s CPU reference (the routed experts dequantized per call;
`qmoe_pairs` at decode sizes: nothing read back) on the tier's worker thread.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from collections.abc import Callable

import torch

from models.kernels.moe_align import expert_counts
from models.kernels.packed import Bf16Experts, PackedExperts, QuantizedExperts, moe_cpu
from models.kernels.quant import GROUP, QuantWeight
from models.kernels.plan import CPU_KERNEL_PAIRS_PER_EXPERT, PANEL, host_experts_kernel_loads
from models.placement import piecewise
from models.placement.plan import LayerPlan, Placement
from models.quant.stack import QStack

# steps of up to this many tokens dispatch with no host sync (every decode graph bucket fits)
SYNC_FREE_TOKENS = 256

# the CPU tier's expert formats (`--cpu-expert-format`): auto is the model dtype's natural one
TIER_FORMATS = ("auto", "float32", "bf16", "int8", "int4")


def tier_format(fmt: str, dtype: torch.dtype) -> str:
    """The format the CPU tier keeps its experts in: `fmt`, or for auto the model dtype's natural
    one (bf16 -> bf16, computed in place; float32 and float16 -> float32, exact)."""
    if fmt not in TIER_FORMATS:
        raise ValueError(f"CPU tier format must be one of {', '.join(TIER_FORMATS)}, not {fmt!r}")
    if fmt != "auto":
        return fmt
    return "bf16" if dtype == torch.bfloat16 else "float32"


def tier_expert_bytes(fmt: str, H: int, inter: int) -> int:
    """Bytes of one expert (w13 [2I, H] and w2 [H, I]) in a CPU tier format (values + scales)."""
    n = 3 * H * inter
    if fmt == "float32":
        return 4 * n
    if fmt == "bf16":
        return 2 * n
    values = 1 if fmt == "int8" else 0.5  # + one float16 scale per group of 32 along the input
    return int(n * values) + 2 * (2 * inter * (H // GROUP) + H * (inter // GROUP))

# (x [n, H], w13, w2 stacks, ids [n, k], weights [n, k]) -> [n, H]: a block's experts on one
# device's stacks (`MoEBlock.placed_fn`: the kernel plan's choice for that device type;
# a stack is a float tensor or a QStack: kept in a checkpoint's quantized format)
Stack = torch.Tensor | QStack
ExpertFn = Callable[[torch.Tensor, Stack, Stack, torch.Tensor, torch.Tensor], torch.Tensor]


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
    w13: torch.Tensor | QStack  # [n, 2I, H] (QStack: kept in a checkpoint's quantized format)
    w2: torch.Tensor | QStack  # [n, H, I]
    packed: PackedExperts | None = None  # CPU devices: the C experts kernel's copy of the stacks

    @property
    def nbytes(self) -> int:
        """Bytes of the stacks (and of a packed copy beside them)."""
        return _stack_bytes(self.w13) + _stack_bytes(self.w2) + (0 if self.packed is None else _packed_bytes(self.packed))


def _stack_bytes(w) -> int:
    return w.nbytes if isinstance(w, QStack) else w.numel() * w.element_size()


def _packed_bytes(p: PackedExperts) -> int:
    own = getattr(p, "_packed", None)  # made on first use
    return 0 if own is None else sum(t.numel() * t.element_size() for t in own if isinstance(t, torch.Tensor))


def _rows(w, idx: torch.Tensor, device: torch.device):
    """Experts `idx` of a stack, moved to `device` (a QStack's quantized tensors as they are)."""
    if isinstance(w, QStack):
        return w.select(idx).to(device)
    return w.index_select(0, idx.to(w.device)).to(device)


def _stage_dtype(g: DeviceGroup, x: torch.Tensor) -> torch.dtype:
    """The dtype a host computation stages activations in: the stacks' (quantized: x's)."""
    return x.dtype if isinstance(g.w13, QStack) else g.w13.dtype


@dataclass(frozen=True)
class HostTier:
    """Experts beyond the accelerator budget, computed on the CPU or copied in per pass.

    An expert with at least `fetch_threshold` tokens in a pass is copied to the tokens' device
    and computed there; with fewer it is computed on the CPU (0: always copy; a huge value:
    never copy). Weights are the master copy in host memory, indexed by logical id: the source
    of every expert that moves to a device (its original weights, whatever the tier's format)
    and of the copy-in; the CPU computes in the tier's format at every step size.
    """

    group: int  # index of the host group in LayerState.groups
    fetch_threshold: int
    # the tier's experts for the C kernels, in the tier's format (`fmt`): float32 -> a packed copy
    # (PackedExperts), bf16 -> Bf16Experts (a bf16 model's own weights in place, else a bf16
    # copy), int8 / int4 -> QuantizedExperts; and logical id -> row of that stack (on the index
    # device; -1 off the tier). None: the C kernels cannot serve them (the master stacks serve)
    packed: PackedExperts | None = None
    local: torch.Tensor | None = None  # [num_logical]
    fmt: str = "float32"
    nbytes: int = 0  # the tier's experts in their format (in place: the model's own bytes)
    in_place: bool = False  # computed from the model's own weights (no copy)


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
        counts = expert_counts(flat_ids, num_logical)  # [E] (bincount reads its size back)
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


def _run_on(device: torch.device, w13: Stack, w2: Stack, x: torch.Tensor, tokens: torch.Tensor,
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
    return start_layer(state, x, topk_ids, topk_w)()


def start_layer(state: LayerState, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                worker: HostWorker | None = None) -> Callable[[], torch.Tensor]:
    """Launch a layer's experts; returns the function that joins them into the output [T, H].

    The host tier, where there is one, is computed between the two on `worker` (inline without
    one); everything else is launched on its devices before this returns."""
    T, k = topk_ids.shape
    if len(state.groups) == 1 and state.groups[0].device == x.device and state.host is None \
            and not is_virtual(state.groups[0].name):
        g = state.groups[0]
        out = state.expert_fn(x, g.w13, g.w2, state.pair_groups(topk_ids)[1].view(T, k), topk_w)
        return lambda: out
    if T > SYNC_FREE_TOKENS or (state.host is not None and T >= state.host.fetch_threshold):
        out = _run_compact(state, x, topk_ids, topk_w)  # reads counts back: prefill-sized steps only
        return lambda: out
    group, rows = state.pair_groups(topk_ids)  # [T * k] each
    weights = topk_w.reshape(-1)  # [T * k]
    joins = []  # what the host computes: the CPU tier, CPU devices of an accelerator's model
    (worker or _INLINE).begin()
    if state.host is not None:
        joins.append(_start_host(state, worker, x, group, rows, weights, T, k))
    out = torch.zeros_like(x)
    # other devices' groups first (launched, or handed to the host), then x's own: the others
    # then work while x's device computes its experts (and, in a piecewise step, the cut that
    # launches them comes before the piece with x's device's experts)
    order = sorted(range(len(state.groups)), key=lambda gi: state.groups[gi].device == x.device)
    for gi in order:
        g = state.groups[gi]
        if state.host is not None and gi == state.host.group:
            continue
        ids, w = _device_buffer(group == gi, rows, weights, T, k)
        if g.device.type == "cpu" and x.device.type != "cpu":  # the host computes: staged, on the worker
            fn = lambda xh, ih, wh, g=g: _call(state.expert_fn, g, xh, ih, wh)  # noqa: E731
            joins.append((worker or _INLINE).submit(fn, x, ids, w, dtype=_stage_dtype(g, x), key=gi))
        elif g.device != x.device and piecewise.active() is not None:  # a cut of a piecewise step
            fn = lambda xd, idd, wd, g=g: _call(state.expert_fn, g, xd, idd, wd)  # noqa: E731
            joins.append(piecewise.active().peer_call(fn, x, ids, w, g.device, key=gi))
        elif g.device != x.device:
            ys = _call(state.expert_fn, g, x.to(g.device, non_blocking=True), ids.to(g.device, non_blocking=True),
                       w.to(g.device, non_blocking=True))
            out += ys.to(x.device, non_blocking=x.device.type == "cuda")
        else:
            out += _call(state.expert_fn, g, x, ids, w)

    def join() -> torch.Tensor:
        for j in joins:
            out.add_(j())
        return out
    return join


def _device_buffer(mine: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, T: int, k: int):
    """One device's fixed-size dispatch buffer ([T, k] stack rows, [T, k] weights): its own pairs
    as they are, every other pair padding with weight 0 on a row one of its pairs uses (row 0
    when it has none), so padding adds no weights to read. All on the device, no host sync."""
    fallback = torch.where(mine, rows, -1).amax().clamp(min=0)  # [] a row this device reads anyway
    ids = torch.where(mine, rows, fallback).view(T, k)
    return ids, torch.where(mine, weights, torch.zeros_like(weights)).view(T, k)


def _call(fn: ExpertFn, g: DeviceGroup, x, ids, w) -> torch.Tensor:
    """A device's experts over its buffer: the C kernel on its packed copy where the device has
    one (up to the kernel's batch sizes, as the plan's rule), else the plan's kernel."""
    if g.packed is not None and ids.numel() <= CPU_KERNEL_PAIRS_PER_EXPERT * g.w13.shape[0]:
        return moe_cpu(x, g.packed, ids, w.to(x.dtype))
    return fn(x, g.w13, g.w2, ids, w)


def _start_host(state: LayerState, worker: HostWorker | None, x, group, rows, weights, T: int, k: int):
    """Launch the host tier's pairs (C kernel where it can serve them, on the worker) -> join."""
    tier = state.host
    g = state.groups[tier.group]
    mine = group == tier.group
    if tier.packed is not None:
        local = tier.local[rows].clamp(min=0)  # [T * k] row of the tier's packed stack
        ids, w = _device_buffer(mine, local, weights, T, k)
        fn = lambda xh, ih, wh: moe_cpu(xh, tier.packed, ih, wh)  # noqa: E731
        return (worker or _INLINE).submit(fn, x, ids, w)
    ids, w = _device_buffer(mine, rows, weights, T, k)  # rows are logical ids: the master stacks
    fn = lambda xh, ih, wh: state.expert_fn(xh, g.w13, g.w2, ih, wh)  # noqa: E731
    return (worker or _INLINE).submit(fn, x, ids, w, dtype=_stage_dtype(g, x))


class HostWorker:
    """Computes the host tier on a thread of its own while the caller's device runs the rest.

    `submit(fn, x, ids, w)`: on an accelerator, x / ids / w are copied without blocking into
    pinned staging (two sets, used in turn: one can be read by a copy still in flight while the
    other is filled), an event marks them; the thread waits for the event (not the caller), runs
    `fn` on the CPU, writes the result into pinned staging; `join()` waits for the thread and
    starts the copy back. On the CPU the thread reads x in place."""

    def __init__(self, threads: bool = True):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cpu-experts") if threads else None
        self._staging: list[dict[str, torch.Tensor]] = [{}, {}]
        self._turn = 0
        self._lock = threading.Lock()

    def begin(self) -> None:
        """A new pass: its submits use the other staging set."""
        with self._lock:
            self._turn ^= 1

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._staging[self._turn]
        t = buf.get(name)
        if t is None or t.dtype != dtype or t.shape[0] < shape[0] or t.shape[1:] != shape[1:]:
            t = torch.empty((max(shape[0], 16),) + shape[1:], dtype=dtype, pin_memory=True)
            buf[name] = t
        return t[: shape[0]]

    def submit(self, fn, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor,
               dtype: torch.dtype = torch.float32, key: int = -1) -> Callable[[], torch.Tensor]:
        """`key`: which staging set (one per thing computed on the host in a pass). Inside a
        piecewise decode step (`piecewise.active()`) the call is a cut between two graphs."""
        pieces = piecewise.active()
        if pieces is not None:
            return pieces.host_call(self._pool, fn, x, ids, w, dtype, key)
        if x.device.type == "cpu":
            xh, ih, wh, event, yh = x.to(dtype), ids, w.to(dtype), None, None
        else:
            with self._lock:
                xh = self._buffer(f"x{key}", tuple(x.shape), dtype)
                ih = self._buffer(f"ids{key}", tuple(ids.shape), ids.dtype)
                wh = self._buffer(f"w{key}", tuple(w.shape), dtype)
                yh = self._buffer(f"y{key}", tuple(x.shape), dtype)
            xh.copy_(x, non_blocking=True)
            ih.copy_(ids, non_blocking=True)
            wh.copy_(w, non_blocking=True)
            event = torch.cuda.Event()
            event.record()

        def work() -> torch.Tensor:
            if event is not None:
                event.synchronize()
            with torch.inference_mode():
                y = fn(xh, ih, wh)
                if yh is None:
                    return y
                return yh.copy_(y)

        if self._pool is None:
            y = work()
            return lambda: y.to(x.device, x.dtype, non_blocking=True)
        future = self._pool.submit(work)
        return lambda: future.result().to(x.device, x.dtype, non_blocking=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


_INLINE = HostWorker(threads=False)


def _run_compact(state: LayerState, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
    """Large steps: each device gets only its pairs and the tokens they need (counts read back)."""
    T, k = topk_ids.shape
    group, rows = state.pair_groups(topk_ids)  # [T * k] each
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
        _run_host_cpu(tier, g, x, tokens, rows, weights, out, remote, fn)
        return
    fetched = fetch.nonzero().squeeze(1)  # [F] logical ids to copy in
    remap = torch.full_like(counts, -1)
    remap[fetched] = torch.arange(fetched.numel(), device=remap.device)
    hot = fetch[rows]  # [n] pairs whose expert is copied in
    w13 = _rows(g.w13, fetched, x.device)  # [F, 2I, H]
    w2 = _rows(g.w2, fetched, x.device)  # [F, H, I]
    _run_on(x.device, w13, w2, x, tokens[hot], remap[rows[hot]], weights[hot], out, False, fn)
    cold = ~hot
    if bool(cold.any()):
        _run_host_cpu(tier, g, x, tokens[cold], rows[cold], weights[cold], out, remote, fn)


def _run_host_cpu(tier: HostTier, g: DeviceGroup, x, tokens, rows, weights, out, remote: bool, fn: ExpertFn) -> None:
    """Host-tier pairs computed on the CPU (rows: logical ids). In a format other than float32
    the tier's own kernel computes them at every step size (prefill sees the weights decode
    sees); float32 keeps the plan's kernel on the master (oneDNN above the C kernel's sizes)."""
    if tier.packed is None or tier.fmt == "float32":
        _run_on(g.device, g.w13, g.w2, x, tokens, rows, weights, out, remote, fn)
        return
    uniq, inv = torch.unique(tokens, return_inverse=True)  # each token travels once
    xh = x.index_select(0, uniq).to("cpu", torch.float32)  # [U, H]
    ids = tier.local[rows].to("cpu").view(-1, 1)  # [n, 1] rows of the tier's stack
    ys = moe_cpu(xh.index_select(0, inv.to("cpu")), tier.packed, ids, weights.to("cpu", torch.float32).view(-1, 1))
    partial = torch.zeros_like(xh).index_add_(0, inv.to("cpu"), ys)  # [U, H]
    out.index_add_(0, uniq, partial.to(out.device, out.dtype))


def build_layer_state(plan: LayerPlan, master_w13: Stack, master_w2: Stack, index_device: torch.device,
                      expert_fn: ExpertFn, *, host: str | None = None, fetch_threshold: int = 1 << 62,
                      previous: LayerState | None = None, tier_format: str = "auto") -> tuple[LayerState, int]:
    """Build a layer's stacks (reusing rows already on a device) -> (state, experts copied).

    `master_w13 [E, 2I, H]` / `master_w2 [E, H, I]` are the full expert weights (the host tier
    computes straight from them, so they must be in host memory when a host tier is used).
    `tier_format`: the format the host tier keeps its experts in (`TIER_FORMATS`, `_host_tier`).
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
            host_tier = _host_tier(gi, fetch_threshold, logicals, master_w13, master_w2, expert_fn, index_device,
                                   previous.host if previous is not None else None, tier_format)
            continue
        logicals = tuple(plan.physical[s].logical for s in slots)
        prev = old.get(name)
        if prev is not None and prev.logicals == logicals:
            groups.append(prev)
        else:
            dev = torch_device(name)
            w13, w2, n = _stack(dev, logicals, master_w13, master_w2, prev)
            copied += n
            packed = PackedExperts(w13, w2) if dev.type == "cpu" and not isinstance(w13, QStack) \
                and w13.dtype == torch.float32 and _c_kernel(expert_fn, w13) else None
            groups.append(DeviceGroup(name, dev, logicals, w13, w2, packed))
        for j, s in enumerate(slots):
            slot_group[s], slot_local[s] = gi, j
    max_rep = max(len(r) for r in plan.replicas)
    table = [list(r) + [r[0]] * (max_rep - len(r)) for r in plan.replicas]
    as_t = lambda v: torch.tensor(v, dtype=torch.long, device=index_device)
    state = LayerState(plan, tuple(groups), as_t(table), as_t([len(r) for r in plan.replicas]),
                       as_t(slot_group), as_t(slot_local), expert_fn, host_tier)
    return state, copied


def _c_kernel(expert_fn: ExpertFn, w13: torch.Tensor) -> bool:
    """Whether the C experts kernel serves these experts: the plan says so for CPU devices
    (`PlacedExpertsFn.c_kernel`), their sizes fit its panels and it loads here."""
    wants = getattr(expert_fn, "c_kernel", None)
    if wants is None or not wants("cpu"):
        return False
    if w13.shape[-1] % PANEL or w13.shape[1] % (2 * PANEL):
        return False
    return host_experts_kernel_loads()


class _Prepacked(PackedExperts):
    """A packed copy made once (the host tier's float32 copy: the sources are not kept)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        super().__init__(w13, w2)
        self._packed = torch.ops.moe_serve.moe_pack_cpu(w13, w2)
        self.sources = self.w13 = self.w2 = ()  # type: ignore[assignment]

    def get(self):
        return self._packed


def _dtype_format(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bf16"}.get(dtype, str(dtype).replace("torch.", ""))


def _host_tier(gi: int, fetch_threshold: int, logicals: tuple[int, ...], master_w13, master_w2, expert_fn,
               index_device: torch.device, previous: HostTier | None, fmt: str = "auto") -> HostTier:
    """The host tier of a layer: its experts in the tier's format for the C kernels where they
    serve them (reused when the tier holds the same experts in the same format as before):
    float32 -> a packed copy; bf16 -> a bf16 model's own weights in place (no copy), other
    dtypes a bf16 copy; int8 / int4 -> quantized from the master (round to nearest, groups of 32).
    The master stacks stay the source: an expert moving to a device takes its original weights.
    Stacks kept in a checkpoint's quantized format (QStack): the tier is the master in place, in
    that format (computed by the expert function: `qmoe`); only `auto` names it."""
    if isinstance(master_w13, QStack):
        qfmt = master_w13.fmt.value
        if fmt != "auto":
            raise ValueError(f"--cpu-expert-format {fmt}: the experts are kept in the checkpoint's {qfmt} format "
                             f"and the CPU tier computes them in it (no conversion); use --cpu-expert-format auto")
        nbytes = len(logicals) * (master_w13.expert_bytes() + master_w2.expert_bytes())
        return HostTier(gi, fetch_threshold, fmt=qfmt, nbytes=nbytes, in_place=True)
    H, inter = master_w13.shape[2], master_w2.shape[2]
    requested, fmt = fmt, tier_format(fmt, master_w13.dtype)
    natural = _dtype_format(master_w13.dtype)
    quantized = fmt in ("int8", "int4")
    if not logicals or not _c_kernel(expert_fn, master_w13) or (quantized and (H % GROUP or inter % GROUP)):
        if logicals and requested != "auto" and fmt != natural:  # the master's dtype is all the fallback has
            raise ValueError(f"the CPU tier's {fmt} format needs the C experts kernel for these experts (plain "
                             f"SwiGLU experts, sizes multiples of {GROUP if quantized else 2 * PANEL}, the C kernels "
                             f"built): use --cpu-expert-format auto")
        nbytes = len(logicals) * (master_w13[0].numel() + master_w2[0].numel()) * master_w13.element_size()
        return HostTier(gi, fetch_threshold, fmt=natural, nbytes=nbytes, in_place=True)
    nbytes = len(logicals) * tier_expert_bytes(fmt, H, inter)
    in_place = fmt == "bf16" and master_w13.dtype == torch.bfloat16 and master_w13.is_contiguous() \
        and master_w2.is_contiguous()
    if in_place:  # the kernel reads the model's own rows: logical id = row
        local_t = torch.arange(master_w13.shape[0], dtype=torch.long, device=index_device)
    else:
        local = [-1] * master_w13.shape[0]
        for j, e in enumerate(logicals):
            local[e] = j
        local_t = torch.tensor(local, dtype=torch.long, device=index_device)
    if previous is not None and previous.packed is not None and previous.local is not None \
            and previous.fmt == fmt and torch.equal(previous.local.cpu(), local_t.cpu()):
        return replace(previous, group=gi, fetch_threshold=fetch_threshold, nbytes=nbytes)
    packed: PackedExperts
    if in_place:
        packed = Bf16Experts(master_w13, master_w2)
    else:
        src = torch.tensor(logicals, dtype=torch.long)
        w13, w2 = master_w13.index_select(0, src), master_w2.index_select(0, src)
        if fmt == "float32":
            packed = _Prepacked(w13.float(), w2.float())
        elif fmt == "bf16":
            packed = Bf16Experts(w13.bfloat16(), w2.bfloat16())
        else:
            packed = QuantizedExperts(QuantWeight.of(w13, fmt), QuantWeight.of(w2, fmt))
    return HostTier(gi, fetch_threshold, packed, local_t, fmt=fmt, nbytes=nbytes, in_place=in_place)


def _stack(device: torch.device, logicals: tuple[int, ...], master_w13, master_w2, prev: DeviceGroup | None):
    """New stacks for a device: rows it already holds are copied on the device, others come from
    the master copy. Returns (w13, w2, number of experts brought in)."""
    if isinstance(master_w13, QStack):
        return _qstack(device, logicals, master_w13, master_w2, prev)
    n = len(logicals)
    assert isinstance(master_w13, torch.Tensor) and isinstance(master_w2, torch.Tensor)
    w13 = torch.empty((n,) + tuple(master_w13.shape[1:]), dtype=master_w13.dtype, device=device)
    w2 = torch.empty((n,) + tuple(master_w2.shape[1:]), dtype=master_w2.dtype, device=device)
    have = {e: i for i, e in enumerate(prev.logicals)} if prev is not None else {}
    keep = [(j, have[e]) for j, e in enumerate(logicals) if e in have]
    bring = [(j, e) for j, e in enumerate(logicals) if e not in have]
    if keep:
        assert prev is not None and isinstance(prev.w13, torch.Tensor) and isinstance(prev.w2, torch.Tensor)
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


def _qstack(device: torch.device, logicals: tuple[int, ...], master_w13: QStack, master_w2: QStack,
            prev: DeviceGroup | None):
    """`_stack` for quantized stacks: the rows the device holds are selected there, the others'
    quantized tensors and scales come from the master; joined in the new order."""
    have = {e: i for i, e in enumerate(prev.logicals)} if prev is not None and isinstance(prev.w13, QStack) else {}
    keep = [(j, have[e]) for j, e in enumerate(logicals) if e in have]
    bring = [(j, e) for j, e in enumerate(logicals) if e not in have]
    parts13: list[QStack] = []
    parts2: list[QStack] = []
    order: list[int] = []
    if keep:
        assert prev is not None and isinstance(prev.w13, QStack) and isinstance(prev.w2, QStack)
        src = torch.tensor([i for _, i in keep], device=device)
        parts13.append(prev.w13.select(src))
        parts2.append(prev.w2.select(src))
        order += [j for j, _ in keep]
    if bring:
        src = torch.tensor([e for _, e in bring], device=master_w13.device)
        parts13.append(master_w13.select(src).to(device))
        parts2.append(master_w2.select(src).to(device))
        order += [j for j, _ in bring]
    w13, w2 = QStack.cat(parts13), QStack.cat(parts2)
    if order != sorted(order):  # back to the new stack's order
        inv = torch.argsort(torch.tensor(order)).to(device)
        w13, w2 = w13.select(inv), w2.select(inv)
    return w13, w2, len(bring)


class PlacedExperts:
    """The executor installed in every MoE block: runs layer `layer_idx` per its current state."""

    def __init__(self, layer_ids: list[int], host_worker: bool = True):
        self.layer_ids = list(layer_ids)  # model layer index of each MoE layer, in order
        self.states: dict[int, LayerState] = {}  # model layer index -> state
        # the CPU tier's thread (made on first use); False: the tier computes inline
        self.host_worker = host_worker
        self._worker: HostWorker | None = None
        # changes with every swap: a CUDA graph captured at another generation holds old tensors
        self.generation = 0

    def start(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor,
              topk_w: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Launch layer `layer_idx`'s experts; the returned function joins them ([T, H])."""
        state = self.states[layer_idx]
        worker = None
        if state.host is not None and self.host_worker:
            if self._worker is None:
                self._worker = HostWorker()
            worker = self._worker
        return start_layer(state, x, topk_ids, topk_w, worker)

    def __call__(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
        return self.start(layer_idx, x, topk_ids, topk_w)()

    def sync_free_tokens(self) -> int:
        """The most tokens a pass can have and read nothing back to the host (so a CUDA graph can
        hold it): past a host tier's copy-in threshold the experts' counts are read back."""
        limit = SYNC_FREE_TOKENS
        for state in self.states.values():
            if state.host is not None:
                limit = min(limit, state.host.fetch_threshold - 1)
        return limit

    def swap(self, layer_idx: int, state: LayerState) -> None:
        self.states[layer_idx] = state  # one reference assignment: a pass sees old or new, never a mix
        self.generation += 1

    def resident_bytes(self) -> dict[str, int]:
        """{placement device: bytes of the expert stacks it holds (and their packed copies), all
        layers}; the host tier's experts (the master stacks, computed in place) count under its
        device only where it keeps a copy of its own (its `nbytes` when not in place)."""
        out: dict[str, int] = {}
        for state in self.states.values():
            for gi, g in enumerate(state.groups):
                if state.host is not None and gi == state.host.group:
                    n = 0 if state.host.in_place else state.host.nbytes
                else:
                    n = g.nbytes
                out[g.name] = out.get(g.name, 0) + n
        return out

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None

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
