"""A moe-serve server run in a checkout, this one or another (its own server/ and models/ serve),
for the benchmarks that probe one over HTTP and compare two builds (`--b-repo`)."""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
from collections.abc import Callable
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


# -- the A/B options and loop the HTTP probes share (big-answer, grammar-attacks) -----------------
def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the benchmark's own arguments, server A's flags after `--`)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def add_server_args(parser: argparse.ArgumentParser, pid_for: str) -> argparse._ArgumentGroup:
    """The `servers` options: A a running server (--url, --pid) or moe-serve started in --a-repo;
    B, measured after A, moe-serve in --b-repo. Returns the group (for a benchmark's own B options)."""
    srv = parser.add_argument_group("servers")
    srv.add_argument("--url", help="server A: an already running server instead of starting one")
    srv.add_argument("--pid", type=int, help=f"--url: the running server's pid ({pid_for}; without it, none)")
    srv.add_argument("--a-repo", default=str(results.REPO), help="server A: moe-serve run in this checkout "
                     "(default: this one)")
    srv.add_argument("--a-label", help="default: A's short commit (or 'running server' with --url)")
    srv.add_argument("--b-repo", help="server B, after A: moe-serve run in this other checkout")
    srv.add_argument("--b-python", help="--b-repo: the Python to run it with (default: this one)")
    srv.add_argument("--b-label", help="default: B's short commit")
    srv.add_argument("--b-server-args", default="", help="--b-repo: extra flags for server B (one string)")
    return srv


def plan_sides(args: argparse.Namespace, parser: argparse.ArgumentParser, base_flags: list[str],
               server_args: list[str]) -> list[tuple[str, str | None, str | None, list[str]]]:
    """[(label, checkout or None for --url, python, server flags)] for A and, with --b-repo, B."""
    plan = [(args.a_label or ("running server" if args.url else label(args.a_repo)),
             None if args.url else args.a_repo, None, base_flags + server_args)]
    if args.b_repo:
        plan.append((args.b_label or label(args.b_repo), args.b_repo, args.b_python,
                     base_flags + shlex.split(args.b_server_args)))
    if len({p[0] for p in plan}) < len(plan):
        parser.error(f"servers A and B need different labels (both {plan[0][0]!r}): --a-label / --b-label")
    return plan


def run_sides(plan, args: argparse.Namespace, stem: Path,
              measure: Callable[[int, str, int | None], dict[str, Any]]) -> list[dict[str, Any]]:
    """Each side in turn: its server started (or --url taken), `measure(side index, url, pid)` merged
    into its record, its server stopped."""
    sides = []
    for i, (name, repo, python, flags) in enumerate(plan):
        server = None
        if repo is None:
            url, pid = args.url, args.pid
        else:
            server = start(repo, flags, stem.with_name(f"{stem.name}-{name.replace(' ', '_')}.log"), python)
            url, pid = server.url, server.pid
        try:
            record = side(name, repo, url, flags)
            record.update(measure(i, url, pid))
        finally:
            if server is not None:
                server.stop(timeout=60)
        sides.append(record)
    return sides
