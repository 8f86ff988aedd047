"""Machine facts for benchmark reports, and a CPU sampler that tells how much of the machine a
server used during a run and how much went to everything else (on a shared 2-core box the
rest of the machine is part of the result).
Linux only (/proc); elsewhere the numbers are empty."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# the instruction-set flags that decide which CPU kernels run (models/kernels/csrc: AVX2 + FMA;
# bf16 compute: avx512_bf16 / amx_bf16, see models.kernels.plan.cpu_has_native_bf16)
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                "amx_tile", "amx_bf16", "amx_int8")


def machine() -> dict[str, Any]:
    """Cores (logical and physical), CPU model, the kernel-relevant CPU flags present, RAM, OS."""
    info: dict[str, Any] = {"cores": os.cpu_count(), "physical_cores": None, "arch": platform.machine(),
                            "os": platform.platform(), "python": platform.python_version(), "cpu_model": None,
                            "cpu_flags": None, "mem_gib": None}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        physical = set()
        phys_id = "0"
        for line in cpuinfo:
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and info["cpu_model"] is None:
                info["cpu_model"] = value
            elif key == "flags" and info["cpu_flags"] is None:
                present = set(value.split())
                info["cpu_flags"] = [f for f in KERNEL_FLAGS if f in present]
            elif key == "physical id":
                phys_id = value
            elif key == "core id":
                physical.add((phys_id, value))
        info["physical_cores"] = len(physical) or None
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    return info


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def _busy_jiffies() -> int | None:
    try:
        parts = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    vals = [int(x) for x in parts]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return sum(vals[:8]) - idle


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, utime + stime jiffies) for every process we can read."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        rest = stat.rsplit(")", 1)[1].split()
        out[int(d)] = (int(rest[1]), int(rest[11]) + int(rest[12]))
    return out


def _tree(table: dict[int, tuple[int, int]], root: int) -> set[int]:
    pids, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in table.items():
            if ppid == parent and pid not in pids:
                pids.add(pid)
                frontier.append(pid)
    return pids


class CpuSampler:
    """Average cores used by some process trees, by this process, and by everything else.

    with CpuSampler({"server": pid}) as s: ...;  s.result() -> {"cores": {"server": ...},
    "client_cores", "other_cores", "machine_cores_busy", "seconds"}"""

    def __init__(self, roots: dict[str, int], interval: float = 0.5) -> None:
        self.roots = roots
        self.interval = interval
        self._cpu: dict[str, dict[int, tuple[int, int]]] = {name: {} for name in roots}  # pid -> (first, last)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._t0 = self._t1 = 0.0
        self._busy0: int | None = None
        self._busy1: int | None = None
        self._self0 = self._self1 = 0.0

    def _sample(self) -> None:
        if not os.path.isdir("/proc"):
            return
        table = _proc_table()
        for name, root in self.roots.items():
            seen = self._cpu[name]
            for pid in _tree(table, root):
                jiffies = table[pid][1]
                seen[pid] = (seen.get(pid, (jiffies, jiffies))[0], jiffies)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._t0, self._busy0, self._self0 = time.monotonic(), _busy_jiffies(), time.process_time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._t1, self._busy1, self._self1 = time.monotonic(), _busy_jiffies(), time.process_time()

    def result(self) -> dict[str, Any]:
        dt = max(self._t1 - self._t0, 1e-9)
        cores = {name: sum(last - first for first, last in seen.values()) / _HZ / dt
                 for name, seen in self._cpu.items()}
        client = (self._self1 - self._self0) / dt
        out: dict[str, Any] = {"seconds": dt, "cores": cores, "client_cores": client, "other_cores": None,
                               "machine_cores_busy": None}
        if self._busy0 is not None and self._busy1 is not None:
            busy = (self._busy1 - self._busy0) / _HZ / dt
            out["machine_cores_busy"] = busy
            out["other_cores"] = max(0.0, busy - sum(cores.values()) - client)
        return out
