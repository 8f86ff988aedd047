"""Piecewise decode steps: CUDA graphs split at the calls a graph cannot hold.

A decode step whose experts are partly computed by the host (the CPU expert tier, or CPU
devices of an accelerator's model: `HostWorker.submit`) cannot be one CUDA graph: a graph has
no place for a Python thread that waits, computes and hands a result back. As vLLM's piecewise
capture splits a model's forward at the ops it cannot capture and runs them eagerly between
replays, a `Pieces` object records one bucket's forward as

    piece 0 | start(call 0) | piece 1 | finish(call 0) | piece 2 | start(call 1) | ...

where every piece is a CUDA graph (captured on the device, replayed in order) and every
`start` / `finish` runs eagerly on the host between two replays. The cuts are made where the
executor reaches the host, so the model code is not split by hand:

- **start** (`HostWorker.submit`, inside `start_layer`): the piece before it ends with the
  attention, the router, the dispatch buffer of the host's pairs and their copy into the
  call's static device buffers (`HostCall.stage`, captured). `start` then copies those to
  pinned staging without blocking, records an event and hands the CPU work to the worker
  thread; the thread waits for the event (the host thread does not) and computes.
- **the piece between** holds the device's own experts and the block's shared expert
  (`MoEBlock.forward` launches the executor before the shared expert and joins it after): the
  GPU runs them while the CPU computes the tier, which is the overlap the eager path had.
- **finish** (the join): waits for the thread, copies the result from pinned staging into the
  call's static device output without blocking; the next piece adds that output into the
  layer's result and goes on to the next layer's attention and router, up to the next start.

So the host tier's CPU time hides behind the device experts and shared expert of its own
layer, as in the eager path, and the GPU never waits on the host except at `finish`.

Every buffer a cut touches is static (made while the pieces are recorded), so a replay writes
and reads the same addresses: the device inputs (`x_s`, `ids_s`, `w_s`), the pinned staging
and the device output `y_s`. Each call of a step has its own set; the buckets share them (the
smaller ones take the first rows of the largest's: one bucket's step runs at a time). A step's
`start` of a call comes after the previous step's `finish` of it (and after that copy back, in
stream order), so one set per call is race-free (no double buffering needed here). The calls hold the executor's
function as it was when recorded: a placement that moves (a new generation) needs the
pieces recorded again, as whole graphs do (`server/engine/native/runner.py`).

Without CUDA graphs (`cuda_graphs=False`: the CPU, tests) the same `Pieces` runs the forward
eagerly and every cut takes the next recorded call, which stages into its static buffers,
computes on the worker thread and returns its static output: the segmentation's data flow
(cut order, static buffers, the functions recorded) is what the eager pieces check anywhere.

Work on another GPU (`PeerCall`, experts placed on several GPUs): a graph captured on one
device's stream does not hold kernels launched on another device's stream, and PyTorch's
graph memory pool belongs to one device. So the other GPU's experts are a cut too: `start`
launches them eagerly on a side stream of that GPU (the inputs copied in after the piece that
staged them), they run while the main GPU replays its next piece (its own experts, the shared
expert), and `finish` copies the result back into the call's static output, the main stream
waiting for that copy only: events, no host sync. The kernel plan keeps decode graphs off for
several GPUs unless asked (`KernelPlan.for_engine(graphs_across_gpus=True)`): this has not run
on two GPUs yet.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

_STATE = threading.local()


def active() -> Pieces | None:
    """The `Pieces` recording or running on this thread, if any."""
    return getattr(_STATE, "pieces", None)


def _static(storage: dict | None, name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device | str = "cpu", pin: bool = False) -> torch.Tensor:
    """A static buffer: the first rows of `storage[name]` where it has them (the buckets of one
    engine share their calls' buffers: only one bucket's step runs at a time, and the largest
    is recorded first), else a new one kept there."""
    t = storage.get(name) if storage is not None else None
    if t is None or t.dtype != dtype or t.device != torch.device(device) or t.shape[1:] != shape[1:] \
            or t.shape[0] < shape[0]:
        t = torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)
        if storage is not None:
            storage[name] = t
    return t[: shape[0]]


class HostCall:
    """One host computation of a step (`fn(x, ids, w)` on the CPU), on static buffers."""

    def __init__(self, fn, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, dtype: torch.dtype,
                 pool: ThreadPoolExecutor | None, key: int, storage: dict | None = None, index: int = 0):
        self.fn, self.pool, self.key = fn, pool, key
        self.signature = ("host", key, tuple(x.shape), tuple(ids.shape), dtype)
        dev = x.device
        buf = lambda name, t, dt, **kw: _static(storage, f"{index}.{name}", tuple(t.shape), dt, **kw)  # noqa: E731
        self.x_s = buf("x", x, dtype, device=dev)  # [T, H] device inputs
        self.ids_s = buf("ids", ids, ids.dtype, device=dev)  # [T, k]
        self.w_s = buf("w", w, dtype, device=dev)  # [T, k]
        self.y_s = buf("y", x, x.dtype, device=dev)  # [T, H] device output
        self.cuda = dev.type == "cuda"
        if self.cuda:  # pinned staging: asynchronous copies both ways
            self.xh, self.ih = buf("xh", x, dtype, pin=True), buf("ih", ids, ids.dtype, pin=True)
            self.wh, self.yh = buf("wh", w, dtype, pin=True), buf("yh", x, dtype, pin=True)
            self.event = torch.cuda.Event()
            # a copy from the host that also converts would stage through unpinned memory
            self.y_d = buf("yd", x, dtype, device=dev) if dtype != x.dtype else None
        else:
            self.xh, self.ih, self.wh, self.yh, self.event = self.x_s, self.ids_s, self.w_s, None, None
            self.y_d = None
        self._future: Future | None = None
        self._y: torch.Tensor | None = None

    def stage(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> None:
        """Device work before the cut (part of the piece): the inputs into the static buffers."""
        self.x_s.copy_(x)
        self.ids_s.copy_(ids)
        self.w_s.copy_(w)

    def _work(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()  # the staging copies have landed (on the worker, not the caller)
        with torch.inference_mode():
            y = self.fn(self.xh, self.ih, self.wh)
            return y if self.yh is None else self.yh.copy_(y)

    def start(self) -> None:
        if self.cuda:
            self.xh.copy_(self.x_s, non_blocking=True)
            self.ih.copy_(self.ids_s, non_blocking=True)
            self.wh.copy_(self.w_s, non_blocking=True)
            self.event.record()
        if self.pool is not None:
            self._future = self.pool.submit(self._work)

    def finish(self) -> None:
        if self._future is not None:
            y, self._future = self._future.result(), None
        else:  # no thread: computed here, while the device runs the piece launched before
            y = self._work()
        if self.y_d is not None:  # the host's dtype differs: in, then converted on the device
            self.y_d.copy_(y, non_blocking=True)
            self.y_s.copy_(self.y_d)
        else:
            self.y_s.copy_(y, non_blocking=self.cuda)


class PeerCall:
    """A device group's experts on another GPU: launched eagerly on that device's side stream
    between two pieces, ordered against the main stream by events only (no host sync).

    PyTorch orders a cross-device copy against the current streams of both devices (a two-way
    event barrier, the copy on the source device's stream). So `start`, under the side stream,
    copies the inputs in (on the main stream, after the piece that staged them; the side
    stream waits for it) and launches the experts on the side stream, which then run while the
    main stream replays the next piece; `finish`, under the side stream again, copies the
    result back into the static output (the side stream waits for the main stream's piece,
    the main stream for the copy): the join."""

    _streams: dict[torch.device, torch.cuda.Stream] = {}

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x, ids, w,
                 device: torch.device, key: int, storage: dict | None = None, index: int = 0):
        self.fn, self.key, self.device = fn, key, device
        self.signature = ("peer", key, tuple(x.shape), tuple(ids.shape), x.dtype)
        buf = lambda name, t: _static(storage, f"{index}.{name}", tuple(t.shape), t.dtype, device=t.device)  # noqa: E731
        self.x_s, self.ids_s, self.w_s, self.y_s = buf("x", x), buf("ids", ids), buf("w", w), buf("y", x)
        self.cuda = x.device.type == "cuda" and device.type == "cuda"
        self._y: torch.Tensor | None = None
        if self.cuda and device not in PeerCall._streams:
            PeerCall._streams[device] = torch.cuda.Stream(device)

    def stage(self, x, ids, w) -> None:
        self.x_s.copy_(x)
        self.ids_s.copy_(ids)
        self.w_s.copy_(w)

    def _on_peer(self):
        if not self.cuda:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(PeerCall._streams[self.device]))
        return stack

    def start(self) -> None:
        dev = self.device
        with self._on_peer():
            self._y = self.fn(self.x_s.to(dev, non_blocking=True), self.ids_s.to(dev, non_blocking=True),
                              self.w_s.to(dev, non_blocking=True))

    def finish(self) -> None:
        with self._on_peer():
            self.y_s.copy_(self._y, non_blocking=True)
        self._y = None


class Pieces:
    """One bucket's decode step as graphs between cuts (or, without CUDA graphs, eagerly).

    `record` runs the forward eagerly once and makes every call's static buffers (outside any
    capture: device and pinned allocations, events); `capture` (CUDA) runs it again under
    stream capture, cutting a new graph at every call recorded, in the same order; `replay`
    replays the graphs with the calls' host work between them; `run_eager` runs the forward
    with every cut taking its recorded call (no graphs)."""

    def __init__(self, cuda_graphs: bool, pool=None, storage: dict | None = None):
        self.cuda_graphs = cuda_graphs
        self.pool = pool  # the graph memory pool the pieces share (with other buckets)
        self.storage = storage  # the calls' static buffers, shared with other buckets (`_static`)
        self.calls: list[HostCall | PeerCall] = []
        self.actions: list[tuple[str, HostCall | PeerCall]] = []  # ("start" | "finish", call) per cut
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self._mode = ""  # "record" | "capture" | "eager" while active
        self._next = 0  # capture and eager runs: the next recorded call

    @property
    def num_pieces(self) -> int:
        return len(self.actions) + 1

    # -- the cut points (called by the executor while this is active) -----------------------------
    def host_call(self, pool: ThreadPoolExecutor | None, fn, x, ids, w, dtype, key: int) -> Callable[[], torch.Tensor]:
        if self._mode == "record":
            call: HostCall | PeerCall = HostCall(fn, x, ids, w, dtype, pool, key, self.storage, len(self.calls))
            self.calls.append(call)
        else:
            call = self._take(("host", key, tuple(x.shape), tuple(ids.shape), dtype))
        return self._cut_pair(call, x, ids, w)

    def peer_call(self, fn, x, ids, w, device: torch.device, key: int) -> Callable[[], torch.Tensor]:
        if self._mode == "record":
            call: HostCall | PeerCall = PeerCall(fn, x, ids, w, device, key, self.storage, len(self.calls))
            self.calls.append(call)
        else:
            call = self._take(("peer", key, tuple(x.shape), tuple(ids.shape), x.dtype))
        return self._cut_pair(call, x, ids, w)

    def _take(self, signature) -> HostCall | PeerCall:
        if self._next >= len(self.calls) or self.calls[self._next].signature != signature:
            raise RuntimeError(f"the decode step reached a host call {signature} that its pieces did not record "
                               f"(call {self._next} of {len(self.calls)}): the pieces must be recorded again")
        call = self.calls[self._next]
        self._next += 1
        return call

    def _cut_pair(self, call, x, ids, w) -> Callable[[], torch.Tensor]:
        call.stage(x, ids, w)  # device work: part of the piece that ends here
        self._cut("start", call)

        def join() -> torch.Tensor:
            self._cut("finish", call)
            return call.y_s  # read by the next piece
        return join

    def _cut(self, kind: str, call) -> None:
        if self._mode == "record":
            self.actions.append((kind, call))
        if self._mode == "capture":  # end this piece's capture, begin the next one's; nothing runs
            self.graphs[-1].capture_end()
            self._begin_piece()
            return
        getattr(call, kind)()

    def _begin_piece(self) -> None:
        if self.pool is None:  # made before any capture (a graph's own pool is known only after it)
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(self.pool)
        self.graphs.append(graph)

    def _active(self, mode: str, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        _STATE.pieces, self._mode, self._next = self, mode, 0
        try:
            out = forward()
        finally:
            _STATE.pieces, self._mode = None, ""
        if mode != "record" and self._next != len(self.calls):
            raise RuntimeError(f"the decode step made {self._next} host calls; its pieces recorded {len(self.calls)}")
        return out

    # -- recording and running ----------------------------------------------------------------------
    def record(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run `forward` eagerly, making a call (with its static buffers) at every cut."""
        self.calls, self.actions, self.graphs = [], [], []
        return self._active("record", forward)

    def capture(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Capture `forward` as graphs cut at the recorded calls (on the current stream, which
        must be a side stream, as for `torch.cuda.graph`); returns its static output."""
        self.graphs = []
        self._begin_piece()

        def captured() -> torch.Tensor:
            try:
                return forward()
            finally:
                self.graphs[-1].capture_end()
        return self._active("capture", captured)

    def replay(self) -> None:
        """The captured step: every piece, with its cut's host work between."""
        graphs = self.graphs
        graphs[0].replay()
        for (kind, call), graph in zip(self.actions, graphs[1:]):
            getattr(call, kind)()
            graph.replay()

    def run_eager(self, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Without graphs: `forward` eagerly, each cut taking the next recorded call in order."""
        return self._active("eager", forward)
