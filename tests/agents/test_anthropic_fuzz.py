"""schemathesis (its CLI, as a user runs it) over POST /v1/messages and /v1/messages/count_tokens,
from the server's own /openapi.json: no 5xx, every answer conforming to the documented schemas
(status codes, content types, bodies: Anthropic's error shape included), schema-invalid bodies
refused, and no warning, "Schema validation mismatch" in particular (positive cases the server
mostly refused). Not checked: that every schema-valid body is accepted (schemathesis's
`positive_data_acceptance`): a JSON schema cannot state the cross-field rules the API has, e.g.
a tool_result must answer a tool_use of the turn before, a forced tool choice needs tools.
The server has a short context, so that no generated max_tokens makes a long generation."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import ServerProcess, start_server

EXAMPLES = 5  # random bodies per operation (fuzzing phase), after the coverage phase's ~1,500 boundary cases


@pytest.fixture(scope="module")
def fuzzed(long_context_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(["--model", str(long_context_model_dir), "--served-model-name", "tiny-agent",
                      "--max-model-len", "128", "--reasoning-parser", "qwen3", "--seed", "0"],
                     tmp_path_factory.mktemp("anthropic-fuzz"))
    yield s
    assert s.stop() == 0, s.logs()[-3000:]


@pytest.mark.slow  # the slow group: CI runs it (`pytest -m slow`), the default suite does not
def test_schemathesis_messages(fuzzed: ServerProcess, tmp_path: Path) -> None:
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "run", fuzzed.url + "/openapi.json", "--include-path-regex", "^/v1/messages",
           "--phases", "coverage,fuzzing", "-n", str(EXAMPLES), "--checks", "all",
           "--exclude-checks", "positive_data_acceptance", "--max-response-time", "120",  # a busy CI machine
           "--generation-deterministic", "--no-color", "-w", "1", "--request-timeout", "120"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path, check=False)
    out = p.stdout + p.stderr
    (tmp_path / "schemathesis.txt").write_text(out)
    assert p.returncode == 0 and "No issues found" in out, out[-4000:]
    assert "Schema validation mismatch" not in out and "mostly rejected" not in out, out[-4000:]
    cases = int(re.search(r"(\d+) generated", out).group(1))
    assert cases >= 1000, out[-2000:]
    log = fuzzed.logs()
    assert not re.search(r"POST /v1/messages(/count_tokens)? 5\d\d", log), log[-3000:]
    answered = re.findall(r"POST /v1/messages 200 ", log)
    assert len(answered) >= 10, len(answered)  # generated bodies were served, not only refused
