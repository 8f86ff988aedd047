"""The one timer of the benchmarks: variants interleaved round by round, wall and process-CPU
time per sample, median and best.

On a shared machine the background load drifts; timing one variant after the other lets the
drift land on one of them. `interleave` runs every variant once per round, in A-B order on even
rounds and B-A on odd ones (`order`), so that each variant meets the same load and none always
runs first after another one's cache-warming. Every sample records wall time (`perf_counter`)
and the process's CPU time (`process_time`: all its threads, steadier than wall time when other
processes compete for the cores); on CUDA, the device is synchronized around the sample and
the GPU time between two CUDA events is recorded too.

    timings = interleave({"A": fa, "B": fb}, rounds=8, warmup=1)
    timings["A"].summary()  # {"n", "wall_median_s", "wall_best_s", "cpu_median_s", ...}

`Clock` times one block the same way, for benchmarks whose samples are not whole calls (one
engine step inside a generation, one mask fill inside a sequence).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


def order(names: Sequence[str], round_index: int) -> list[str]:
    """The variants' order in round `round_index`: as given on even rounds, reversed on odd ones."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def _cuda(device: Any) -> bool:
    return device is not None and str(device).startswith("cuda")


class Clock:
    """Times one block: `with Clock(device) as c: ...`, then `c.wall`, `c.cpu` (seconds) and, on
    CUDA, `c.gpu` (seconds between two events around the block; the device is synchronized
    before and after, so `c.wall` covers the GPU work too). `cpu=False` skips the CPU clock
    (a system call) for blocks of a few microseconds."""

    def __init__(self, device: Any = None, cpu: bool = True) -> None:
        self.cuda, self.use_cpu = _cuda(device), cpu
        self.wall = self.cpu = 0.0
        self.gpu: float | None = None

    def __enter__(self) -> Clock:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._c0 = time.process_time() if self.use_cpu else 0.0
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            import torch

            self._events[1].record()
            torch.cuda.synchronize()
        self.wall = time.perf_counter() - self._t0
        self.cpu = time.process_time() - self._c0 if self.use_cpu else 0.0
        if self.cuda:
            self.gpu = self._events[0].elapsed_time(self._events[1]) / 1e3


@dataclass
class Samples:
    """One variant's samples, in seconds per call."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    gpu: list[float] = field(default_factory=list)
    returns: list[Any] = field(default_factory=list)  # what each timed call returned (when not None)

    def add(self, clock: Clock, number: int = 1, value: Any = None) -> None:
        self.wall.append(clock.wall / number)
        self.cpu.append(clock.cpu / number)
        if clock.gpu is not None:
            self.gpu.append(clock.gpu / number)
        if value is not None:
            self.returns.append(value)

    def summary(self) -> dict[str, float | int | None]:
        out: dict[str, float | int | None] = {"n": len(self.wall)}
        for name, xs in (("wall", self.wall), ("cpu", self.cpu), ("gpu", self.gpu)):
            out[f"{name}_median_s"] = statistics.median(xs) if xs else None
            out[f"{name}_best_s"] = min(xs) if xs else None
        out["wall_mean_s"] = statistics.fmean(self.wall) if self.wall else None
        return out

    def to_json(self) -> dict[str, list[float]]:
        return {"wall_s": self.wall, "cpu_s": self.cpu, **({"gpu_s": self.gpu} if self.gpu else {})}


def interleave(variants: dict[str, Callable[[], Any]], *, rounds: int = 5, warmup: int = 1, min_time: float = 0.0,
               number: int = 1, setup: Callable[[str], None] | None = None, device: Any = None,
               max_rounds: int | None = None) -> dict[str, Samples]:
    """Time each variant `rounds` times, interleaved (see `order`), after `warmup` untimed calls
    each. `min_time`: go on past `rounds` until the variants have run this many seconds each
    (up to `max_rounds`). `number`: calls per sample (a sample is their time / number).
    `setup(name)`, untimed, runs before each of the variant's calls (e.g. switch kernels).
    `device`: time with CUDA events and synchronization when it is a CUDA device."""
    if not variants:
        raise ValueError("no variants to time")
    if rounds < 1 or number < 1 or warmup < 0:
        raise ValueError("rounds and number must be >= 1 and warmup >= 0")
    names = list(variants)
    samples = {name: Samples() for name in names}

    def call(name: str) -> tuple[Clock, Any]:
        if setup is not None:
            setup(name)
        fn = variants[name]
        with Clock(device) as clock:
            for _ in range(number):
                value = fn()
        return clock, value

    for _ in range(warmup):
        for name in names:
            call(name)
    r = 0
    while True:
        for name in order(names, r):
            clock, value = call(name)
            samples[name].add(clock, number, value)
        r += 1
        if r >= rounds and (min(sum(s.wall) * number for s in samples.values()) >= min_time
                            or (max_rounds is not None and r >= max_rounds)):
            break
    return samples
