"""Build the CPU kernels (`csrc/`): the C sources and the operator registrations (`ops.cpp`,
torch.library) compiled into one shared library, loaded with `torch.ops.load_library`.

Where a library built ahead of time for this PyTorch serves (`$MOE_SERVE_PREBUILT_KERNELS`: one
per instruction-set level and threading, `python -m models.kernels.cpu_build --prebuild DIR
LEVEL...`, as the image's build stage does), the best level this CPU supports is loaded. Otherwise
the library is compiled on first use with the system compilers (`cc` and `c++`, or `$CC` and
`$CXX`), tuned for this machine (`-march=native`), against the installed PyTorch's headers and
libraries, and cached under `$MOE_SERVE_KERNEL_CACHE` (default: `kernels/` in the cache directory,
`$MOE_SERVE_CACHE_DIR` or `~/.cache/moe-serve`) by a hash of the sources, the flags, the PyTorch
version and the CPU. The C kernels' threads are PyTorch's own OpenMP pool (`-fopenmp`, where
PyTorch runs libgomp: one runtime, warm threads) or pthreads of their own.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

C_SOURCES: tuple[str, ...] = ("paged_attention_cpu.c", "moe_cpu.c", "linear_cpu.c", "mla_decode_cpu.c",
                              "linear_quant_cpu.c", "moe_quant_cpu.c", "moe_bf16_cpu.c", "linear_bf16_cpu.c",
                              "norm_rope_cpu.c")
CXX_SOURCES = ("ops.cpp",)
HEADERS: tuple[str, ...] = ("panel_gemm.h", "kernels.h", "quant_gemm.h", "quant_gemm_body.h")
# hidden: the C entry points stay inside the library (ops.cpp calls them; two builds loaded in one
# process, tests do, never bind to each other's)
C_FLAGS = ["-O3", "-march=native", "-fPIC", "-fvisibility=hidden", "-std=c11", "-fno-math-errno", "-fassociative-math",
           "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast", "-pthread"]
CXX_FLAGS = ["-O2", "-fPIC", "-std=c++17", "-Wno-c++20-extensions"]
CSRC = Path(__file__).resolve().parent / "csrc"
NAMESPACE = "moe_serve"
# Instruction-set levels for ahead-of-time builds (gcc/clang -march), best first, with the
# /proc/cpuinfo flags each one needs (x86-64 psABI levels; the kernels need AVX2 + FMA, so v3 up).
LEVELS: dict[str, frozenset[str]] = {
    "x86-64-v4": frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave",
                            "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    "x86-64-v3": frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
}
MANIFEST = "manifest.json"
# fp8 weights (csrc/fp8_cpu.c and the body it includes once per instruction-set level)
C_SOURCES += ("fp8_cpu.c",)
HEADERS += ("fp8_body.h",)


class BuildError(RuntimeError):
    pass


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def base_cache_dir() -> Path:
    """Where moe-serve's caches go: `$MOE_SERVE_CACHE_DIR` (--cache-dir), else ~/.cache/moe-serve."""
    env = os.environ.get("MOE_SERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moe-serve"


def cache_dir() -> Path:
    env = os.environ.get("MOE_SERVE_KERNEL_CACHE")
    return Path(env) if env else base_cache_dir() / "kernels"


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    line = _cpu_id()
    return frozenset(line.split(":", 1)[1].split()) if line.startswith("flags") else frozenset()


def best_level(flags: frozenset[str], levels: list[str] | tuple[str, ...]) -> str | None:
    """The best of `levels` (names in LEVELS) that a CPU with `flags` runs, or None."""
    for name in LEVELS:
        if name in levels and LEVELS[name] <= flags:
            return name
    return None


def _threading(openmp: bool) -> str:
    return "openmp" if openmp else "pthreads"


def prebuilt(openmp: bool, namespace: str = NAMESPACE, directory: str | Path | None = None,
             flags: frozenset[str] | None = None) -> tuple[Path, str] | None:
    """(library, level) built ahead of time for this PyTorch and the best level this CPU runs, from
    `directory` (default `$MOE_SERVE_PREBUILT_KERNELS`), or None (none there, another PyTorch, no
    level this CPU runs: the caller compiles, where it can)."""
    directory = directory or os.environ.get("MOE_SERVE_PREBUILT_KERNELS")
    if not directory:
        return None
    try:
        manifest = json.loads((Path(directory) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("torch") != torch.__version__:
        log.warning("the prebuilt CPU kernels in %s are for torch %s, not %s: not used", directory,
                    manifest.get("torch"), torch.__version__)
        return None
    if all((CSRC / f).exists() for f in C_SOURCES + CXX_SOURCES + HEADERS) and manifest.get("sources") != _sources_hash():
        log.warning("the prebuilt CPU kernels in %s were built from other sources: not used", directory)
        return None
    libs = manifest.get("libraries", {}).get(namespace, {}).get(_threading(openmp), {})
    level = best_level(cpu_flags() if flags is None else flags, tuple(libs))
    if level is None:
        return None
    path = Path(directory) / libs[level]
    return (path, level) if path.exists() else None


def compilers() -> tuple[str, str] | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    return (cc, cxx) if cc and cxx else None


def _mapped_omp_libraries() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process (/proc/self/maps; none where unreadable)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines() if "omp" in line and "/" in line}


def torch_runs_gomp() -> bool:
    """Whether PyTorch's OpenMP runtime is a mapped `libgomp.so.1`: then a library built with
    -fopenmp binds to that same runtime (one thread pool, already warm) instead of bringing a
    second one whose threads would spin beside PyTorch's (Linux; False where it cannot tell)."""
    names = {Path(p).name for p in _mapped_omp_libraries()}
    return "libgomp.so.1" in names and not any("iomp" in n or n.startswith("libgomp-") for n in names)


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP worker threads (`omp_pause_resource_all`, GNU libgomp as
    mapped by PyTorch): for a thread that has run parallel work (loading a model) and hands the
    compute to another thread (the server's engine thread). libgomp keeps one pool of workers per
    thread that starts parallel regions, and once it manages more threads than the CPUs it may use,
    every worker spins only ~100 times before sleeping at each barrier (its "throttled" spin): a
    second pool beside the engine thread's makes each kernel call wake sleeping threads (the 2.4B
    model's int4 decode step, 2 threads on 2 cores: 15.4 ms on a second thread vs 12.1 ms on the
    loading thread; 13.4 ms after this). The pool comes back if this thread runs parallel work
    again. Returns whether a libgomp was found and released it (False elsewhere: a no-op)."""
    for path in sorted(p for p in _mapped_omp_libraries() if Path(p).name.startswith("libgomp")):
        try:
            lib = ctypes.CDLL(path)
            pause = lib.omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause(1) == 0  # omp_pause_soft
    return False


def _torch_paths() -> tuple[list[str], str]:
    root = Path(torch.__file__).resolve().parent
    return [str(root / "include"), str(root / "include" / "torch" / "csrc" / "api" / "include")], str(root / "lib")


def _sources() -> bytes:
    return b"".join((CSRC / s).read_bytes() for s in C_SOURCES + CXX_SOURCES + HEADERS)


def _sources_hash() -> str:
    return hashlib.sha256(_sources()).hexdigest()[:16]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd[:3])} ... failed: {proc.stderr.strip()[-2000:]}")


def build(openmp: bool, namespace: str = NAMESPACE, march: str = "native", out_dir: Path | None = None) -> Path:
    """The library's path (built now unless cached); raises BuildError (no compiler, a failed
    compile). `namespace`: the torch.library namespace of its ops (one library per namespace
    can be loaded in a process: tests load the other threading under another name). `march`:
    "native" (this CPU) or a level of LEVELS (portable: any CPU of that level); `out_dir`: where
    (default: the cache directory)."""
    if march != "native" and march not in LEVELS:
        raise BuildError(f"unknown instruction-set level {march!r} (one of {', '.join(LEVELS)})")
    tools = compilers()
    if tools is None:
        raise BuildError("no C/C++ compiler found (cc and c++, or $CC and $CXX)")
    cc, cxx = tools
    includes, libdir = _torch_paths()
    c_flags = [f if f != "-march=native" else f"-march={march}" for f in C_FLAGS] + (["-fopenmp"] if openmp else [])
    if march != "native":
        c_flags.append("-mtune=generic")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cxx_flags = CXX_FLAGS + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DMOE_SERVE_OPS_NS={namespace}"] + [
        f"-I{d}" for d in includes]
    link = ["-shared", f"-L{libdir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{libdir}", "-lm", "-pthread"] + (
        ["-fopenmp"] if openmp else [])
    src = _sources()
    key = hashlib.sha256(src + " ".join([cc, cxx, *c_flags, *cxx_flags, *link, torch.__version__,
                                         _cpu_id() if march == "native" else march]).encode()).hexdigest()[:16]
    out = (out_dir or cache_dir()) / f"moe_serve_cpu_{namespace}_{key}.so"
    if out.exists():
        return out
    t0 = time.monotonic()
    log.info("building the CPU kernels (%s, %s threads) into %s", namespace, "OpenMP" if openmp else "pthread", out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            objs = []
            for s in C_SOURCES:
                objs.append(str(Path(tmp) / (s + ".o")))
                _run([cc, *c_flags, "-c", str(CSRC / s), "-o", objs[-1]])
            for s in CXX_SOURCES:
                objs.append(str(Path(tmp) / (s + ".o")))
                _run([cxx, *cxx_flags, "-c", str(CSRC / s), "-o", objs[-1]])
            tmp_so = Path(tmp) / out.name
            _run([cxx, *objs, "-o", str(tmp_so), *link])
            os.replace(tmp_so, out)  # atomic: concurrent builders race harmlessly
    except OSError as e:
        raise BuildError(f"cannot build the CPU kernels: {e}") from e
    log.info("built the CPU kernels in %.1fs", time.monotonic() - t0)
    return out


def prebuild(directory: Path, levels: list[str], namespace: str = NAMESPACE,
             threadings: tuple[str, ...] = ("openmp", "pthreads")) -> dict:
    """Build each threading for each level into `directory`, with the manifest `prebuilt` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    libs: dict[str, dict[str, str]] = {}
    for level in levels:
        for openmp in (t == "openmp" for t in threadings):
            path = build(openmp, namespace, march=level, out_dir=directory)
            libs.setdefault(_threading(openmp), {})[level] = path.name
            print(f"[cpu_build] {level} {_threading(openmp)}: {path}", flush=True)
    manifest = {"torch": torch.__version__, "sources": _sources_hash(), "libraries": {namespace: libs}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Build both threadings: for this CPU into the cache, or with --prebuild DIR for the given
    instruction-set levels (an image's build stage)."""
    parser = argparse.ArgumentParser(prog="python -m models.kernels.cpu_build", description=main.__doc__)
    parser.add_argument("--prebuild", type=Path, metavar="DIR", help="build for LEVELS into DIR (with a manifest)")
    parser.add_argument("levels", nargs="*", metavar="LEVEL",
                        help=f"instruction-set levels for --prebuild ({', '.join(LEVELS)}; default all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.prebuild is not None:
        prebuild(args.prebuild, args.levels or list(LEVELS))
        return
    for openmp in (True, False):
        print(build(openmp))


if __name__ == "__main__":
    main()
