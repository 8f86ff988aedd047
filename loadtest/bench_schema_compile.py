"""What predicts xgrammar's compile time for a JSON schema (the measures behind
server/engine/structured/schema_limits.py), and what moving a compiled grammar between
processes costs (behind compile_pool.py's trial-compile design).

For each measure, a family of schemas growing in it alone: the schema -> grammar conversion
(`Grammar.from_json_schema`) and the compile (`compile_grammar`, one thread), with the bundled
model's tokenizer and with a synthetic 128k-token vocabulary (random strings; `--vocab 0` skips
it). Sizes whose compile would take minutes are left out (`--max-seconds`).

    python loadtest/bench_schema_compile.py              # markdown tables on stdout
    python loadtest/bench_schema_compile.py --vocab 0    # the bundled tokenizer only
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

INT = {"type": "integer"}


def optional(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": INT for i in range(n)}}


def required(n: int) -> dict:
    return {**optional(n), "required": [f"p{i}" for i in range(n)]}


def nested_arrays(depth: int) -> dict:
    s: dict = INT
    for _ in range(depth):
        s = {"type": "array", "items": s}
    return s


def nested_objects(depth: int) -> dict:
    s: dict = INT
    for _ in range(depth):
        s = {"type": "object", "properties": {"a": s}, "required": ["a"]}
    return s


def ref_chain(depth: int) -> dict:
    defs = {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}} for i in range(depth)}
    return {"$ref": "#/$defs/d0", "$defs": {**defs, f"d{depth}": INT}}


def enum(n: int) -> dict:
    return {"enum": [f"value{i}" for i in range(n)]}


def any_of(n: int) -> dict:
    return {"anyOf": [{"type": "object", "properties": {f"k{i}": INT}, "required": [f"k{i}"]} for i in range(n)]}


FAMILIES = [
    ("optional properties (one object)", optional, [50, 100, 200, 400, 800]),
    ("required properties", required, [400, 1600, 6400]),
    ("inline nesting: arrays", nested_arrays, [32, 100, 200, 400]),
    ("inline nesting: objects", nested_objects, [32, 100, 200, 400]),
    ("nesting through $ref", ref_chain, [100, 300, 600]),
    ("enum values", enum, [1000, 10000]),
    ("anyOf branches", any_of, [100, 400, 1600]),
]


def synthetic_info(size: int):
    import xgrammar as xgr

    rng = random.Random(0)
    chars = 'abcdefghijklmnopqrstuvwxyz0123456789"{}[],: _-.ABCDEFGHIJ\\\\'
    vocab = {chr(i) for i in range(32, 127)}
    while len(vocab) < size:
        vocab.add("".join(rng.choice(chars) for _ in range(rng.randint(2, 8))))
    return xgr.TokenizerInfo(sorted(vocab), vocab_type=xgr.VocabType.RAW, stop_token_ids=[0])


def bundled_info():
    import xgrammar as xgr
    from transformers import AutoTokenizer

    from server.config import BUNDLED_MODEL

    tok = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    return xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))


def measure(info, max_seconds: float) -> list[tuple[str, int, float, float | None]]:
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    rows = []
    for name, make, sizes in FAMILIES:
        last = 0.0
        for n in sizes:
            if last > max_seconds / 8:  # sizes at least double and times grow faster: skip the rest
                rows.append((name, n, float("nan"), None))
                continue
            text = json.dumps(make(n))
            start = time.perf_counter()
            grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
            convert = time.perf_counter() - start
            start = time.perf_counter()
            compiler.compile_grammar(grammar)
            last = time.perf_counter() - start
            rows.append((name, n, convert, last))
            print(f"  {name} {n}: convert {convert:.3f}s compile {last:.3f}s", file=sys.stderr, flush=True)
    return rows


def transfer(info) -> dict:
    """A 240 KB pattern schema of 21,000 alternatives: compile vs serialize + deserialize."""
    import xgrammar as xgr

    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(10)) for _ in range(21000)})
    text = json.dumps({"type": "string", "pattern": "^(" + "|".join(words) + ")$"})
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(text, any_whitespace=False)
    out = {"schema_kb": len(text) // 1000, "compiled_mb": round(compiled.memory_size_bytes / 2**20, 1),
           "compile_s": round(time.perf_counter() - start, 2)}
    start = time.perf_counter()
    payload = compiled.serialize_json()
    out["serialize_s"] = round(time.perf_counter() - start, 2)
    out["serialized_mb"] = round(len(payload) / 2**20, 1)
    start = time.perf_counter()
    xgr.CompiledGrammar.deserialize_json(payload, info)
    out["deserialize_s"] = round(time.perf_counter() - start, 2)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128000, help="synthetic vocabulary size (0: skip)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="skip sizes past the one that took this long")
    args = p.parse_args(argv)
    infos = [("bundled", bundled_info())] + ([(f"{args.vocab // 1000}k", synthetic_info(args.vocab))]
                                             if args.vocab else [])
    results = {label: measure(info, args.max_seconds) for label, info in infos}
    labels = [label for label, _ in infos]
    print("| measure | size | " + " | ".join(f"convert / compile ({lbl}), s" for lbl in labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for i, (name, n, _c, _t) in enumerate(results[labels[0]]):
        cells = []
        for lbl in labels:
            _, _, convert, comp = results[lbl][i]
            cells.append("skipped" if comp is None else f"{convert:.3f} / {comp:.3f}")
        print(f"| {name} | {n} | " + " | ".join(cells) + " |")
    print()
    print("transfer (bundled vocabulary):", json.dumps(transfer(infos[0][1])))


if __name__ == "__main__":
    main()
