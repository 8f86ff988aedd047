"""Start, probe and stop a server process on loopback (for benchmarks and soak/fault tests).

`ManagedServer(argv, ...)` runs the command in a session of its own (so a server that forks
workers, like vLLM, is stopped as a whole), logs to a file, finds its port in the log when it
was started on port 0, and exposes /metrics values and the process's resident memory.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

_PORT_RE = re.compile(r"running on https?://[\w.\[\]:-]+?:(\d+)", re.IGNORECASE)
_METRIC_RE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)")


class ServerError(RuntimeError):
    pass


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (labels as written; no labels: just the name)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC_RE.match(line)
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


def metric(values: dict[str, float], name: str) -> float | None:
    """The sum of every series of `name` (any labels), or None when absent."""
    hits = [v for k, v in values.items() if k == name or k.startswith(name + "{")]
    return sum(hits) if hits else None


class ManagedServer:
    def __init__(self, argv: list[str], *, log_path: str | Path, port: int | None = None, cwd: str | Path | None = None,
                 env: dict[str, str] | None = None, host: str = "127.0.0.1", ready_path: str = "/v1/models") -> None:
        self.argv = argv
        self.log_path = Path(log_path)
        self.port = port
        self.cwd = cwd
        self.env = env
        self.host = host
        self.ready_path = ready_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ManagedServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.cwd, env=env,
                                     start_new_session=True)
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 4000) -> str:
        return self.log_text()[-n:]

    def wait_ready(self, timeout: float = 120.0) -> ManagedServer:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.argv[:3]} exited with {self.proc.returncode} before it was ready:\n"
                                  f"{self.log_tail()}")
            if self.port in (None, 0):
                m = _PORT_RE.search(self.log_text())
                if m:
                    self.port = int(m.group(1))
            if self.port:
                try:
                    if httpx.get(self.url + self.ready_path, timeout=2, trust_env=False).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)
        raise ServerError(f"server not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        r = httpx.get(self.url + "/metrics", timeout=10, trust_env=False)
        r.raise_for_status()
        return parse_metrics(r.text)

    def rss_kib(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def pause(self) -> None:
        """SIGSTOP the server's whole session (so an idle server takes no CPU from a measurement)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal the server, wait, then kill its whole session; returns the exit code."""
        if self.proc is None:
            return None
        self.resume()  # a paused server cannot act on the signal
        self.send_signal(sig)
        code = self.wait(timeout)
        if code is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        else:  # a server's own workers that outlived it
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> ManagedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
