"""The shell scripts the chart renders run: the model-download init container against a local HTTP
server, and the LeaderWorkerSet leader/worker commands against stand-in `ray`/`python`/`moe-serve`
executables (what they would run, in order, with which arguments)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from tests.conftest import skip_or_fail

from .helpers import CHART, main_container

MODEL_FILES = {"config.json": b'{"model_type": "mixtral"}', "model.safetensors": b"\x00" * 1024,
               "tokenizer.json": b"{}", "sub/extra.json": b"[]"}


def run_sh(script: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


# ---- model download init container ---------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    seen_auth: ClassVar[list[str | None]] = []

    def do_GET(self):
        type(self).seen_auth.append(self.headers.get("Authorization"))
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def model_server(tmp_path_factory):
    """An HTTP server with the model as loose files (/files/...) and as /model.tar.gz."""
    root = tmp_path_factory.mktemp("www")
    for name, data in MODEL_FILES.items():
        (root / "files" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "files" / name).write_bytes(data)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in MODEL_FILES.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "model.tar.gz").write_bytes(buf.getvalue())

    handler = type("Handler", (_Handler,), {"seen_auth": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             lambda *a: handler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", hashlib.sha256(buf.getvalue()).hexdigest(), handler
    server.shutdown()


@pytest.fixture(scope="module")
def download_script(render):
    docs = render([CHART / "ci" / "model-download-values.yaml"])
    init = docs.server_pod_template()["spec"]["initContainers"][0]
    assert init["command"] == ["/bin/sh", "-c"]
    return init["args"][0], {e["name"] for e in init["env"]}


def _env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {"PATH": os.environ["PATH"], "MODEL_DIR": str(tmp_path / "models" / "tiny-model"), "MODEL_URL": "",
           "MODEL_SHA256": "", "MODEL_BASE_URL": "", "MODEL_FILES": ""}
    env.update(overrides)
    return env


@pytest.fixture(autouse=False)
def _download_tools() -> None:
    if not all(shutil.which(t) for t in ("curl", "sha256sum", "tar")):
        skip_or_fail("curl, sha256sum and tar (present in the init container's image) are needed")


needs_curl = pytest.mark.usefixtures("_download_tools")


@needs_curl
def test_download_archive_checks_sha256_and_is_idempotent(download_script, model_server, tmp_path):
    script, env_names = download_script
    url, sha, handler = model_server
    env = _env(tmp_path, MODEL_URL=f"{url}/model.tar.gz", MODEL_SHA256=sha)
    assert set(env) - {"PATH"} <= env_names, "the test sets only env the chart renders"
    proc = run_sh(script, env)
    assert proc.returncode == 0, proc.stderr
    model_dir = Path(env["MODEL_DIR"])
    for name, data in MODEL_FILES.items():
        assert (model_dir / name).read_bytes() == data
    assert (model_dir / ".moe-serve-complete").exists()
    assert not (model_dir / ".moe-serve-archive").exists(), "the archive is deleted after unpacking"
    # a restarted init container (the emptyDir survives) does not download again
    n = len(handler.seen_auth)
    proc = run_sh(script, env)
    assert proc.returncode == 0 and "already" in proc.stdout
    assert len(handler.seen_auth) == n


@needs_curl
def test_download_rejects_a_wrong_sha256(download_script, model_server, tmp_path):
    url, _, _ = model_server
    env = _env(tmp_path, MODEL_URL=f"{url}/model.tar.gz", MODEL_SHA256="0" * 64)
    proc = run_sh(download_script[0], env)
    assert proc.returncode != 0
    assert not (Path(env["MODEL_DIR"]) / ".moe-serve-complete").exists()


@needs_curl
def test_download_files_with_a_bearer_token(download_script, model_server, tmp_path):
    url, _, handler = model_server
    env = _env(tmp_path, MODEL_BASE_URL=f"{url}/files", MODEL_FILES=" ".join(MODEL_FILES), MODEL_TOKEN="s3cret")
    handler.seen_auth.clear()
    proc = run_sh(download_script[0], env)
    assert proc.returncode == 0, proc.stderr
    for name, data in MODEL_FILES.items():
        assert (Path(env["MODEL_DIR"]) / name).read_bytes() == data
    assert handler.seen_auth == ["Bearer s3cret"] * len(MODEL_FILES)


@needs_curl
def test_download_fails_on_http_errors(download_script, model_server, tmp_path):
    url, _, _ = model_server
    env = _env(tmp_path, MODEL_BASE_URL=f"{url}/files", MODEL_FILES="missing.json")
    proc = run_sh(download_script[0], env)
    assert proc.returncode != 0
    assert not (Path(env["MODEL_DIR"]) / ".moe-serve-complete").exists()


# ---- per-file checksums (model.download.checksums) ------------------------------------------------

CHECKED = ("config.json", "model.safetensors")


def _checksum_init(render, checksums: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The init container's script and env, rendered with files CHECKED and these checksums."""
    download = {"baseUrl": "https://models.example.com/org/tiny", "files": list(CHECKED), "checksums": checksums}
    docs = render(set_values=["model.source=download", "model.path=tiny-model"],
                  set_json=[f"model.download={json.dumps(download)}"])
    (init,) = docs.server_pod_template()["spec"]["initContainers"]
    return init["args"][0], {e["name"]: e["value"] for e in init["env"] if "value" in e}


