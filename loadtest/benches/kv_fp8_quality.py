"""Greedy outputs of the bundled model with `--kv-cache-dtype fp8` against `auto`, on 20 prompts.

    python -m loadtest kv-fp8-quality [--dtype float32,bfloat16] [--max-tokens 32] [--kv-cache-dtype fp8|bfloat16]

For each weight dtype, two offline engines (server.engine.llm.LLM: the native engine, its
kernel plan and paged KV cache, the same --kv-cache-memory) generate greedily from the same 20
prompts, one with the KV cache in the model dtype (`auto`), one in float8_e4m3 (scales 1.0: the
bundled checkpoint has none). Reported per dtype: the KV blocks each gets from the budget, the
prompts whose continuations are identical, and for each one that differs the first differing
position with the reference's logit margin there (top-1 minus top-2 logit of the `auto` engine,
read from its top-2 logprobs: a small margin means a near tie that an fp8 rounding can flip).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from loadtest import output, results

REPO = Path(__file__).resolve().parents[2]
CHECKPOINT = REPO / "models" / "checkpoints" / "tiny-mixtral"
HEADING = "### fp8 KV cache: greedy outputs of the bundled model against the model dtype (CPU)"
KV_BUDGET = 4 * 2**20  # bytes: the same --kv-cache-memory for both engines

# Python-documentation prompts (the bundled model's training domain), of assorted lengths
PROMPTS = (
    "The built-in function len() returns",
    "A list comprehension consists of brackets containing",
    "The with statement is used to",
    "Raised when an operation or function is applied to an object of inappropriate type.",
    "class collections.OrderedDict([items])\n\nReturn an instance of a dict subclass",
    "The try statement specifies exception handlers and/or cleanup code",
    "os.path.join(path, *paths)\n\nJoin one or more path segments",
    "Decorators are",
    "The yield expression is used when defining a generator function",
    "Return a new set object, optionally with elements taken from iterable.",
    "The global statement is a declaration which holds",
    "str.split(sep=None, maxsplit=-1)\n\nReturn a list of the words in the string",
    "Lambda expressions (sometimes called lambda forms) are used to create",
    "The import statement",
    "Dictionaries can be created by placing a comma-separated list of key: value pairs",
    "json.dumps(obj, *, skipkeys=False, ensure_ascii=True",
    "If the module is not found,",
    "The for statement is used to iterate over the elements of a sequence",
    "Return the absolute value of a number. The argument may be",
    "Coroutine functions are declared with async def and",
)


def engine(dtype: str, kv_cache_dtype: str, model: str = str(CHECKPOINT), **kw: Any):
    """An offline engine (server.engine.llm.LLM) with the comparison's cache budget."""
    from server.engine.llm import LLM

    return LLM(model, dtype=dtype, kv_cache_dtype=kv_cache_dtype, kv_cache_memory=KV_BUDGET, seed=0, **kw)


def generate(llm, max_tokens: int, prompts=PROMPTS) -> dict[str, Any]:
    """An engine's greedy outputs: {"blocks", "cache_dtype", "tokens": [[ids]], "top2": [[(lp1, lp2)]]}."""
    from server.engine.request import SamplingParams

    out = llm.generate(list(prompts), SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2,
                                                     ignore_eos=True), use_tqdm=False)
    tokens = [r.outputs[0].token_ids for r in out]
    top2 = [[(lp.top[0][1], lp.top[1][1]) for lp in r.outputs[0].logprobs or []] for r in out]
    return {"blocks": llm.core.pool.num_blocks, "cache_dtype": llm.model_info.kv_cache_dtype,
            "tokens": tokens, "top2": top2}


def compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Which prompts' continuations agree; for the others the first differing position and the
    reference's logit margin there."""
    diffs = []
    for i, (a, b) in enumerate(zip(ref["tokens"], got["tokens"])):
        if a == b:
            continue
        j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        lp1, lp2 = ref["top2"][i][j]
        diffs.append({"prompt": i, "position": j, "ref_token": a[j], "fp8_token": b[j], "ref_margin": lp1 - lp2})
    n = len(ref["tokens"])
    return {"prompts": n, "identical": n - len(diffs), "differences": diffs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest kv-fp8-quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float32,bfloat16",
                    help="comma-separated weight dtypes to compare in (default: %(default)s)")
    ap.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt (default: %(default)s)")
    ap.add_argument("--model", default=str(CHECKPOINT), help="checkpoint (default: the bundled tiny-mixtral)")
    ap.add_argument("--kv-cache-dtype", default="fp8", choices=("fp8", "fp8_e4m3", "bfloat16"),
                    help="the cache compared with auto (default: %(default)s)")
    output.add_args(ap)
    args = ap.parse_args(argv)

    import torch

    result = results.new_result("kv-fp8-quality", argv, vars(args) | {"threads": torch.get_num_threads()},
                                heading=HEADING, packages=("torch",))
    rows, lines = [], []
    for dtype in [d for d in args.dtype.split(",") if d]:
        t0 = time.monotonic()
        ref = generate(engine(dtype, "auto", args.model), args.max_tokens)
        got = generate(engine(dtype, args.kv_cache_dtype, args.model), args.max_tokens)
        cmp = compare(ref, got)
        result["measurements"][dtype] = {"auto_blocks": ref["blocks"], "fp8_blocks": got["blocks"],
                                         "auto_cache_dtype": ref["cache_dtype"], "fp8_cache_dtype": got["cache_dtype"],
                                         **cmp, "seconds": time.monotonic() - t0}
        rows.append([dtype, ref["blocks"], got["blocks"], f"{got['blocks'] / ref['blocks']:.1f}x",
                     f"{cmp['identical']}/{cmp['prompts']}"])
        print(f"{dtype}: KV blocks for {KV_BUDGET / 2**20:.0f} MiB: {ref['blocks']} ({ref['cache_dtype']}) -> "
              f"{got['blocks']} ({got['cache_dtype']}); identical greedy continuations {cmp['identical']}/"
              f"{cmp['prompts']} ({args.max_tokens} tokens each)", flush=True)
        for d in cmp["differences"]:
            line = (f"{dtype}: prompt {d['prompt']} first differs at token {d['position']}: auto {d['ref_token']}, "
                    f"{args.kv_cache_dtype} {d['fp8_token']}; reference logit margin {d['ref_margin']:.4f}")
            print("  " + line, flush=True)
            lines.append(f"- {line}")
    result["summary"]["blocks"] = [
        results.table(None, [results.column("weights"), results.column("KV blocks, auto"),
                             results.column(f"KV blocks, {args.kv_cache_dtype}"), results.column("blocks ratio"),
                             results.column("identical greedy continuations")], rows),
        results.text(f"{len(PROMPTS)} prompts, {args.max_tokens} greedy tokens each, --kv-cache-memory "
                     f"{KV_BUDGET // 2**20} MiB" + ("; fp8 scales 1.0." if args.kv_cache_dtype != "bfloat16" else ".")
                     + ("\n\n" + "\n".join(lines) if lines else "")),
    ]
    output.finish(result, args)
    return 0
