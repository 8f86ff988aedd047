"""Batch-1 decode, llama.cpp's `llama-bench` tg against moe-serve's engine, interleaved round by round.

    python -m loadtest llamacpp --decode-ab [--model mixtral-2.4b] [--formats F16,Q8_0,Q4_0]
        [--rounds 7] [--tokens 32] [--threads 2]

A batch-1 decode step reads every active weight once, so both engines run at the machine's memory
bandwidth, and on a shared VM that moves by a quarter between minutes (docs/benchmarks.md): a
llama-bench figure taken minutes away from the engine's compares two machines. Here, per format,
one moe-serve engine stays loaded in this process (the matching bits: --dtype auto on the bf16
checkpoint for F16, --quantization int8 / int4 for Q8_0 / Q4_0, as `python -m loadtest llamacpp`),
and each round runs `llama-bench -p 0 -n TOKENS -r 1` (its generation timing: no prompt, no
sampling), then TOKENS decode steps of the engine (a new request each round, greedy, a 16-token
prompt prefilled untimed), so
each pair of figures is seconds apart. The steps run on a thread of their own after the loading
thread released its OpenMP workers, as in the server (server/engine/native/async_engine.py).
One warm-up round is not recorded. Reported per format: the medians of both ms/token series and the median of the per-round ratios
(llama.cpp ms / moe-serve ms: > 1, moe-serve decodes faster).
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import threading
import time
from typing import Any

from loadtest import output, results

HEADING = "### llama.cpp side by side, batch-1 decode interleaved"
PROMPT = 16


def engine(model: str, fmt: str, tokens: int) -> Any:
    from loadtest.benches.llamacpp_side import moe_serve_pair
    from server.engine import LLM

    dtype, quant = moe_serve_pair(fmt, "auto")
    return LLM(model, dtype=dtype, quantization=quant, max_num_seqs=1, max_num_batched_tokens=256,
               max_model_len=PROMPT + tokens + 16)


def on_thread(fn: Any) -> Any:
    """fn() on a new thread (the server's engine thread), its result."""
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def decode_ms(llm: Any, tokens: int, seed: int) -> float:
    """ms per token of `tokens` decode steps of one new request (its prefill untimed)."""
    from server.engine import SamplingParams
    from server.engine.request import EngineRequest

    core = llm.core
    rng = random.Random(seed)
    vocab = core.model.config.vocab_size
    core.add_request(EngineRequest(f"ab{seed}", [rng.randrange(3, vocab) for _ in range(PROMPT)],
                                   SamplingParams(temperature=0.0, max_tokens=tokens + 1, ignore_eos=True)))

    def run() -> float:
        core.step()  # the prefill, and its first token
        t = time.perf_counter()
        for _ in range(tokens):
            core.step()
        ms = (time.perf_counter() - t) / tokens * 1e3
        if core.scheduler.running or core.scheduler.waiting:
            raise RuntimeError("the request did not finish after its tokens: steps miscounted")
        return ms

    return on_thread(run)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest llamacpp --decode-ab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral-2.4b", help="benchmark shape (loadtest/checkpoints.py) or HF dir")
    ap.add_argument("--formats", default="F16,Q8_0,Q4_0")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per round for each engine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gguf-dir", default=None, help="where the GGUF files are made (default: MODEL/gguf)")
    output.add_args(ap)
    args = ap.parse_args(argv)

    import torch

    from loadtest.benches.llamacpp_side import QUIET_WARNING, resolve_model
    from loadtest.loadgen.sysinfo import loadavg
    from loadtest.peers import llamacpp as L
    from models.kernels.cpu_build import release_openmp_threads

    print("WARNING: " + QUIET_WARNING, flush=True)
    torch.set_num_threads(args.threads)
    L.ensure_built()
    model, label = resolve_model(args.model)
    formats = [f for f in args.formats.split(",") if f]
    ggufs = L.gguf_files(model, args.gguf_dir or f"{model}/gguf", tuple(formats), threads=args.threads)
    result = results.new_result("llamacpp-decode-ab", argv, vars(args) | {"model_dir": model},
                                heading=f"{HEADING}: {label}", section=f"llamacpp-decode-ab-{label}",
                                packages=("gguf",))
    result["command"] = shlex.join(["python", "-m", "loadtest", "llamacpp", "--decode-ab", *(argv or [])])
    result["versions"]["llama.cpp"] = L.version()
    rows = []
    for fmt in formats:
        print(f"=== {fmt}: loading moe-serve ({label}) ...", flush=True)
        llm = engine(model, fmt, args.tokens)
        release_openmp_threads()  # the steps run on other threads, as the server's engine thread
        plan = llm.core.model.kernel_plan
        ours, theirs, ratios, load = [], [], [], []
        # a warm-up round, not recorded: llama-bench's first run after the engine loaded reads the
        # GGUF back into the page cache (3x slower), and the engine's first steps fault its buffers in
        L.run_bench(ggufs[fmt], threads=args.threads, reps=1, n_prompt=0, n_gen=args.tokens)
        decode_ms(llm, args.tokens, -1)
        for r in range(args.rounds):
            load.append(loadavg())
            bench = L.run_bench(ggufs[fmt], threads=args.threads, reps=1, n_prompt=0, n_gen=args.tokens)
            ts = bench[f"tg{args.tokens}"]["tok_s"]
            lm = 1e3 / ts
            mm = decode_ms(llm, args.tokens, r)
            ours.append(mm)
            theirs.append(lm)
            ratios.append(lm / mm)
            print(f"  round {r + 1}: llama.cpp {fmt} {lm:.1f} ms/token, moe-serve {mm:.1f} ms/token, "
                  f"ratio {lm / mm:.2f}", flush=True)
        del llm
        m = {"moe_serve_ms": ours, "llamacpp_ms": theirs, "ratios": ratios, "loadavg": load,
             "gguf": str(ggufs[fmt]), "quantization": plan.quantization, "median_ratio": statistics.median(ratios)}
        result["measurements"][fmt] = m
        rows.append([fmt, plan.quantization or "float32", statistics.median(theirs), statistics.median(ours),
                     statistics.median(ratios), min(ratios), max(ratios)])
        print(f"=== {fmt}: median ratio {statistics.median(ratios):.2f} "
              f"(llama.cpp ms / moe-serve ms; > 1: moe-serve faster)", flush=True)
    col = results.column
    result["summary"]["blocks"] = [
        results.text(f"The {label} benchmark checkpoint, batch-1 decode, {args.threads} threads: per round "
                     f"`llama-bench -p 0 -n {args.tokens} -r 1` then {args.tokens} decode steps of moe-serve's engine "
                     f"(a new 16-token request per round, the engine loaded once per format, steps on an engine thread), "
                     f"{args.rounds} rounds after one unrecorded warm-up round. "
                     f"Ratio: llama.cpp ms per token / moe-serve ms per token (> 1: moe-serve faster), "
                     f"median over rounds (min and max beside)."),
        results.table(None, [col("llama.cpp"), col("moe-serve weights"), col("llama.cpp ms/token", ".1f"),
                             col("moe-serve ms/token", ".1f"), col("ratio (median)", ".2f"), col("min", ".2f"),
                             col("max", ".2f")], rows),
    ]
    output.finish(result, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
