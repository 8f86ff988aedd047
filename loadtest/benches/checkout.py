"""A moe-serve server run in a checkout, this one or another (its own server/ and models/ serve),
for the benchmarks that probe one over HTTP and compare two builds (`--b-repo`)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import httpx

from loadtest import results
from loadtest.loadgen.procs import ManagedServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(repo: str | Path, args: list[str], log: Path, python: str | None = None,
          ready_timeout: float = 300.0) -> ManagedServer:
    """`python -m server.cli ARGS` run in `repo` on a free loopback port, ready (/ready answers 200).
    Another checkout runs without writing bytecode into it."""
    repo = Path(repo).resolve()
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if repo != results.REPO.resolve():
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    port = free_port()
    argv = [python or sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port), *args]
    print(f"[bench] starting {' '.join(argv[1:])} in {repo}; log {log}", flush=True)
    server = ManagedServer(argv, log_path=log, port=port, cwd=repo, env=env, ready_path="/ready")
    try:
        return server.start().wait_ready(ready_timeout)
    except BaseException:
        server.stop(timeout=10)
        raise


def label(repo: str | Path) -> str:
    """A checkout's short commit (its directory's name where git fails)."""
    return results.git_info(Path(repo)).get("commit") or Path(repo).resolve().name


def served_model(url: str) -> str:
    return httpx.get(url + "/v1/models", timeout=30, trust_env=False).json()["data"][0]["id"]


def side(name: str, repo: str | Path | None, url: str, server_args: list[str]) -> dict[str, Any]:
    """What the measurements record of one server: its label, checkout (None: a running --url) and flags."""
    return {"label": name, "url": url, "server_args": server_args,
            "repo": str(Path(repo).resolve()) if repo else None, "git": results.git_info(Path(repo)) if repo else None}


def describe(side: dict[str, Any]) -> str:
    """"**label** (git abc1234)" for the docs ("a running server" for --url; no repetition where the label is the commit)."""
    if side["repo"] is None:
        return f"**{side['label']}** (a running server)"
    commit = (side["git"] or {}).get("commit")
    return f"**{side['label']}**" + (f" (git {commit})" if commit and commit != side["label"] else "")