def _run_checked(render, model_server, tmp_path, checksums):
    script, rendered_env = _checksum_init(render, checksums)
    url, _, _ = model_server
    env = {**rendered_env, "PATH": os.environ["PATH"], "MODEL_BASE_URL": f"{url}/files",
           "MODEL_DIR": str(tmp_path / "models" / "tiny-model")}
    return run_sh(script, env), Path(env["MODEL_DIR"]), rendered_env


def _sha(name: str) -> str:
    return hashlib.sha256(MODEL_FILES[name]).hexdigest()


@needs_curl
def test_download_verifies_each_files_sha256(render, model_server, tmp_path):
    checksums = {"config.json": _sha("config.json"), "model.safetensors": _sha("model.safetensors").upper()}
    proc, model_dir, env = _run_checked(render, model_server, tmp_path, checksums)
    assert env["MODEL_CHECKSUMS"].splitlines() == [f"{_sha(f)}  {f}" for f in CHECKED]
    assert proc.returncode == 0, proc.stderr
    for name in CHECKED:
        assert (model_dir / name).read_bytes() == MODEL_FILES[name]
        assert f"sha256 ok: {name}" in proc.stdout
    assert (model_dir / ".moe-serve-complete").exists(), "the pod would start"


@needs_curl
def test_download_fails_on_a_wrong_sha256_and_names_the_file(render, model_server, tmp_path):
    wrong = hashlib.sha256(b"not the weights").hexdigest()
    proc, model_dir, _ = _run_checked(render, model_server, tmp_path,
                                      {"config.json": _sha("config.json"), "model.safetensors": wrong})
    assert proc.returncode != 0
    assert "sha256 mismatch for model.safetensors" in proc.stderr and wrong in proc.stderr, proc.stderr
    assert "config.json" not in proc.stderr, "the file that matched is not blamed"
    assert not (model_dir / ".moe-serve-complete").exists(), "the pod must not start"
    assert not (model_dir / "model.safetensors").exists(), "the bad download is not left behind"


@needs_curl
def test_files_without_a_checksum_are_fetched_unchecked(render, model_server, tmp_path):
    proc, model_dir, env = _run_checked(render, model_server, tmp_path, {"config.json": _sha("config.json")})
    assert env["MODEL_CHECKSUMS"] == f"{_sha('config.json')}  config.json"
    assert proc.returncode == 0, proc.stderr
    assert "sha256 ok: config.json" in proc.stdout and "sha256 ok: model.safetensors" not in proc.stdout
    assert (model_dir / "model.safetensors").read_bytes() == MODEL_FILES["model.safetensors"]


