"""When vLLM's engine core dies, /health answers 503 and the server exits non-zero. The test
kills a server of its own, so it runs in any order."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from collections.abc import Iterator

import httpx
import pytest

from tests.vllm.conftest import READY_TIMEOUT, SERVER_ARGS, SERVER_ENV, VLLMServer

pytestmark = pytest.mark.vllm


def _descendants(pid: int) -> dict[int, str]:
    """{pid: cmdline} of every descendant (Linux /proc)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    out: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in out:
                try:
                    out[child] = (Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                                  + " " + Path(f"/proc/{child}/comm").read_text())
                except OSError:
                    out[child] = ""
                frontier.append(child)
    return out


@pytest.fixture()
def doomed(vllm_python, vllm_model) -> Iterator[VLLMServer]:
    server = VLLMServer(vllm_python, vllm_model, SERVER_ARGS, SERVER_ENV)
    server.wait_ready(READY_TIMEOUT)
    yield server
    server.stop()


def test_engine_core_death_fails_health_and_exits(doomed: VLLMServer):
    vllm_server = doomed
    assert httpx.get(vllm_server.url + "/health", timeout=10).status_code == 200
    children = _descendants(vllm_server.proc.pid)
    cores = [pid for pid, cmd in children.items() if "EngineCore" in cmd]
    assert cores, f"no vLLM engine core among {children}"
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    statuses = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and vllm_server.proc.poll() is None:
        try:
            statuses.append(httpx.get(vllm_server.url + "/health", timeout=5).status_code)
        except httpx.HTTPError:
            statuses.append(None)
        time.sleep(0.05)
    assert vllm_server.proc.wait(30) == 1, vllm_server.logs()[-3000:]
    assert 503 in statuses, statuses
    assert 200 not in statuses[statuses.index(503):], statuses  # never healthy again once vLLM noticed
