"""Benchmark results as JSON: one file per run, everything the docs table needs in it.

A result (`new_result`, filled by the benchmark, written by `write`):

    {"schema": 1, "benchmark": "cpu-kernels", "command": "python -m loadtest cpu-kernels --threads 1",
     "date": "2026-12-07 03:20 UTC", "git": {"commit", "branch", "dirty"},
     "machine": {cores, physical_cores, cpu_model, cpu_flags, mem_gib, os, ..., "loadavg_start"},
     "versions": {"python", "torch", "transformers", ...}, "params": {...the arguments...},
     "measurements": {...raw samples...},
     "doc": {"section": "cpu-kernels", "heading": "### CPU kernels (experts, linear layers)"},
     "summary": {"blocks": [{"kind": "text", "text": ...},
                            {"kind": "table", "title": ..., "columns": [{"name", "format"}], "rows": [[...]]},
                            {"kind": "note"}]}}

`summary.blocks` is what `python -m loadtest docs` renders (loadtest/docs.py), in order; a
`note` block marks where a note given to the docs command goes. Default path:
loadtest/results/<benchmark>-<UTC stamp>.json (gitignored).
"""

from __future__ import annotations

import datetime as dt
import json
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from loadtest.loadgen.sysinfo import loadavg, machine

SCHEMA = 1
REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "loadtest" / "results"
REQUIRED = ("schema", "benchmark", "command", "date", "git", "machine", "versions", "params", "measurements",
            "doc", "summary")
BLOCK_KINDS = ("text", "table", "note")


def git_info(repo: Path = REPO) -> dict[str, Any]:
    """The checkout's commit, branch and whether it has uncommitted changes (None where git fails)."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "--short", "HEAD"), "branch": git("rev-parse", "--abbrev-ref", "HEAD"),
            "dirty": None if status is None else bool(status), "repo": str(repo)}


def package_versions(*names: str) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("moe-serve", "torch", "transformers", *names):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def command_line(benchmark: str, argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == [benchmark]:  # called through the dispatcher: argv has the name first
        args = args[1:]
    return shlex.join(["python", "-m", "loadtest", benchmark, *args])


def new_result(benchmark: str, argv: list[str] | None, params: dict[str, Any], *, heading: str,
               section: str | None = None, packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """A result with the run's context filled in; the benchmark adds measurements and summary
    blocks. `heading`: the docs section (markdown heading line) its generated block goes under."""
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "schema": SCHEMA, "benchmark": benchmark, "command": command_line(benchmark, argv),
        "date": now.strftime("%Y-%m-%d %H:%M UTC"), "stamp": now.strftime("%Y%m%dT%H%M%SZ"),
        "git": git_info(), "machine": {**machine(), "loadavg_start": loadavg()},
        "versions": package_versions(*packages),
        "params": {k: v for k, v in params.items() if k not in ("json", "doc", "func")},
        "measurements": {}, "doc": {"section": section or benchmark, "heading": heading},
        "summary": {"blocks": []},
    }


def column(name: str, fmt: str = "") -> dict[str, str]:
    """A table column: `fmt` is a format spec for numbers (".2f", ",.1f", "d"); "" prints as is."""
    return {"name": name, "format": fmt}


def table(title: str | None, columns: list[dict[str, str]], rows: list[list[Any]]) -> dict[str, Any]:
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(columns)} columns")
    return {"kind": "table", "title": title, "columns": columns, "rows": rows}


def text(markdown: str) -> dict[str, str]:
    return {"kind": "text", "text": markdown}


def validate(result: dict[str, Any]) -> list[str]:
    """What is missing or malformed in a result (empty: it can be rendered)."""
    errors = [f"missing {k!r}" for k in REQUIRED if k not in result]
    if errors:
        return errors
    if result["schema"] != SCHEMA:
        errors.append(f"schema {result['schema']!r}, expected {SCHEMA}")
    if not str(result["doc"].get("heading", "")).startswith("#"):
        errors.append("doc.heading must be a markdown heading")
    for i, block in enumerate(result["summary"].get("blocks", [])):
        kind = block.get("kind")
        if kind not in BLOCK_KINDS:
            errors.append(f"block {i}: kind {kind!r}")
        elif kind == "table":
            width = len(block.get("columns", []))
            errors += [f"block {i}: a row of {len(r)} cells for {width} columns" for r in block.get("rows", [])
                       if len(r) != width]
    return errors


def default_path(result: dict[str, Any]) -> Path:
    return RESULTS / f"{result['benchmark']}-{result['stamp']}.json"


def write(result: dict[str, Any], path: str | Path | None = None) -> Path:
    """Write the result (to `path`, or the default) and return where; records the path in it."""
    errors = validate(result)
    if errors:
        raise ValueError("malformed result: " + "; ".join(errors))
    out = Path(path) if path else default_path(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        result["path"] = str(out.resolve().relative_to(REPO))
    except ValueError:
        result["path"] = str(out)
    out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return out


def load(path: str | Path) -> dict[str, Any]:
    result = json.loads(Path(path).read_text())
    errors = validate(result)
    if errors:
        raise ValueError(f"{path}: not a benchmark result: " + "; ".join(errors))
    return result
