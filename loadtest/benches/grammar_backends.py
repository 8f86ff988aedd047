"""Grammar backends: xgrammar vs llguidance, per-token mask cost and compile cost at 32k and 150k vocabularies.

Both libraries drive the same token sequences: valid instances of loadtest/schemas.py's
RECORD_SCHEMA tokenized by each tokenizer, one mask fill and one accepted token per step, the
stop token last. Measured side by side in one process, the two libraries alternating per
round (loadtest/harness.py; the machine is shared: only ratios within one run mean something).

Tokenizers (byte-level BPE, cached under ~/.cache/moe-serve/bench/):
- `32k`, `150k`: trained on the standard library's sources (minutes each, the first time);
- `tekken`: Mistral's Tekken (131k), when the `mistral-common` package (which ships it) is installed.

    python -m loadtest grammar-backends [--vocabs 32k,150k] [--rounds 3]

Needs both libraries: `pip install xgrammar llguidance` (moe-serve depends on xgrammar only).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sysconfig
from pathlib import Path

from loadtest import output, results
from loadtest.checkpoints import CACHE
from loadtest.harness import Clock, interleave
from loadtest.schemas import RECORD_SCHEMA, record_instances

HEADING = "### Grammar backend: xgrammar vs llguidance (per-token mask cost)"


def tokenizer_path(name: str) -> str:
    path = CACHE / f"tokenizer-{name}"
    if (path / "tokenizer.json").exists():
        return str(path)
    if name in ("32k", "150k"):
        _train_stdlib_tokenizer(path, 32000 if name == "32k" else 150000)
    elif name == "tekken":
        from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer
        import mistral_common

        src = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
        convert_tekken_tokenizer(str(src), chat_template="").save_pretrained(str(path))
    else:
        raise SystemExit(f"unknown vocabulary {name!r}: 32k, 150k or tekken")
    return str(path)


def _train_stdlib_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    print(f"[bench] training a {vocab_size}-token BPE on {len(files)} standard-library files (minutes)")

    def texts():
        for f in files:
            try:
                yield Path(f).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
                            ).save_pretrained(str(path))


# -- the two libraries, behind the same four calls -----------------------------------------
class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab: int, threads: int):
        import xgrammar as xgr

        self.xgr = xgr
        with Clock() as c:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
            self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.setup_s = c.wall
        self.batch = xgr.BatchGrammarMatcher(threads)
        self.vocab = vocab

    def compile(self, schema: str):
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, n: int):
        return self.xgr.allocate_token_bitmask(n, self.vocab)

    def fill(self, m, bitmask, i: int) -> None:
        m.fill_next_token_bitmask(bitmask, i)

    def fill_batch(self, ms, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(ms, bitmask)

    def accept(self, m, token: int) -> bool:
        return m.accept_token(token)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab: int, threads: int):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll, self.llt = llguidance, llguidance.torch
        with Clock() as c:
            self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        self.setup_s = c.wall
        self.executor = llguidance.LLExecutor(threads)
        self.vocab = vocab

    def compile(self, schema: str):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={
            "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})  # xgrammar's
        m = self.ll.LLMatcher(self.tok, grammar)  # llguidance compiles when the matcher is made
        if m.is_error():
            raise RuntimeError(m.get_error())
        return grammar

    def matcher(self, grammar):
        return self.ll.LLMatcher(self.tok, grammar)

    def bitmask(self, n: int):
        return self.llt.allocate_token_bitmask(n, self.vocab)

    def fill(self, m, bitmask, i: int) -> None:
        self.llt.fill_next_token_bitmask(m, bitmask, i)

    def fill_batch(self, ms, bitmask) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], bitmask)

    def accept(self, m, token: int) -> bool:
        return m.consume_token(token)


def _allowed(bitmask, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def run_single(lib, compiled, sequences: list[list[int]]) -> list[float]:
    """Per-token fill times (µs) over every sequence, one matcher at a time."""
    bitmask = lib.bitmask(1)
    times = []
    for seq in sequences:
        m = lib.matcher(compiled)
        for tok in seq:
            with Clock(cpu=False) as c:
                lib.fill(m, bitmask, 0)
            times.append(c.wall * 1e6)
            if not _allowed(bitmask, 0, tok) or not lib.accept(m, tok):
                raise RuntimeError(f"{lib.name}: token {tok} rejected (the mask and the tokenization disagree)")
    return times


def run_batch(lib, compiled, sequences: list[list[int]], batch: int) -> list[float]:
    """Per-step fill times (µs) of `batch` matchers advancing together (a decode batch)."""
    seqs = sequences[:batch]
    ms = [lib.matcher(compiled) for _ in seqs]
    bitmask = lib.bitmask(len(seqs))
    times = []
    for step in range(min(len(s) for s in seqs)):
        with Clock(cpu=False) as c:
            lib.fill_batch(ms, bitmask)
        times.append(c.wall * 1e6)
        for m, s in zip(ms, seqs):
            lib.accept(m, s[step])
    return times


def one_round(lib, schema: str, sequences: list[list[int]], batch: int, r: dict) -> None:
    """Compile the schema, then drive the matchers: one sequence at a time, then `batch` together."""
    with Clock() as c:
        compiled = lib.compile(schema)
    r["compile_ms"].append(c.wall * 1e3)
    r["single_us"] += run_single(lib, compiled, sequences)
    r["batch_step_us"] += run_batch(lib, compiled, sequences, batch)


def blocks(args, report: dict) -> list[dict]:
    col = results.column
    rows = []
    for vocab, libs in report["vocabs"].items():
        for name, s in libs.items():
            rows.append([vocab, name, s["per_token_mask_us_mean"], s["per_token_mask_us_p50"],
                         s["per_token_mask_us_p99"], s[f"batch{args.batch}_step_us_median"], s["compile_ms_median"],
                         s["tokenizer_setup_s"]])
    return [results.text(f"Byte-level BPE tokenizers trained on the standard library's sources ({args.vocabs}); "
                         f"{args.instances} instances of `loadtest/schemas.py` RECORD_SCHEMA per round, each token: "
                         f"one mask fill, then the token accepted; {args.threads} fill threads; the libraries "
                         f"alternating round by round, {args.rounds} rounds."),
            results.table(None, [col("vocabulary"), col("library"), col("mask fill per token, mean (µs)", ".1f"),
                                 col("p50", ".1f"), col("p99", ".1f"),
                                 col(f"{args.batch}-row batch fill per step, median (µs)", ".0f"),
                                 col("compile, median (ms)", ".1f"), col("tokenizer setup (s)", ".2f")], rows),
            {"kind": "note"}]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m loadtest grammar-backends", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabs", default="32k,150k", help="comma-separated: 32k, 150k, tekken")
    p.add_argument("--instances", type=int, default=16, help="JSON instances per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    output.add_args(p)
    args = p.parse_args(argv)
    result = results.new_result("grammar-backends", argv, vars(args), heading=HEADING,
                                packages=("xgrammar", "llguidance", "tokenizers"))
    from transformers import AutoTokenizer

    schema = json.dumps(RECORD_SCHEMA)
    texts = record_instances(args.instances)
    report: dict = {"schema": "loadtest/schemas.py RECORD_SCHEMA", "threads": args.threads, "vocabs": {}}
    for name in args.vocabs.split(","):
        tok = AutoTokenizer.from_pretrained(tokenizer_path(name))
        vocab = len(tok)
        eos = tok.eos_token_id
        sequences = [tok.encode(t, add_special_tokens=False) + [eos] for t in texts]
        libs = [XGrammar(tok, vocab, args.threads), LLGuidance(tok, vocab, args.threads)]
        res = {lib.name: {"tokenizer_setup_s": round(lib.setup_s, 3), "compile_ms": [], "single_us": [],
                          "batch_step_us": []} for lib in libs}
        interleave({lib.name: (lambda lib=lib: one_round(lib, schema, sequences, args.batch, res[lib.name]))
                    for lib in libs}, rounds=args.rounds, warmup=0)
        summary = {}
        for lib_name, r in res.items():
            single, batch = sorted(r["single_us"]), sorted(r["batch_step_us"])
            summary[lib_name] = {
                "tokenizer_setup_s": r["tokenizer_setup_s"],
                "compile_ms_median": round(statistics.median(r["compile_ms"]), 2),
                "per_token_mask_us_mean": round(statistics.fmean(single), 1),
                "per_token_mask_us_p50": round(single[len(single) // 2], 1),
                "per_token_mask_us_p99": round(single[int(len(single) * 0.99)], 1),
                f"batch{args.batch}_step_us_median": round(statistics.median(batch), 1),
                "tokens_measured": len(single),
            }
        report["vocabs"][f"{name} ({vocab})"] = summary
        report.setdefault("raw", {})[f"{name} ({vocab})"] = res
        print(f"\n== vocabulary {name}: {vocab} tokens, {sum(map(len, sequences))} tokens per round")
        for lib_name, s in summary.items():
            print(f"  {lib_name:10s} " + "  ".join(f"{k}={v}" for k, v in s.items()))
    result["measurements"] = report
    result["summary"]["blocks"] = blocks(args, report)
    output.finish(result, args)
    return result
