"""Grammar compiles in processes of their own, each within a time and a memory budget.

Why processes: xgrammar compiles in C++ and cannot be interrupted. A compile run on a thread
and abandoned at its deadline would go on using a core (and memory) until it finished, minutes
for some schemas; a process is killed at the deadline and its core and memory come back at
once. The processes fork from one forkserver that imported xgrammar once, so a killed one is
replaced in milliseconds.

A spec is compiled twice: on trial in a process, where it may be killed, and, once the trial
has shown that it compiles within the time, memory and size budgets, again on the dispatcher
thread, for this process (the same work, so it takes about as long as the trial did). Sending
the compiled grammar back instead costs more: serializing a big compiled grammar and reading it
back takes longer than compiling it (docs/benchmarks.md, section "Grammar compile cost: what
predicts it", measured by `python -m loadtest schema-compile`).

- `workers` processes (default: half the cores, 1 to 4), each compiling with one xgrammar
  thread, so that compiles leave the engine its cores;
- one dispatcher thread per process: it sends a spec and waits for the answer while the
  process has used at most `timeout` seconds of CPU (SIGKILL past it: `CompileTimeout`; CPU
  time, not wall time, so that a busy machine does not get a spec refused for good; past 3x
  the budget of wall time the compile is given up without keeping the failure), watches the
  process's memory (SIGKILL past its budget: `GrammarTooLarge`), then compiles the accepted
  spec itself (never on the event loop);
- the processes and the dispatcher threads run at nice 10, so that a compile slows running
  streams less; nice 19 was no better, and SCHED_IDLE, though it slowed them least, would starve
  compiles on a server that decodes all the time (docs/benchmarks.md, section "Numbers behind
  code choices"; `python -m loadtest grammar-attacks --only stream` measures a stream during a
  compile);
- a FIFO of specs waiting for a process, at most `max_queue` long (`CompileBacklogFull` past
  it: the API answers 429); a waiting spec whose requests all left is dropped (`cancel`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from server.engine.structured.backend import COMPILE_THREADS, CompiledStructure, GrammarCompiler, GrammarError
from server.engine.structured.spec import StructuredSpec

log = logging.getLogger(__name__)

STARTUP_TIMEOUT = 120.0  # seconds for a compile process to come up (the forkserver's first start imports xgrammar)
POLL = 0.1  # seconds between memory checks while a compile runs
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CompileTimeout(GrammarError):
    """A compile ran past the time budget (its process was killed)."""


class GrammarTooLarge(GrammarError):
    """A compiled grammar, or its compile, needed more memory than allowed."""


class CompileBacklogFull(Exception):
    """Too many distinct specs wait for a compile process (the API answers 429)."""


class CompilerUnavailable(Exception):
    """No compile process could be started, or the pool is closed (the API answers 503)."""


class CompileJob:
    __slots__ = ("future", "spec")

    def __init__(self, spec: StructuredSpec) -> None:
        self.spec = spec
        self.future: Future = Future()


class _Slot:
    """One compile process and its pipe."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Any = None
        self.conn: Any = None
        self.base_rss = 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.is_alive()

    def rss(self) -> int:
        try:
            with open(f"/proc/{self.proc.pid}/statm") as f:
                return int(f.read().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError, AttributeError):
            return 0

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the process (None where /proc cannot tell)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / _TICKS
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.join(5)
        if self.conn is not None:
            self.conn.close()
        self.proc = self.conn = None


