"""AsyncEngine: the asyncio face of EngineCore, implementing the EngineClient protocol.

The core runs in a thread of its own (PyTorch releases the GIL inside its kernels), so the
event loop keeps serving HTTP while a step computes. Requests and aborts reach the thread
through a queue; each request's output deltas come back through an asyncio queue of its
own. An exception inside a step fails only the requests of that step (their blocks are
freed) and the engine carries on; after `MAX_CONSECUTIVE_FAILURES` failed steps in a row it
declares itself dead: `check_health` raises and the server exits non-zero.

Progress watchdog: an engine that holds requests but computes no token for
`progress_timeout` seconds (a wedged scheduler, a hung kernel) is unhealthy too, so that
Kubernetes restarts it rather than leaving its clients waiting.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from models.build import trim_host_heap
from models.kernels.cpu_build import release_openmp_threads
from server.engine.admission import InFlight
from server.engine.native.core import EngineCore, StepError
from server.engine.protocol import EngineDeadError, ModelInfo
from server.engine.request import EngineRequest, RequestOutput
from server.engine.stats import PlacementInfo, StatLogger

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_FAILURES = 3


class AsyncEngine:
    def __init__(self, core: EngineCore, model_info: ModelInfo, max_queue_len: int = 1024, max_num_seqs: int = 64,
                 progress_timeout: float = 300.0):
        self.core = core
        self.model_info = model_info
        self.tokenizer = core.tokenizer
        # requests in flight, each with (its event loop, its output queue); past the limit new
        # ones are refused (429)
        self.in_flight = InFlight(max_num_seqs, max_queue_len)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._loggers: list[StatLogger] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self._dead: str | None = None
        self.progress_timeout = progress_timeout  # 0: no watchdog
        self._last_progress = time.monotonic()  # last step that computed tokens, or idle

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is None:
            self._stop = False
            # the steps run on the engine thread: this thread's OpenMP workers (from loading the
            # model) would cut the engine thread's workers' spinning to ~100 loops (cpu_build.py)
            release_openmp_threads()
            trim_host_heap()  # what loading freed goes back before serving (RSS)
            self._thread = threading.Thread(target=self._loop, name="engine-core", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 30)
            if self._thread.is_alive():  # a step still running: leave what it may touch open
                return
            self._thread = None
        self.core.close()

    # -- protocol -----------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[RequestOutput]:
        if self._dead:
            raise EngineDeadError(self._dead)
        max_tokens = self.core.validate(request)  # raises SamplingParamsError / RequestTooLongError
        stream: asyncio.Queue = asyncio.Queue()
        self.in_flight.admit(request.request_id, (asyncio.get_running_loop(), stream))  # or 429
        self._inbox.put(("add", (request, max_tokens)))
        self._wake.set()
        finished = False
        try:
            while True:
                out: RequestOutput | BaseException = await stream.get()
                if isinstance(out, BaseException):
                    raise out
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self.in_flight.release(request.request_id)
            if not finished:  # the consumer went away (disconnect, timeout): free its blocks
                self._inbox.put(("abort", request.request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    async def check_health(self) -> None:
        if self._dead:
            raise EngineDeadError(self._dead)
        if self._thread is not None and not self._thread.is_alive() and not self._stop:
            raise EngineDeadError("engine thread exited")
        stalled = time.monotonic() - self._last_progress
        if self.progress_timeout and len(self.in_flight) and stalled > self.progress_timeout:
            raise EngineDeadError(f"no progress for {stalled:.0f}s with {len(self.in_flight)} request(s) in "
                                  f"flight (--engine-progress-timeout {self.progress_timeout:g}s)")

    def add_stat_logger(self, logger: StatLogger) -> None:
        self._loggers.append(logger)

    def placement(self) -> PlacementInfo | None:
        return self.core.placement_info()

    def add_placement_listener(self, callback) -> None:
        manager = self.core.placement_manager
        if manager is not None:
            manager.on_change.append(callback)

    def num_unfinished_requests(self) -> int:
        return len(self.in_flight)

    # -- KV introspection (tests, /metrics) ---------------------------------------------
    def kv_cache_usage(self) -> float:
        return self.core.pool.usage

    def num_free_kv_blocks(self) -> int:
        return self.core.pool.num_free

    def num_total_kv_blocks(self) -> int:
        return self.core.pool.num_blocks

    # -- the engine thread ---------------------------------------------------------------
    def _deliver(self, out: RequestOutput | tuple[str, BaseException]) -> None:
        rid, item = (out.request_id, out) if isinstance(out, RequestOutput) else out
        target = self.in_flight.get(rid)
        if target is not None:
            loop, stream = target
            try:
                loop.call_soon_threadsafe(stream.put_nowait, item)
            except RuntimeError:  # the loop is closed
                pass

    def _drain_inbox(self) -> bool:
        """Apply queued adds and aborts; returns whether any abort happened."""
        aborted = False
        while True:
            try:
                kind, arg = self._inbox.get_nowait()
            except queue.Empty:
                return aborted
            if kind == "add":
                request, max_tokens = arg
                try:
                    self.core.add_request(request, max_tokens)  # validated once, in generate
                except Exception as exc:  # noqa: BLE001 - reported to that request only
                    self._deliver((request.request_id, exc))
            elif kind == "abort":
                aborted |= self.core.abort(arg)

    def _loop(self) -> None:
        failures = 0
        while not self._stop:
            aborted = self._drain_inbox()
            if aborted and not self.core.has_unfinished():
                self._record(*self.core.idle_stats(), None)  # the gauges must not go stale
            if not self.core.has_unfinished():
                self._last_progress = time.monotonic()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs, stats, finished, routing = self.core.step()
                failures = 0
                if stats.num_batched_tokens:
                    self._last_progress = time.monotonic()
                else:  # work but nothing schedulable now: don't spin
                    self._wake.wait(timeout=0.005)
                    self._wake.clear()
            except StepError as err:
                failures += 1
                # the requests of the failed step (all of them if it failed while scheduling)
                in_step, exc = err.request_ids, err.cause
                log.exception("engine step failed (%d in a row); failing %d requests", failures, len(in_step))
                if failures >= MAX_CONSECUTIVE_FAILURES:  # dead before anyone hears of the failure
                    self._dead = f"engine failed {failures} steps in a row: {exc}"
                    log.error("engine is dead: %s", self._dead)
                for out in self.core.fail_requests(in_step, f"internal error in the engine step: {exc}"):
                    self._deliver(out)
                self._record(*self.core.idle_stats(), None)
                if self._dead:
                    self._fail_all(EngineDeadError(self._dead))
                    return
                continue
            # the metrics first: a client that has its last token and then scrapes /metrics finds
            # the step counted (the routing counters, the finished request's histograms)
            self._record(stats, finished, routing)
            for out in outputs:
                self._deliver(out)
        self._fail_all(EngineDeadError("engine stopped"))

    def _record(self, stats, finished, routing) -> None:
        for logger in self._loggers:
            try:
                logger.record(stats, finished, routing)
            except Exception:  # noqa: BLE001 - metrics must never stop the engine
                log.exception("stat logger failed")

    def _fail_all(self, exc: BaseException) -> None:
        for rid in self.in_flight.ids():
            self._deliver((rid, exc))

