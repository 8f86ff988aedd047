"""Real `moe-serve` processes on loopback for the load, soak and fault tests."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator

import pytest

from loadtest.loadgen.procs import ManagedServer
from tests.conftest import REPO

StartServer = Callable[..., ManagedServer]


@pytest.fixture
def start_server(tmp_path) -> Iterator[StartServer]:
    """start_server(model, *flags, env={...}, ready_timeout=120) -> a ready ManagedServer on a free port.

    Runs `python -m tests.loadtest.fault_server` (the moe-serve CLI with the fault-injection hook);
    every server still running at the end of the test is killed."""
    servers: list[ManagedServer] = []

    def start(model: str, *flags: str, env: dict[str, str] | None = None, ready_timeout: float = 120.0,
              name: str = "server") -> ManagedServer:
        argv = [sys.executable, "-m", "tests.loadtest.fault_server", "--model", model, "--host", "127.0.0.1",
                "--port", "0", *flags]
        server = ManagedServer(argv, log_path=tmp_path / f"{name}-{len(servers)}.log", cwd=REPO, env=env,
                               ready_path="/ready")
        servers.append(server)
        return server.start().wait_ready(ready_timeout)

    yield start
    for s in servers:
        s.stop(signal.SIGKILL, timeout=10)  # no-op for one that already exited
