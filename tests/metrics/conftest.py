from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def prometheus_tools() -> dict[str, str]:
    """Paths of `promtool` and `prometheus`, installed by scripts/install_prometheus.sh if
    missing; skips only when the installer says apt-get (or root/sudo) is unavailable."""
    if not (shutil.which("promtool") and shutil.which("prometheus")):
        r = subprocess.run(["bash", str(ROOT / "scripts" / "install_prometheus.sh")],
                           check=False, capture_output=True, text=True, timeout=900)
        if r.returncode == 2:
            skip_or_fail(f"cannot install prometheus: {r.stderr.strip()}")
        assert r.returncode == 0, f"install_prometheus.sh failed:\n{r.stdout}\n{r.stderr}"
    tools = {name: shutil.which(name) for name in ("promtool", "prometheus")}
    assert all(tools.values()), tools
    return tools  # type: ignore[return-value]
