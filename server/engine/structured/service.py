"""The API side of grammar compilation: cache, compile pool, and the requests waiting on them.

`await GrammarService.compile(spec)` returns the spec's compiled grammar:
- from the cache (bytes-bounded, failures kept: a spec refused once is refused at once);
- else from a compile already under way for an equal spec (its requests share it);
- else from a new job in the compile pool (processes with time and memory budgets).
A waiting request that is cancelled (its client left) stops waiting at once; a job whose
requests have all left before it started is dropped from the pool's queue. A job that already
runs is finished (within its budget) and its result kept for the next request.

Everything here runs on the event loop, except the pool's dispatcher threads, whose results
come back through `call_soon_threadsafe`. Nothing blocks the loop: the pool deserializes on
its threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from server.engine.structured.backend import CompiledStructure, GrammarCompiler, GrammarError
from server.engine.structured.cache import GrammarCache, renamed
from server.engine.structured.compile_pool import CompileJob, CompilePool
from server.engine.structured.limits import GrammarLimits
from server.engine.structured.spec import StructuredSpec

@dataclass
class _Flight:
    job: CompileJob | None  # None once finished
    future: asyncio.Future
    waiters: int = 0


class GrammarService:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...] = (),
                 limits: GrammarLimits | None = None) -> None:
        self.limits = limits or GrammarLimits()
        self.compiler = GrammarCompiler(tokenizer, vocab_size, stop_token_ids)  # this side: the tokenizer table
        self.cache = GrammarCache(self.limits.cache_bytes)
        self._pool: CompilePool | None = None
        self._flights: dict[tuple, _Flight] = {}
        # metrics: on_compile(outcome, seconds) from the pool's threads
        self.on_compile: Callable[[str, float], None] | None = None

    @property
    def pool(self) -> CompilePool:
        if self._pool is None:
            lim = self.limits
            self._pool = CompilePool(self.compiler, workers=lim.workers, timeout=lim.timeout,
                                     max_grammar_bytes=lim.max_grammar_bytes,
                                     max_queue=lim.queue_per_worker * lim.workers, on_done=self._compiled)
        return self._pool

    # -- stats (metrics) ---------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return self._pool.waiting if self._pool is not None else 0

    @property
    def running(self) -> int:
        return self._pool.running if self._pool is not None else 0

    def _compiled(self, outcome: str, seconds: float) -> None:
        if self.on_compile is not None:
            self.on_compile(outcome, seconds)

    # -- compiling ---------------------------------------------------------------------------
    async def compile(self, spec: StructuredSpec) -> CompiledStructure:
        """The compiled grammar for `spec`; GrammarError (a 400 naming spec.param) when the spec
        is refused; CompileBacklogFull / CompilerUnavailable when it cannot be compiled now."""
        hit = self.cache.lookup(spec)
        if hit is not None:
            return hit
        loop = asyncio.get_running_loop()
        flight = self._flights.get(spec.key)
        if flight is None or flight.future.get_loop() is not loop:
            flight = self._start(spec, loop)
        flight.waiters += 1
        try:
            item = await asyncio.shield(flight.future)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and flight.job is not None and not flight.future.done() \
                    and self.pool.cancel(flight.job):
                self._forget(spec.key, flight)
                flight.future.cancel()
        if isinstance(item, GrammarError):
            raise GrammarError(spec.param, renamed(item, spec.param))
        return item.for_spec(spec)

    def _start(self, spec: StructuredSpec, loop: asyncio.AbstractEventLoop) -> _Flight:
        job = self.pool.submit(spec)
        flight = _Flight(job, loop.create_future())
        flight.future.add_done_callback(_retrieve)  # its waiters may all have left
        self._flights[spec.key] = flight

        def done(f: Future) -> None:  # on a dispatcher thread (or wherever the job was cancelled)
            try:
                loop.call_soon_threadsafe(self._finish, spec, flight, f)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        job.future.add_done_callback(done)
        return flight

    def _finish(self, spec: StructuredSpec, flight: _Flight, f: Future) -> None:
        self._forget(spec.key, flight)
        # job -> its future -> `done` -> flight -> job is a cycle: unbroken, a compiled grammar
        # lived until the next full garbage collection (RSS grew with every big grammar:
        # docs/benchmarks.md, section "Numbers behind code choices")
        flight.job = None
        if flight.future.done():
            return
        if f.cancelled():
            flight.future.cancel()
            return
        exc = f.exception()
        if exc is not None and not isinstance(exc, GrammarError):
            flight.future.set_exception(exc)  # not the spec's fault: not kept
            return
        item = exc if exc is not None else f.result()
        self.cache.put(spec, item)
        flight.future.set_result(item)

    def _forget(self, key: tuple, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()



def _retrieve(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()
