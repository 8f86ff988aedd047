"""Build and load the CPU kernels in `csrc/` (plain C, called through ctypes; with -fopenmp where
PyTorch runs libgomp, so that the kernels share its thread pool).

The shared library is compiled on first use with the system C compiler, tuned for this
machine (`-march=native`), and cached under `$MOE_SERVE_KERNEL_CACHE` (default
`~/.cache/moe-serve/kernels`) by a hash of the source, the flags and the CPU. Where no
compiler is found or the build fails, `load()` returns None and callers use the PyTorch
reference path (logged once).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = ("paged_attention_cpu.c", "moe_cpu.c", "linear_cpu.c")
HEADERS = ("panel_gemm.h",)
FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11", "-fno-math-errno", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast", "-pthread"]
CSRC = Path(__file__).resolve().parent / "csrc"


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    return Path(os.environ.get("MOE_SERVE_KERNEL_CACHE", Path.home() / ".cache" / "moe-serve" / "kernels"))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = lib.paged_decode_f32
    fn.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.moe_fused_f32
    fn.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    lib.cpu_kernels_openmp.restype = ctypes.c_int
    lib.cpu_kernels_openmp.argtypes = []
    lib.moe_cpu_available.restype = ctypes.c_int
    lib.moe_cpu_available.argtypes = []
    fn = lib.linear_f32
    fn.argtypes = [p, p, p, p, i64, i64, i64, i64, ctypes.c_int]
    fn.restype = ctypes.c_int
    fn = lib.linear_pack_f32
    fn.argtypes = [p, p, i64, i64]
    fn.restype = None
    fn = lib.moe_pack_f32
    fn.argtypes = [p, p, p, p, i64, i64, i64]
    fn.restype = None
    return lib


def torch_runs_gomp() -> bool:
    """Whether PyTorch's OpenMP runtime is a mapped `libgomp.so.1`: then a library built with
    -fopenmp binds to that same runtime (one thread pool, already warm) instead of bringing a
    second one whose threads would spin beside PyTorch's (Linux; False where it cannot tell)."""
    import torch  # noqa: F401 - its OpenMP runtime must be mapped before we look

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    names = {Path(line.split()[-1]).name for line in maps.splitlines() if "omp" in line and "/" in line}
    return "libgomp.so.1" in names and not any("iomp" in n or n.startswith("libgomp-") for n in names)


def _build(cc: str, flags: list[str]) -> Path | None:
    src = b"".join((CSRC / s).read_bytes() for s in SOURCES + HEADERS)
    key = hashlib.sha256(src + " ".join([cc, *flags, _cpu_id()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"moe_serve_cpu_{key}.so"
    if out.exists():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_so = Path(tmp) / out.name
            cmd = [cc, *flags, *(str(CSRC / s) for s in SOURCES), "-o", str(tmp_so), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("building the CPU kernels failed (%s): %s", " ".join(cmd), proc.stderr.strip()[-2000:])
                return None
            os.replace(tmp_so, out)  # atomic: concurrent builders race harmlessly
    except OSError as e:
        log.warning("cannot build the CPU kernels (%s)", e)
        return None
    return out


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built here (MOE_SERVE_CPU_KERNELS=0
    disables). Threads: PyTorch's OpenMP pool (-fopenmp) where `torch_runs_gomp`, pthreads
    otherwise, when the OpenMP build fails, or with MOE_SERVE_CPU_KERNELS_OPENMP=0."""
    if os.environ.get("MOE_SERVE_CPU_KERNELS", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log.warning("no C compiler found: the CPU kernels fall back to the PyTorch paths")
        return None
    openmp = os.environ.get("MOE_SERVE_CPU_KERNELS_OPENMP", "1") != "0" and torch_runs_gomp()
    out = _build(cc, FLAGS + ["-fopenmp"]) if openmp else None
    out = out or _build(cc, FLAGS)
    if out is None:
        log.warning("using the PyTorch paths instead of the CPU kernels")
        return None
    try:
        return _declare(ctypes.CDLL(str(out)))
    except OSError as e:
        log.warning("cannot load %s (%s); using the PyTorch path", out, e)
        return None
