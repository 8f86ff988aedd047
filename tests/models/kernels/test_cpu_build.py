"""Ahead-of-time builds of the CPU kernels (the image's build stage): one library per
instruction-set level, the best one this CPU runs chosen at load, never a compiler at run time;
and the cache directory (--cache-dir / MOE_SERVE_CACHE_DIR) the run-time builds go to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models.kernels import cpu_build

REPO = Path(__file__).resolve().parents[3]
V3 = cpu_build.LEVELS["x86-64-v3"]
V4 = cpu_build.LEVELS["x86-64-v4"]


def test_best_level_is_the_highest_the_cpu_runs():
    both = ("x86-64-v3", "x86-64-v4")
    assert cpu_build.best_level(V4 | {"sse4_2"}, both) == "x86-64-v4"
    assert cpu_build.best_level(V3, both) == "x86-64-v3"
    assert cpu_build.best_level(V4, ("x86-64-v3",)) == "x86-64-v3"  # only what was built
    assert cpu_build.best_level(V3 - {"fma"}, both) is None  # AVX2 without FMA: no level
    assert cpu_build.best_level(frozenset(), both) is None


def test_unknown_level_is_refused():
    with pytest.raises(cpu_build.BuildError, match="unknown instruction-set level 'x86-64-v9'"):
        cpu_build.build(False, march="x86-64-v9")


def test_cache_dir_follows_moe_serve_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MOE_SERVE_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("MOE_SERVE_CACHE_DIR", str(tmp_path))
    assert cpu_build.cache_dir() == tmp_path / "kernels"
    monkeypatch.setenv("MOE_SERVE_KERNEL_CACHE", str(tmp_path / "k"))
    assert cpu_build.cache_dir() == tmp_path / "k"
    monkeypatch.delenv("MOE_SERVE_KERNEL_CACHE")
    monkeypatch.delenv("MOE_SERVE_CACHE_DIR")
    assert cpu_build.cache_dir() == Path.home() / ".cache" / "moe-serve" / "kernels"


@pytest.fixture(scope="module")
def prebuilt_dir(tmp_path_factory) -> Path:
    if not V3 <= cpu_build.cpu_flags():
        pytest.skip("this CPU is not x86-64-v3 (AVX2 + FMA): the C kernels do not run here")
    if cpu_build.compilers() is None:
        pytest.skip("no C/C++ compiler")
    out = tmp_path_factory.mktemp("prebuilt")
    cpu_build.prebuild(out, ["x86-64-v3"], threadings=("pthreads",))
    return out


@pytest.mark.slow  # the slow group: CI runs it (`pytest -m slow`), the default suite does not
def test_prebuilt_library_is_chosen_by_level_and_torch_version(prebuilt_dir, tmp_path):
    import torch

    manifest = json.loads((prebuilt_dir / cpu_build.MANIFEST).read_text())
    assert manifest["torch"] == torch.__version__
    name = manifest["libraries"]["moe_serve"]["pthreads"]["x86-64-v3"]
    assert (prebuilt_dir / name).is_file()
    assert cpu_build.prebuilt(False, directory=prebuilt_dir, flags=V4) == (prebuilt_dir / name, "x86-64-v3")
    assert cpu_build.prebuilt(False, directory=prebuilt_dir, flags=V3 - {"avx2"}) is None  # no level runs
    assert cpu_build.prebuilt(True, directory=prebuilt_dir, flags=V3) is None  # that threading not built
    assert cpu_build.prebuilt(False, directory=tmp_path, flags=V3) is None  # no manifest
    other = tmp_path / "other-torch"
    other.mkdir()
    (other / cpu_build.MANIFEST).write_text(json.dumps({**manifest, "torch": "0.0.1"}))
    (other / name).write_bytes((prebuilt_dir / name).read_bytes())
    assert cpu_build.prebuilt(False, directory=other, flags=V3) is None  # built for another torch


@pytest.mark.slow  # the slow group: CI runs it (`pytest -m slow`), the default suite does not
def test_prebuilt_kernels_serve_without_a_compiler(prebuilt_dir, tmp_path):
    """A process with the prebuilt directory and no compiler (as the CPU image runs) loads the
    prebuilt library and runs an op; the kernel plan says where it came from."""
    code = """
import torch
from models.kernels import cpu_ops
from models.kernels.plan import Capabilities
assert cpu_ops.load("pthreads") == "pthreads"
caps = Capabilities.detect(torch.device("cpu"), torch.float32, "pthreads")
w = torch.randn(32, 64)
x = torch.randn(3, 64)
y = cpu_ops.ops().linear_cpu(x, cpu_ops.ops().linear_pack_cpu(w), None)
torch.testing.assert_close(y, x @ w.T, rtol=1e-4, atol=1e-4)
print(caps.cpu_kernels_origin)
"""
    env = {**os.environ, "MOE_SERVE_PREBUILT_KERNELS": str(prebuilt_dir), "CC": "/bin/false", "CXX": "/bin/false",
           "MOE_SERVE_CACHE_DIR": str(tmp_path / "cache"), "PATH": os.path.dirname(sys.executable)}
    env.pop("MOE_SERVE_KERNEL_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "prebuilt x86-64-v3"
    assert not (tmp_path / "cache" / "kernels").exists(), "nothing compiled at run time"


RELEASE_SCRIPT = r"""
import os, threading, time
import torch
from models.kernels.cpu_build import release_openmp_threads, torch_runs_gomp

torch.set_num_threads(2)
tasks = lambda: len(os.listdir("/proc/self/task"))
x = torch.randn(1 << 22)
start = tasks()
(x * 2).sum()  # a parallel region on this thread: its pool gets one worker
pooled = tasks()
released = release_openmp_threads()
for _ in range(100):  # the workers leave on their own
    if tasks() < pooled:
        break
    time.sleep(0.01)
after = tasks()
out = []
th = threading.Thread(target=lambda: out.append(float((x * 3).sum())))  # parallel work elsewhere still runs
th.start(); th.join()
print(torch_runs_gomp(), start, pooled, released, after, out[0] == float((x * 3).sum()))
"""


def test_release_openmp_threads_frees_the_callers_pool():
    """The server loads on one thread and steps on another: the loading thread's OpenMP workers go
    (async_engine.py), so libgomp does not throttle the engine thread's (cpu_build.py)."""
    out = subprocess.run([sys.executable, "-c", RELEASE_SCRIPT], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[3], env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    gomp, start, pooled, released, after, same = out.stdout.split()
    assert gomp == "True"  # PyTorch's Linux wheels run GNU libgomp
    assert int(pooled) == int(start) + 1 and released == "True" and int(after) == int(start) and same == "True"