def test_a_checksum_for_a_file_not_downloaded_fails_the_render(render_fails):
    download = {"baseUrl": "https://models.example.com/m", "files": ["config.json"],
                "checksums": {"config.json": "0" * 64, "model.safetensors": "1" * 64}}
    err = render_fails(set_values=["model.source=download"], set_json=[f"model.download={json.dumps(download)}"])
    assert '"model.safetensors", which is not in model.download.files' in err, err


# ---- LeaderWorkerSet leader / worker -------------------------------------------------------------

# Every port a Ray node listens on is fixed (the NetworkPolicy names them; Ray would pick random ones).
RAY_PORT_ARGS = ("[--node-manager-port=6380] [--object-manager-port=6381] [--runtime-env-agent-port=6382] "
                 "[--dashboard-agent-grpc-port=6383] [--dashboard-agent-listen-port=6384] "
                 "[--metrics-export-port=6385] [--min-worker-port=10002] [--max-worker-port=19999]")


def _shims(tmp_path: Path, log: Path, python_rc: int = 0) -> str:
    """ray, python and moe-serve stand-ins that log their arguments; returns a PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, rc in (("ray", 0), ("python", python_rc), ("moe-serve", 0)):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nprintf "%s" "{name}" >> "{log}"\n'
                        f'for a in "$@"; do printf " [%s]" "$a" >> "{log}"; done\necho >> "{log}"\nexit {rc}\n')
        shim.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.fixture(scope="module")
def lws(render):
    docs = render([CHART / "ci" / "vllm-multinode-values.yaml"], set_values=["extraArgs={--max-num-seqs,it's}"])
    tpl = docs.one("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    return main_container(tpl["leaderTemplate"]), main_container(tpl["workerTemplate"])


def test_leader_starts_ray_waits_for_the_group_then_execs_moe_serve(lws, tmp_path):
    leader, _ = lws
    log = tmp_path / "calls.log"
    env = {"PATH": _shims(tmp_path, log), "LWS_GROUP_SIZE": "2", "LWS_LEADER_ADDRESS": "lws-0.lws"}
    proc = run_sh(leader["args"][0], env)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == ("ray [start] [--head] [--port=6379] " + RAY_PORT_ARGS
                        + " [--include-dashboard=false] [--disable-usage-stats]")
    assert calls[1].startswith("python [-c] [import ray")
    assert calls[2] == ("moe-serve [--engine] [vllm] [--tensor-parallel-size] [8] [--data-parallel-size] [2] "
                        "[--enable-expert-parallel] [--max-num-seqs] [it's]"), "arguments survive shell quoting"
    # the readiness check the leader runs is valid Python once the shell expanded LWS_GROUP_SIZE
    code = re.search(r'python -c "(.*?)"; do', leader["args"][0]).group(1).replace("${LWS_GROUP_SIZE}", "2")
    compile(code, "<leader-wait>", "exec")


def test_leader_gives_up_when_workers_never_join(render, tmp_path):
    docs = render([CHART / "ci" / "vllm-multinode-values.yaml"], set_values=["multiNode.workerWaitSeconds=1"])
    leader = main_container(docs.one("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["leaderTemplate"])
    script = leader["args"][0].replace("sleep 5", "sleep 1")  # keep the test quick
    log = tmp_path / "calls.log"
    proc = run_sh(script, {"PATH": _shims(tmp_path, log, python_rc=1), "LWS_GROUP_SIZE": "2"}, timeout=30)
    assert proc.returncode == 1 and "did not join" in proc.stderr
    assert "moe-serve" not in log.read_text()


def test_worker_joins_the_leaders_ray_cluster(lws, tmp_path):
    _, worker = lws
    log = tmp_path / "calls.log"
    env = {"PATH": _shims(tmp_path, log), "LWS_LEADER_ADDRESS": "t-moe-serve-0.t-moe-serve.inference"}
    proc = run_sh(worker["args"][0], env)
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines() == [
        "ray [start] [--address=t-moe-serve-0.t-moe-serve.inference:6379] " + RAY_PORT_ARGS
        + " [--block] [--disable-usage-stats]"]
