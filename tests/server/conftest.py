"""Real-server fixtures: `python -m server.cli` subprocesses on 127.0.0.1 with a free port.

The default model is the bundled checkpoint; `MOE_SERVE_TEST_MODEL=<dir>` points the tests at
another one. `MOE_SERVE_TEST_FAKE_ENGINE=1` (dev aid only) serves the fake engine instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE = os.environ.get("MOE_SERVE_TEST_FAKE_ENGINE") == "1"
MODEL = os.environ.get("MOE_SERVE_TEST_MODEL")
READY_TIMEOUT = float(os.environ.get("MOE_SERVE_TEST_READY_TIMEOUT", "240"))

# The main server: a short context (bounds any generation, fuzzed ones too) and room for
# ~100 concurrent short requests.
MAIN_ARGS = ["--max-model-len", "128", "--num-kv-blocks", "512", "--block-size", "16",
             "--max-num-seqs", "32", "--seed", "0", "--drain-timeout", "5"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        module = "tests.server._fake_server" if FAKE else "server.cli"
        model = ["--model", MODEL] if MODEL and "--model" not in args else []
        self.cmd = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(self.port), *model, *args]
        self.log_file = open(log_dir / f"moe-serve-{self.port}.log", "w+")  # noqa: SIM115 - closed in stop()
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_SERVE_")}
        full_env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
        full_env.update(env or {})
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=full_env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready within {timeout}s:\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return Path(self.log_file.name).read_text(errors="replace")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()
        return self.proc.returncode

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)

    def async_client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=120)

    def metric(self, name: str, headers: dict[str, str] | None = None) -> float | None:
        """The value of an unlabelled-or-single-series gauge from /metrics (None if absent)."""
        text = httpx.get(self.url + "/metrics", headers=headers, timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return None


def start_server(args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """Start a server and wait until /ready; its log goes to `log_dir` (a pytest tmp dir)."""
    server = ServerProcess(args, log_dir, env)
    server.wait_ready()
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(MAIN_ARGS, tmp_path_factory.mktemp("main-server"))
    yield s
    rc = s.stop()
    assert rc == 0, f"main server exited with {rc}:\n{s.logs()[-3000:]}"


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def model_name(http: httpx.Client) -> str:
    return http.get("/v1/models").json()["data"][0]["id"]


@pytest.fixture(scope="session")
def max_model_len(http: httpx.Client) -> int:
    return http.get("/v1/models").json()["data"][0]["max_model_len"]
