"""What predicts xgrammar's compile time for a JSON schema (optional properties, nesting, enums, ...), and what moving a compiled grammar between processes costs.

The measures behind server/engine/structured/schema_limits.py and compile_pool.py's
trial-compile design. For each measure, a family of schemas growing in it alone: the schema ->
grammar conversion (`Grammar.from_json_schema`) and the compile (`compile_grammar`, one thread,
no cache), each timed once by the harness's Clock (wall and process CPU time), with the bundled
model's tokenizer and with a synthetic vocabulary of random strings (`--vocab`, 128k tokens;
`--vocab 0` skips it). Past a size whose compile took `--max-seconds`/8, a family's larger sizes
are skipped (sizes at least double and times grow faster). Then, with the bundled vocabulary, a
231 KB `pattern` schema of 21,000 alternatives: compile vs `serialize_json` + `deserialize_json`.

    python -m loadtest schema-compile                  # both vocabularies (minutes)
    python -m loadtest schema-compile --vocab 0        # the bundled tokenizer only
    python -m loadtest schema-compile --tiny           # seconds: smallest sizes, no synthetic vocabulary
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

from loadtest import output, results
from loadtest.harness import Clock

HEADING = "### Grammar compile cost: what predicts it"
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


def measure(info, families: list, max_seconds: float) -> list[dict[str, Any]]:
    """One row per (family, size): convert and compile wall / CPU seconds (None: skipped)."""
    import xgrammar as xgr

    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    rows = []
    for name, make, sizes in families:
        last = 0.0
        for n in sizes:
            row: dict[str, Any] = {"measure": name, "size": n}
            if last > max_seconds / 8:  # sizes at least double and times grow faster: skip the rest
                rows.append({**row, "skipped": True})
                continue
            text = json.dumps(make(n))
            with Clock() as convert:
                grammar = xgr.Grammar.from_json_schema(text, any_whitespace=False, strict_mode=True)
            with Clock() as compile_:
                compiler.compile_grammar(grammar)
            last = compile_.wall
            rows.append({**row, "skipped": False, "schema_bytes": len(text), "convert_s": convert.wall,
                         "convert_cpu_s": convert.cpu, "compile_s": compile_.wall, "compile_cpu_s": compile_.cpu})
            print(f"[bench]   {name} {n}: convert {convert.wall:.3f} s, compile {compile_.wall:.3f} s "
                  f"(CPU {compile_.cpu:.3f} s)", flush=True)
    return rows


def transfer(info, alternatives: int = 21000) -> dict[str, Any]:
    """A `pattern` schema of `alternatives` 10-letter words: compile vs serialize + deserialize."""
    import xgrammar as xgr

    rng = random.Random(0)
    words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(10))
                    for _ in range(alternatives)})
    text = json.dumps({"type": "string", "pattern": "^(" + "|".join(words) + ")$"})
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    with Clock() as c:
        compiled = compiler.compile_json_schema(text, any_whitespace=False)
    out: dict[str, Any] = {"alternatives": len(words), "schema_kb": round(len(text) / 1000),
                           "compiled_mb": round(compiled.memory_size_bytes / 2**20, 1), "compile_s": c.wall,
                           "compile_cpu_s": c.cpu}
    with Clock() as c:
        payload = compiled.serialize_json()
    out.update(serialize_s=c.wall, serialize_cpu_s=c.cpu, serialized_mb=round(len(payload) / 2**20, 1))
    with Clock() as c:
        xgr.CompiledGrammar.deserialize_json(payload, info)
    out.update(deserialize_s=c.wall, deserialize_cpu_s=c.cpu)
    return out


def blocks(report: dict) -> list[dict]:
    col, labels = results.column, list(report["vocabularies"])
    columns = [col("measure"), col("size", "d")]
    for lbl in labels:
        columns += [col(f"convert, {lbl} (s)", ".3f"), col(f"compile, {lbl} (s)", ".3f"),
                    col(f"compile CPU, {lbl} (s)", ".3f")]
    rows = []
    for i, first in enumerate(report["vocabularies"][labels[0]]["rows"]):
        row = [first["measure"], first["size"]]
        for lbl in labels:
            r = report["vocabularies"][lbl]["rows"][i]
            row += [None, "skipped", None] if r["skipped"] else [r["convert_s"], r["compile_s"], r["compile_cpu_s"]]
        rows.append(row)
    t = report["transfer"]
    vocabs = ", ".join(f"{lbl}: {v['tokens']:,} tokens" for lbl, v in report["vocabularies"].items())
    return [results.text(f"xgrammar, one compile thread, no cache; vocabularies {vocabs}. \"convert\" is the schema "
                         "-> grammar step, \"compile\" the token-mask precomputation, each timed once (wall; and the "
                         "compile's process CPU time, what the compile pool's budget counts); \"skipped\": past "
                         f"a size whose compile took over {report['max_seconds'] / 8:g} s."),
            results.table(None, columns, rows),
            results.table(f"Moving a compiled grammar between processes (the {report['transfer_vocabulary']} "
                          "vocabulary):", [
                col("schema"), col("compiled (MB)", ".1f"), col("compile (s)", ".2f"),
                col("serialize_json (s)", ".2f"), col("serialized (MB)", ".1f"), col("deserialize_json (s)", ".2f")],
                [[f"`pattern`, {t['alternatives']:,} alternatives ({t['schema_kb']} KB)", t["compiled_mb"],
                  t["compile_s"], t["serialize_s"], t["serialized_mb"], t["deserialize_s"]]]),
            {"kind": "note"}]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m loadtest schema-compile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128000, help="synthetic vocabulary size (0: skip it)")
    p.add_argument("--max-seconds", type=float, default=20.0,
                   help="a family's larger sizes are skipped past one whose compile took an eighth of this")
    p.add_argument("--tiny", action="store_true", help="each family's smallest size, no synthetic vocabulary, "
                   "a 2,000-alternative transfer schema: a check of the benchmark, not a measurement")
    output.add_args(p)
    args = p.parse_args(argv)
    result = results.new_result("schema-compile", argv, vars(args), heading=HEADING, packages=("xgrammar",))
    families = [(name, make, sizes[:1]) for name, make, sizes in FAMILIES] if args.tiny else FAMILIES
    infos = [("bundled", bundled_info())]
    if args.vocab and not args.tiny:
        infos.append((f"{args.vocab // 1000}k", synthetic_info(args.vocab)))
    report: dict[str, Any] = {"max_seconds": args.max_seconds, "vocabularies": {}}
    for label, info in infos:
        print(f"[bench] vocabulary {label}: {info.vocab_size} tokens", flush=True)
        report["vocabularies"][label] = {"tokens": info.vocab_size, "rows": measure(info, families, args.max_seconds)}
    report["transfer_vocabulary"] = infos[0][0]
    report["transfer"] = transfer(infos[0][1], 2000 if args.tiny else 21000)
    print(f"[bench] transfer: {json.dumps(report['transfer'])}", flush=True)
    result["measurements"] = report
    result["summary"]["blocks"] = blocks(report)
    output.finish(result, args)
    return result
