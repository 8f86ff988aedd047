"""What every benchmark does with its result: the common flags (`--json`, `--doc`, `--note`),
then `finish`: write the JSON, print the markdown block, rewrite the docs section if asked."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loadtest import docs, results


def add_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("results")
    g.add_argument("--json", metavar="PATH",
                   help="write the result here (default: loadtest/results/<benchmark>-<UTC stamp>.json)")
    g.add_argument("--doc", action="store_true",
                   help="also rewrite this benchmark's section of docs/benchmarks.md (as `python -m loadtest docs`)")
    g.add_argument("--note", help="a paragraph saved with the result and shown in its docs block")


def finish(result: dict[str, Any], args: argparse.Namespace, doc: Path = docs.DOC) -> Path:
    if getattr(args, "note", None):
        result["note"] = args.note
    path = results.write(result, getattr(args, "json", None))
    print("\n" + docs.render_block(result))
    print(f"\nwrote {path}")
    if getattr(args, "doc", False):
        docs.write_doc(result, doc)
        print(f"rewrote the section {result['doc']['section']!r} of {doc}")
    return path
