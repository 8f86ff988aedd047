"""Build the CPU kernels (`csrc/`): the C sources and the operator registrations (`ops.cpp`,
torch.library) compiled into one shared library, loaded with `torch.ops.load_library`.

The library is compiled on first use with the system compilers (`cc` and `c++`, or `$CC` and
`$CXX`), tuned for this machine (`-march=native`), against the installed PyTorch's headers and
libraries, and cached under `$MOE_SERVE_KERNEL_CACHE` (default `~/.cache/moe-serve/kernels`) by a
hash of the sources, the flags, the PyTorch version and the CPU. The C kernels' threads are
PyTorch's own OpenMP pool (`-fopenmp`, where PyTorch runs libgomp: one runtime, warm threads) or
pthreads of their own. `python -m models.kernels.cpu_build` builds ahead of time (for an image).
"""

from __future__ import annotations

import hashlib
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

C_SOURCES = ("paged_attention_cpu.c", "moe_cpu.c", "linear_cpu.c")
CXX_SOURCES = ("ops.cpp",)
HEADERS = ("panel_gemm.h", "kernels.h")
# hidden: the C entry points stay inside the library (ops.cpp calls them; two builds loaded in one
# process, tests do, never bind to each other's)
C_FLAGS = ["-O3", "-march=native", "-fPIC", "-fvisibility=hidden", "-std=c11", "-fno-math-errno", "-fassociative-math",
           "-fno-signed-zeros", "-fno-trapping-math", "-ffp-contract=fast", "-pthread"]
CXX_FLAGS = ["-O2", "-fPIC", "-std=c++17", "-Wno-c++20-extensions"]
CSRC = Path(__file__).resolve().parent / "csrc"
NAMESPACE = "moe_serve"


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


def cache_dir() -> Path:
    return Path(os.environ.get("MOE_SERVE_KERNEL_CACHE", Path.home() / ".cache" / "moe-serve" / "kernels"))


def compilers() -> tuple[str, str] | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    return (cc, cxx) if cc and cxx else None


def torch_runs_gomp() -> bool:
    """Whether PyTorch's OpenMP runtime is a mapped `libgomp.so.1`: then a library built with
    -fopenmp binds to that same runtime (one thread pool, already warm) instead of bringing a
    second one whose threads would spin beside PyTorch's (Linux; False where it cannot tell)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    names = {Path(line.split()[-1]).name for line in maps.splitlines() if "omp" in line and "/" in line}
    return "libgomp.so.1" in names and not any("iomp" in n or n.startswith("libgomp-") for n in names)


def _torch_paths() -> tuple[list[str], str]:
    root = Path(torch.__file__).resolve().parent
    return [str(root / "include"), str(root / "include" / "torch" / "csrc" / "api" / "include")], str(root / "lib")


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(cmd[:3])} ... failed: {proc.stderr.strip()[-2000:]}")


def build(openmp: bool, namespace: str = NAMESPACE) -> Path:
    """The library's path (built now unless cached); raises BuildError (no compiler, a failed
    compile). `namespace`: the torch.library namespace of its ops (one library per namespace
    can be loaded in a process: tests load the other threading under another name)."""
    tools = compilers()
    if tools is None:
        raise BuildError("no C/C++ compiler found (cc and c++, or $CC and $CXX)")
    cc, cxx = tools
    includes, libdir = _torch_paths()
    c_flags = C_FLAGS + (["-fopenmp"] if openmp else [])
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cxx_flags = CXX_FLAGS + [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-DMOE_SERVE_OPS_NS={namespace}"] + [
        f"-I{d}" for d in includes]
    link = ["-shared", f"-L{libdir}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{libdir}", "-lm", "-pthread"] + (
        ["-fopenmp"] if openmp else [])
    src = b"".join((CSRC / s).read_bytes() for s in C_SOURCES + CXX_SOURCES + HEADERS)
    key = hashlib.sha256(src + " ".join([cc, cxx, *c_flags, *cxx_flags, *link, torch.__version__,
                                         _cpu_id()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"moe_serve_cpu_{namespace}_{key}.so"
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


def main() -> None:
    """Build both threadings ahead of time (an image build runs this)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for openmp in (True, False):
        print(build(openmp))


if __name__ == "__main__":
    main()
