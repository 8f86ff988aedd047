"""`python -m loadtest <name> [args]`: run one benchmark (or `docs`, `loadgen`); `--help` lists them."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

from loadtest.benches import BENCHES

HERE = Path(__file__).resolve().parent
TOOLS = {
    "docs": ("loadtest.docs", "rewrite the sections of docs/benchmarks.md from result JSON files"),
    "loadgen": ("loadtest.loadgen.__main__", "the load generator (same as `python -m loadtest.loadgen`)"),
}


def first_line(module: str) -> str:
    """The first line of a module's docstring, read without importing it (no torch for --help)."""
    path = HERE.parent / (module.replace(".", "/") + ".py")
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def usage() -> str:
    width = max(map(len, [*BENCHES, *TOOLS]))
    lines = ["usage: python -m loadtest <name> [args]   (python -m loadtest <name> --help for its flags)", "",
             "benchmarks (each writes loadtest/results/<name>-<UTC stamp>.json, or --json PATH):"]
    lines += [f"  {name:<{width}}  {first_line(mod)}" for name, mod in BENCHES.items()]
    lines += ["", "tools:"] + [f"  {name:<{width}}  {line}" for name, (_, line) in TOOLS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    module = BENCHES.get(name) or TOOLS.get(name, (None,))[0]
    if module is None:
        print(f"python -m loadtest: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    code = importlib.import_module(module).main(rest)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
