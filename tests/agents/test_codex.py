"""Codex CLI (`codex exec`) against a real server through the Responses API: a custom model
provider whose `base_url` is the server and `wire_api = "responses"`, the key from the
environment. The tiny random model writes no useful code; the point is that every request
Codex sends is parsed (its full prompt: developer instructions, environment context, function
and namespace tools) and every stream it receives is valid: `codex exec` exits 0 with no
protocol error, with Codex's default config (it offers the hosted `web_search` tool, which the
server leaves out: it runs no hosted tools). What Codex sent (the server's request summaries and
access lines) and what it printed are left in the test's artifacts (`agent-artifacts/` under
$MOE_SERVE_TEST_ARTIFACTS, else under pytest's base temp dir)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.api.responses_api.convert import HOSTED_TOOLS
from tests.conftest import REPO, skip_or_fail
from tests.server.conftest import ServerProcess, start_server

CODEX = REPO / ".tools" / "npm" / "node_modules" / ".bin" / "codex"
TIMEOUT = 240
KEY = "codex-test-key"
TOOL_TEMPLATE = Path(__file__).resolve().parent / "tool_chat_template.jinja"


@pytest.fixture(scope="module")
def long_context_server(long_context_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A real server on the long-context model: the whole context, a tool-call parser (Codex sends
    `tool_choice: auto`), a chat template that renders tool calls and results, and debug logging
    (the request summaries this test records)."""
    s = start_server(["--model", str(long_context_model_dir), "--served-model-name", "tiny-long",
                      "--max-model-len", "65536", "--tool-call-parser", "hermes",
                      "--chat-template", str(TOOL_TEMPLATE), "--seed", "0", "--log-level", "debug"],
                     tmp_path_factory.mktemp("codex-server"))
    yield s
    rc = s.stop()
    assert rc == 0, f"server exited with {rc}:\n{s.logs()[-3000:]}"


@pytest.fixture
def agent_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`$MOE_SERVE_TEST_ARTIFACTS/agent-artifacts` when set (CI keeps it), else under pytest's base temp dir."""
    root = os.environ.get("MOE_SERVE_TEST_ARTIFACTS")
    path = (Path(root) if root else tmp_path_factory.getbasetemp()) / "agent-artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _codex_home(tmp_path: Path, server: ServerProcess, model: str) -> Path:
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{model}"\n'
        'model_provider = "moe-serve"\n'
        "[model_providers.moe-serve]\n"
        'name = "moe-serve"\n'
        f'base_url = "{server.url}/v1"\n'
        'env_key = "MOE_SERVE_KEY"\n'
        'wire_api = "responses"\n')
    return home


def test_codex_exec_completes(long_context_server: ServerProcess, tmp_path: Path, agent_artifacts: Path) -> None:
    if not CODEX.exists():
        skip_or_fail(f"Codex CLI not installed at {CODEX} (scripts/install_agents.sh)")
    server = long_context_server
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "CODEX_"))}
    env.update({"CODEX_HOME": str(_codex_home(tmp_path, server, "tiny-long")), "MOE_SERVE_KEY": KEY,
                "NO_COLOR": "1"})
    before = len(server.logs())
    runs = []
    # two turns: a new session, then the same session resumed (its history sent back as items)
    for argv in (["exec", "--skip-git-repo-check", "--cd", str(work), "Say hello, then list the files here."],
                 ["exec", "--skip-git-repo-check", "--cd", str(work), "resume", "--last", "And now in one word?"]):
        runs.append(subprocess.run([str(CODEX), *argv], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                   text=True, timeout=TIMEOUT, check=False))
    log = server.logs()[before:]
    sent = [json.loads(m) for m in re.findall(r"POST /v1/responses request: (\{.*\})", log)]
    access = [line for line in log.splitlines() if "POST /v1/responses" in line and "access" in line]
    (agent_artifacts / "codex-requests.json").write_text(json.dumps(sent, indent=1))
    (agent_artifacts / "codex-access.log").write_text("\n".join(access) + "\n")
    (agent_artifacts / "codex-output.txt").write_text(
        "\n=== next run ===\n".join(p.stdout + "\n--- stderr ---\n" + p.stderr for p in runs))
    for proc in runs:
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert "ERROR" not in out, out[-3000:]
    assert len(sent) >= 2, log[-3000:]
    assert access and all(" 200 " in line for line in access), access
    first, last = sent[0], sent[-1]
    assert first["stream"] is True
    # its prompt is long (instructions, environment, tools) and reached the model whole
    kinds = {t.split(":")[0] for t in first["tools"]}
    assert {"function", "namespace"} <= kinds <= {"function", "namespace", *HOSTED_TOOLS}, first["tools"]
    assert len(first["tools"]) >= 5, first["tools"]
    prompt_tokens = [int(m) for m in re.findall(r"prompt_tokens=(\d+)", "\n".join(access))]
    assert max(prompt_tokens) > 2048, prompt_tokens  # past the bundled model's context
    # the resumed turn sent the first turn back: the earlier answer as an assistant message
    assert "message:assistant" in last["input"] and len(last["input"]) > len(first["input"]), last["input"]
    assert prompt_tokens[-1] > prompt_tokens[0], prompt_tokens