class CompilePool:
    def __init__(self, compiler: GrammarCompiler, *, workers: int, timeout: float, max_grammar_bytes: int,
                 max_queue: int, on_done: Callable[[str, float], None] | None = None) -> None:
        if workers < 1 or timeout <= 0 or max_grammar_bytes < 1 or max_queue < 1:
            raise ValueError("workers, timeout, max_grammar_bytes and max_queue must be positive")
        self.compiler = compiler  # the API side's: its tokenizer table deserializes the results
        self.timeout = timeout  # CPU seconds of the compile process (wall seconds where /proc cannot tell)
        self.wall_limit = 3 * timeout + 5  # past it, however little CPU it got, a compile is given up (not kept)
        self.max_grammar_bytes = max_grammar_bytes
        self.max_queue = max_queue
        # a process may grow this much over its size when it came up, compiling one grammar
        # (the grammar, its serialized copy, xgrammar's working memory), and is replaced after a
        # compile that left it past half of that
        self.memory_budget = 4 * max_grammar_bytes + 256 * 2**20
        self.on_done = on_done
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(_preload())
        self._queue: deque[CompileJob] = deque()
        self._cv = threading.Condition()
        self._info_json: str | None = None
        self._info_lock = threading.Lock()
        self._closed = False
        self.running = 0
        self._slots = [_Slot(i) for i in range(workers)]
        self._threads = [threading.Thread(target=self._serve, args=(s,), name=f"grammar-compile-{s.index}",
                                          daemon=True) for s in self._slots]
        for t in self._threads:
            t.start()

    # -- the API side ------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return len(self._queue)

    def submit(self, spec: StructuredSpec) -> CompileJob:
        job = CompileJob(spec)
        with self._cv:
            if self._closed:
                raise CompilerUnavailable("the grammar compiler is shut down")
            if len(self._queue) >= self.max_queue:
                raise CompileBacklogFull(f"{len(self._queue)} grammars are waiting to be compiled")
            self._queue.append(job)
            self._cv.notify()
        return job

    def cancel(self, job: CompileJob) -> bool:
        """Drop a job that has not started (True), else leave it running (False)."""
        with self._cv:
            try:
                self._queue.remove(job)
            except ValueError:
                return False
        job.future.cancel()
        return True

    def close(self) -> None:
        with self._cv:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._cv.notify_all()
        for job in queued:
            job.future.cancel()
        for slot in self._slots:
            slot.kill()  # a compile in progress ends with its process
        for t in self._threads:
            t.join(timeout=2)

    def worker_pids(self) -> list[int]:
        return [s.proc.pid for s in self._slots if s.alive()]

    # -- the dispatcher threads --------------------------------------------------------------
    def _serve(self, slot: _Slot) -> None:
        _lower_priority(threading.get_native_id())  # the compiles this thread runs yield to the engine
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._queue.popleft()
                self.running += 1
            try:
                if job.future.set_running_or_notify_cancel():
                    self._run(slot, job)
            finally:
                job = None  # noqa: F841 - not kept (with its compiled grammar) while this thread waits
                with self._cv:
                    self.running -= 1

    def _run(self, slot: _Slot, job: CompileJob) -> None:
        try:
            self._ensure_started(slot)  # not timed: a process's start is not the spec's compile
        except CompilerUnavailable as e:
            log.error("grammar compile of %s: %s", job.spec.describe(), e)
            job.future.set_exception(e)
            return
        start = time.monotonic()
        outcome = "failed"
        try:
            job.future.set_result(self._compile(slot, job.spec))
            outcome = "compiled"
        except CompileTimeout as e:
            outcome = "timeout"
            job.future.set_exception(e)
        except GrammarTooLarge as e:
            outcome = "too_large"
            job.future.set_exception(e)
        except GrammarError as e:
            outcome = "invalid"
            job.future.set_exception(e)
        except CompilerUnavailable as e:
            log.error("grammar compile of %s: %s", job.spec.describe(), e)
            job.future.set_exception(e)
        except BaseException as e:  # noqa: BLE001 - a bug: the request gets a 500, the log the details
            log.exception("grammar compile of %s failed", job.spec.describe())
            job.future.set_exception(e)
        if self.on_done is not None:
            try:
                self.on_done(outcome, time.monotonic() - start)
            except Exception:  # noqa: BLE001 - metrics never fail a compile
                log.exception("grammar compile listener failed")

    def _compile(self, slot: _Slot, spec: StructuredSpec) -> CompiledStructure:
        param = spec.param
        try:
            slot.conn.send(spec)
        except (OSError, ValueError):
            slot.kill()
            raise CompilerUnavailable("the grammar compile process went away") from None
        start = time.monotonic()
        cpu0 = slot.cpu_seconds()
        while True:
            try:
                if slot.conn.poll(POLL):
                    message = slot.conn.recv()
                    break
            except (EOFError, OSError):
                message = None
                break
            if not slot.alive():
                message = None
                break
            cpu = slot.cpu_seconds()
            wall = time.monotonic() - start
            used = cpu - cpu0 if cpu is not None and cpu0 is not None else wall
            if used > self.timeout:
                slot.kill()
                log.warning("grammar compile of %s stopped after %.1f s of compile time (wall %.1f s)",
                            spec.describe(), used, wall)
                raise CompileTimeout(param, f"{param}: compiling it took longer than the {self.timeout:g} s budget "
                                            f"(--grammar-compile-timeout), so it was stopped; this spec is refused "
                                            f"from now on (simplify it)")
            if wall > self.wall_limit:  # the machine is too busy to tell: not the spec's fault
                slot.kill()
                raise CompilerUnavailable(f"a compile got {used:.1f} s of CPU in {wall:.0f} s (the machine is busy)")
            if slot.rss() - slot.base_rss > self.memory_budget:
                slot.kill()
                raise GrammarTooLarge(param, f"{param}: compiling it needed more than "
                                             f"{self.memory_budget // 2**20} MiB, so it was stopped; this spec is "
                                             f"refused from now on")
        if message is None:  # the process died (a crash in the backend on this spec)
            code = slot.proc.exitcode if slot.proc is not None else None
            slot.kill()
            log.error("grammar compile process died (exit code %s) compiling %s", code, spec.describe())
            raise GrammarError(param, f"{param}: the grammar backend failed on it")
        if slot.rss() - slot.base_rss > self.memory_budget // 2:
            slot.kill()  # give the memory back: the next compile starts a fresh process
        return self._result(spec, message)

    def _result(self, spec: StructuredSpec, message: tuple) -> CompiledStructure:
        kind = message[0]
        if kind == "error":
            raise GrammarError(spec.param, message[1])
        if kind == "too_large":
            raise GrammarTooLarge(spec.param, f"{spec.param}: its compiled grammar takes {message[1] / 2**20:.1f} MiB; "
                                              f"the limit is {self.max_grammar_bytes / 2**20:g} MiB (a quarter of "
                                              f"--grammar-cache-memory)")
        return self.compiler.compile(spec)  # proven to finish within the budgets by the trial

    def _ensure_started(self, slot: _Slot) -> None:
        if slot.alive():
            return
        slot.kill()
        with self._info_lock:  # not the queue's lock: building the table may take a second
            if self._info_json is None:
                self._info_json = self.compiler.tokenizer_info().serialize_json()
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker().serve, name=f"moe-serve-grammar-{slot.index}", daemon=True,
                                 args=(child, self._info_json, self.compiler.vocab_size, COMPILE_THREADS,
                                       self.max_grammar_bytes))
        try:
            proc.start()
        except Exception as e:  # noqa: BLE001
            raise CompilerUnavailable(f"cannot start a grammar compile process: {e}") from None
        finally:
            child.close()
        slot.proc, slot.conn = proc, parent
        start = time.monotonic()
        while time.monotonic() < start + STARTUP_TIMEOUT and slot.alive():
            try:
                if parent.poll(POLL):
                    if parent.recv()[0] == "ready":
                        slot.base_rss = slot.rss()
                        log.info("grammar compile process %d up in %.2f s", proc.pid, time.monotonic() - start)
                        return
                    break
            except (EOFError, OSError):
                break
        slot.kill()
        raise CompilerUnavailable("a grammar compile process did not start")


def _preload() -> list[str]:
    """What the forkserver imports once, for every compile process it forks: the worker (and
    xgrammar), and the main module, which multiprocessing re-runs in each child (for
    `python -m server.cli`: server.cli; its imports are then already done in the fork)."""
    modules = [_worker().__name__]
    name = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    if name and name != "__main__" and not name.endswith(".__main__"):
        modules.append(name)
    return modules


def _lower_priority(tid: int) -> None:
    """Nice 10 for a thread or process (Linux schedules threads alone): under contention the
    engine's threads get ~90% of a core against it; alone, it runs at full speed."""
    try:
        os.setpriority(os.PRIO_PROCESS, tid, 10)
    except (AttributeError, OSError):
        pass


def _worker() -> Any:
    """compile_worker, imported when the first compile process starts: it imports xgrammar, which
    a server that never compiles a grammar does not load."""
    from server.engine.structured import compile_worker

    return compile_worker
