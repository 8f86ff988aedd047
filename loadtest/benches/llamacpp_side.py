"""llama.cpp side by side: llama-bench and llama-server vs moe-serve at matching bits (F16/bf16, Q8_0/int8, Q4_0/int4).

    python -m loadtest llamacpp [--model mixtral-140m|mixtral-2.4b|DIR] [--formats F16,Q8_0,Q4_0]
        [--float-dtype auto|bfloat16|float32] [--threads 2] [--runs 3] [--concurrency 1,16]
    python -m loadtest llamacpp --perplexity [--ctx 256]     # quality: loadtest/benches/llamacpp_ppl.py
    python -m loadtest llamacpp --decode-ab [--rounds 7]     # batch-1 decode interleaved: llamacpp_decode_ab.py

MEASURE ON A QUIET MACHINE: llama.cpp's spinning threads lose badly when another process takes
a core, and so does any 2-thread server; the load average is recorded before every measurement.

llama.cpp is built once (scripts/build_llamacpp.sh, cached in ~/.cache/moe-serve/llama.cpp) and
the checkpoint (loadtest/checkpoints.py: the random-weight mixtral-140m, or issue 26's 2.43B
mixtral-2.4b written tensor by tensor in bf16) is converted with llama.cpp's convert_hf_to_gguf
to F16 and quantized with llama-quantize to Q8_0 and Q4_0 (loadtest/peers/llamacpp.py; cached
beside the checkpoint). For each format, one format's servers at a time (memory):

1. `llama-bench -t T -r R -p 512 -n 128 -o json`: pp512 and tg128 (tokens/s, mean of R runs).
2. llama-server (`-np 16 -c 16*ctx -t T --cont-batching`), then moe-serve (`python -m
   server.cli`, OMP_NUM_THREADS=T, the F16 pair at `--float-dtype` (default auto: a bf16
   checkpoint keeps bf16 weights with float32 math on the CPU), Q8_0 vs `--quantization
   int8`, Q4_0 vs `--quantization int4`; KV cache for the same 16 x ctx tokens). Each server,
   over HTTP (streamed /v1/completions, token-id prompts, greedy, ignore_eos; the same client
   for both): RSS after load (/proc/PID/status VmRSS, and VmHWM at the end) against the format's
   weight bytes + KV-cache bytes; prefill = time to first token of a 512-token prompt with
   max_tokens 1 (median of --runs, a new random prompt each: no prefix-cache hit); batch-1
   decode = (e2e - TTFT) / (tokens - 1) of a 128-token answer to an 8-token prompt (median of
   --runs); then output tok/s at each --concurrency (loadtest.loadgen, --num-requests
   requests of --prompt-len / --output-len; median over --serving-rounds). The HTTP prefill and
   decode include the HTTP, streaming and scheduling overhead on both servers; llama-bench's
   pp512 / tg128 do not (they are llama.cpp's own in-process figures, shown beside them).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from loadtest import output, results
from loadtest.loadgen.client import send
from loadtest.loadgen.dists import LengthDist
from loadtest.loadgen.procs import ManagedServer
from loadtest.loadgen.runner import LoadPoint, RunConfig, run
from loadtest.loadgen.sysinfo import loadavg
from loadtest.loadgen.workload import RequestSpec

REPO = Path(__file__).resolve().parents[2]
HEADING = "### llama.cpp side by side, speed and memory"
SERVED = "model"
QUIET_WARNING = ("llama.cpp side by side: measure on a quiet machine (no other busy process): 2-thread servers, "
                 "llama.cpp's spinning threads above all, lose badly when another process takes a core.")


def moe_serve_command(model: str, port: int, *, dtype: str, quantization: str | None, max_model_len: int,
                      max_num_seqs: int, num_kv_blocks: int, python: str = sys.executable) -> list[str]:
    cmd = [python, "-m", "server.cli", "--model", model, "--served-model-name", SERVED, "--dtype", dtype,
           "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
           "--num-kv-blocks", str(num_kv_blocks), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    if quantization:
        cmd += ["--quantization", quantization]
    return cmd


def moe_serve_pair(fmt: str, float_dtype: str) -> tuple[str, str | None]:
    """moe-serve's (--dtype, --quantization) matching a llama.cpp type's bits."""
    from loadtest.peers.llamacpp import MATCHING

    if fmt not in MATCHING:
        raise ValueError(f"format {fmt!r}: one of {', '.join(MATCHING)}")
    q = MATCHING[fmt]
    return ("float32", q) if q else (float_dtype, None)


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _probe(url: str, prompt_len: int, max_tokens: int, token_range: tuple[int, int], seed: str) -> Any:
    rng = random.Random(seed)
    spec = RequestSpec(0, prompt_len, max_tokens, [rng.randrange(*token_range) for _ in range(prompt_len)])
    async with httpx.AsyncClient(timeout=None, trust_env=False) as client:
        return await send(client, url, spec, spec.body(SERVED, "completions", temperature=0.0, extra=None),
                          timeout=1800)


def http_probes(url: str, args: argparse.Namespace, token_range: tuple[int, int], label: str) -> dict[str, Any]:
    """Prefill (TTFT of a --prefill-len prompt, max_tokens 1) and batch-1 decode (TPOT of a
    --decode-len answer to an 8-token prompt), each --runs times with new prompts: medians."""
    pre, dec = [], []
    for r in range(args.runs):
        p = asyncio.run(_probe(url, args.prefill_len, 1, token_range, f"{label}/prefill/{r}"))
        if not p.ok:
            raise RuntimeError(f"{label}: prefill probe failed: {p.error_kind} {p.error}")
        pre.append(p.ttft)
        d = asyncio.run(_probe(url, 8, args.decode_len, token_range, f"{label}/decode/{r}"))
        if not d.ok or d.tpot is None:
            raise RuntimeError(f"{label}: decode probe failed: {d.error_kind} {d.error}")
        dec.append(d.tpot)
        print(f"  {label} probe {r + 1}/{args.runs}: prefill {args.prefill_len} tokens {p.ttft:.2f}s "
              f"({args.prefill_len / p.ttft:.1f} tok/s), decode {d.tpot * 1e3:.1f} ms/token", flush=True)
    mp, md = median(pre), median(dec)
    return {"prefill_s": pre, "decode_s_per_token": dec, "prefill_tok_s": args.prefill_len / mp if mp else None,
            "decode_tok_s": 1 / md if md else None, "decode_ms": md * 1e3 if md else None}


def serving(url: str, args: argparse.Namespace, token_range: tuple[int, int], label: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in args.concurrency:
        tps, points = [], []
        for rnd in range(args.serving_rounds):
            n = args.low_load_requests if c == 1 else args.num_requests
            cfg = RunConfig(url=url, model=SERVED, points=(LoadPoint("concurrency", c),), num_requests=n,
                            max_duration=args.max_duration, timeout=1800, warmup=0, progress=False,
                            prompt_len=LengthDist("fixed", args.prompt_len),
                            output_len=LengthDist("fixed", args.output_len), token_range=token_range, seed=0,
                            salt=f"{label}/c{c}/r{rnd}/")
            before = loadavg()
            res = asyncio.run(run(cfg))
            s = res["points"][0]["summary"]
            tps.append(s["output_token_throughput"])
            points.append({"summary": s, "loadavg_before": before})
            print(f"  {label} c={c} round {rnd + 1}: {s['output_token_throughput']:.1f} output tok/s, "
                  f"errors {s['errors'] or 0}, load {before}", flush=True)
        out[str(c)] = {"output_tok_s": median(tps), "rounds": points}
    return out


def warm(url: str, token_range: tuple[int, int]) -> None:
    asyncio.run(_probe(url, 16, 8, token_range, "warmup"))


def run_server(name: str, argv: list[str], port: int, env: dict[str, str], args: argparse.Namespace,
               token_range: tuple[int, int], log: Path, ready_path: str) -> dict[str, Any]:
    print(f"\n=== {name}: starting ({' '.join(argv)}); log {log}", flush=True)
    srv = ManagedServer(argv, log_path=log, port=port, cwd=str(REPO) if "server.cli" in argv else "/tmp", env=env,
                        ready_path=ready_path)
    from loadtest.peers.llamacpp import rss_kib

    t0 = time.monotonic()
    srv.start()
    try:
        srv.wait_ready(args.ready_timeout)
        startup = time.monotonic() - t0
        time.sleep(2.0)
        rss_load = rss_kib(srv.pid)
        info: dict[str, Any] = {"argv": argv, "env": env, "startup_s": startup, "rss_after_load_kib": rss_load,
                                "loadavg_start": loadavg()}
        if "server.cli" in argv:
            try:
                plan = httpx.get(srv.url + "/version", timeout=30, trust_env=False).json().get("kernel_plan") or {}
                info["kernel_plan"] = {k: plan.get(k) for k in ("weight_bytes", "packed_bytes", "quantized_bytes",
                                                                "quantization", "lm_head", "notes")}
                info["layer_groups"] = plan.get("layers")
            except (httpx.HTTPError, ValueError) as e:
                info["kernel_plan_error"] = str(e)
        print(f"=== {name}: ready in {startup:.0f}s, RSS {(rss_load['VmRSS'] or 0) / 2**20:.2f} GiB", flush=True)
        warm(srv.url, token_range)
        if not args.skip_probes:
            info["probes"] = http_probes(srv.url, args, token_range, name)
        if not args.skip_serving:
            info["serving"] = serving(srv.url, args, token_range, name)
        info["rss_end_kib"] = rss_kib(srv.pid)
        return info
    finally:
        code = srv.stop()
        print(f"=== {name}: stopped (exit {code})", flush=True)


def resolve_model(name: str) -> tuple[str, str]:
    """(checkpoint dir, short label) for a shape name of loadtest/checkpoints.py or a directory."""
    from loadtest.checkpoints import SHAPES, make_checkpoint

    if name in SHAPES:
        return make_checkpoint(name), name
    p = Path(name).expanduser()
    if not (p / "config.json").exists():
        raise SystemExit(f"--model {name!r}: neither a benchmark shape ({', '.join(SHAPES)}) nor a checkpoint dir")
    return str(p), p.name


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[2:] if argv is None else argv
    for flag, module in (("--perplexity", "llamacpp_ppl"), ("--decode-ab", "llamacpp_decode_ab")):
        if flag in given:  # another benchmark of the same peer, its own arguments
            bench = importlib.import_module(f"loadtest.benches.{module}")
            return bench.main([a for a in given if a != flag])
    ap = argparse.ArgumentParser(prog="python -m loadtest llamacpp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--perplexity", action="store_true", help="the quality comparison instead (llamacpp_ppl.py)")
    ap.add_argument("--decode-ab", action="store_true",
                    help="batch-1 decode interleaved with llama-bench instead (llamacpp_decode_ab.py)")
    ap.add_argument("--model", default="mixtral-140m", help="mixtral-140m, mixtral-2.4b or a checkpoint directory")
    ap.add_argument("--formats", default="F16,Q8_0,Q4_0", help="llama.cpp types (F16, Q8_0, Q4_0), each against "
                    "moe-serve at the same bits")
    ap.add_argument("--float-dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"],
                    help="moe-serve's --dtype against F16 (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3, help="llama-bench -r, and HTTP prefill/decode probes (median)")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 16])
    ap.add_argument("--parallel", type=int, default=16, help="llama-server -np and moe-serve --max-num-seqs")
    ap.add_argument("--ctx", type=int, default=640, help="tokens per sequence (llama-server -c is parallel x ctx; "
                    "moe-serve --max-model-len, KV blocks for parallel x ctx tokens)")
    ap.add_argument("--num-requests", type=int, default=32, help="requests per serving point (concurrency > 1)")
    ap.add_argument("--low-load-requests", type=int, default=4, help="requests at concurrency 1")
    ap.add_argument("--serving-rounds", type=int, default=1, help="runs of each serving point (median)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=512)
    ap.add_argument("--decode-len", type=int, default=128)
    ap.add_argument("--max-duration", type=float, default=1800.0, help="seconds one serving point may take")
    ap.add_argument("--ready-timeout", type=float, default=1800.0)
    ap.add_argument("--engines", default="llama.cpp,moe-serve", help="which sides to run")
    ap.add_argument("--skip-llama-bench", action="store_true")
    ap.add_argument("--skip-probes", action="store_true", help="no HTTP prefill / decode probes")
    ap.add_argument("--skip-serving", action="store_true", help="no concurrency points")
    output.add_args(ap)
    args = ap.parse_args(argv)

    from loadtest.peers import llamacpp as L

    print("WARNING: " + QUIET_WARNING, flush=True)
    formats = [f for f in args.formats.split(",") if f]
    for f in formats:
        moe_serve_pair(f, args.float_dtype)
    engines = {e for e in args.engines.split(",") if e}
    if "llama.cpp" in engines:
        L.ensure_built()
    model, label = resolve_model(args.model)
    cfg = json.loads((Path(model) / "config.json").read_text())
    token_range = (3, cfg["vocab_size"] - 1)
    ggufs = L.gguf_files(model, Path(model) / "gguf", tuple(formats), threads=args.threads) \
        if "llama.cpp" in engines else {}
    result = results.new_result("llamacpp", argv, vars(args) | {"model_dir": model},
                                heading=f"{HEADING}: {label}", section=f"llamacpp-{label}", packages=("httpx", "gguf"))
    result["versions"]["llama.cpp"] = L.version() if "llama.cpp" in engines else None
    stem = results.default_path(result).with_suffix("") if not args.json else Path(args.json).with_suffix("")
    tokens = args.parallel * args.ctx
    block = 16
    meas: dict[str, Any] = {"config": {k: cfg.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                               "num_local_experts", "num_experts_per_tok",
                                                               "vocab_size", "num_attention_heads",
                                                               "num_key_value_heads")},
                            "formats": {}}
    for fmt in formats:
        dtype, quant = moe_serve_pair(fmt, args.float_dtype)
        info = L.gguf_info(ggufs[fmt]) if fmt in ggufs else {"weight_bytes": None}
        m: dict[str, Any] = {"gguf": str(ggufs.get(fmt)), "gguf_weight_bytes": info["weight_bytes"],
                             "llama_kv_bytes": L.kv_bytes(cfg, tokens, 2), "moe_serve": {"dtype": dtype,
                                                                                          "quantization": quant}}
        print(f"\n##### {fmt} (llama.cpp) vs moe-serve --dtype {dtype}" + (f" --quantization {quant}" if quant else "")
              + (f": GGUF weights {info['weight_bytes'] / 2**30:.2f} GiB" if info["weight_bytes"] else ""), flush=True)
        if "llama.cpp" in engines and not args.skip_llama_bench:
            before = loadavg()
            m["llama_bench"] = L.run_bench(ggufs[fmt], threads=args.threads, reps=args.runs,
                                           n_prompt=args.prefill_len, n_gen=args.decode_len)
            m["llama_bench_loadavg_before"] = before
            print("  llama-bench: " + ", ".join(f"{k} {v['tok_s']:.1f} tok/s (+/- {v['stddev']:.1f})"
                                                 for k, v in m["llama_bench"].items()) + f"; load {before}", flush=True)
        env = {"OMP_NUM_THREADS": str(args.threads)}
        if "llama.cpp" in engines:
            port = free_port()
            m["llama_server"] = run_server(
                f"llama-server {fmt}", L.server_command(ggufs[fmt], port, parallel=args.parallel, threads=args.threads,
                                                        ctx_per_slot=args.ctx, alias=SERVED),
                port, {}, args, token_range, stem.with_name(f"{stem.name}-llama-{fmt}.log"), "/health")
        if "moe-serve" in engines:
            port = free_port()
            kv_elem = 4 if dtype == "float32" else 2
            m["moe_serve_kv_bytes"] = L.kv_bytes(cfg, tokens, kv_elem)
            m["moe_serve"] |= run_server(
                f"moe-serve {quant or dtype}",
                moe_serve_command(model, port, dtype=dtype, quantization=quant, max_model_len=args.ctx,
                                  max_num_seqs=args.parallel, num_kv_blocks=tokens // block),
                port, env, args, token_range, stem.with_name(f"{stem.name}-moe-serve-{fmt}.log"), "/v1/models")
        meas["formats"][fmt] = m
    result["measurements"] = meas
    result["machine"]["loadavg_end"] = loadavg()
    result["summary"]["blocks"] = summary_blocks(result, label)
    output.finish(result, args)
    return 0


def _gib(kib: int | None) -> float | None:
    return kib / 2**20 if kib else None


def summary_blocks(result: dict[str, Any], label: str) -> list[dict[str, Any]]:
    """The docs block: one table row per engine and format, ratios moe-serve / llama.cpp."""
    p, meas = result["params"], result["measurements"]
    col = results.column
    rows, ratios = [], []
    for fmt, m in meas["formats"].items():
        ls, ms, lb = m.get("llama_server") or {}, m.get("moe_serve") or {}, m.get("llama_bench") or {}
        pp, tg = lb.get(f"pp{p['prefill_len']}", {}), lb.get(f"tg{p['decode_len']}", {})

        def row(engine: str, s: dict[str, Any], wbytes: int | None, kv: int | None,
                bench: str = "-") -> list[Any]:
            pr, sv = s.get("probes") or {}, s.get("serving") or {}
            rss = (s.get("rss_after_load_kib") or {}).get("VmRSS")
            base = (wbytes or 0) + (kv or 0)
            return [engine, wbytes / 2**30 if wbytes else None, kv / 2**30 if kv else None, _gib(rss),
                    rss * 1024 / base if rss and base else None, pr.get("prefill_tok_s"), pr.get("decode_tok_s"),
                    (sv.get("1") or {}).get("output_tok_s"),
                    (sv.get(str(max(p["concurrency"]))) or {}).get("output_tok_s"), bench]

        bench = (f"pp{p['prefill_len']} {pp['tok_s']:.1f}, tg{p['decode_len']} {tg['tok_s']:.1f}"
                 if pp and tg else "-")
        if ls or lb:
            rows.append(row(f"llama.cpp {fmt}", ls, m["gguf_weight_bytes"], m["llama_kv_bytes"], bench))
        if ms.get("argv"):
            plan = ms.get("kernel_plan") or {}
            wb = plan.get("weight_bytes") or None
            name = f"moe-serve {ms['quantization'] or ms['dtype']}"
            rows.append(row(name, ms, wb, m.get("moe_serve_kv_bytes")))
            if ls.get("probes") or ls.get("serving"):
                r_l, r_m = rows[-2], rows[-1]

                def ratio(i: int) -> Any:
                    return r_m[i] / r_l[i] if r_m[i] and r_l[i] else None
                bench_ratio = []
                if pp and (ms.get("probes") or {}).get("prefill_tok_s"):
                    bench_ratio.append(f"prefill vs pp{p['prefill_len']} "
                                       f"{ms['probes']['prefill_tok_s'] / pp['tok_s']:.2f}x")
                if tg and (ms.get("probes") or {}).get("decode_tok_s"):
                    bench_ratio.append(f"decode vs tg{p['decode_len']} {ms['probes']['decode_tok_s'] / tg['tok_s']:.2f}x")
                ratios.append([f"{name} / llama.cpp {fmt}", ratio(5), ratio(6), ratio(7), ratio(8),
                               "; ".join(bench_ratio) or "-"])
    cfg = meas["config"]
    c_max = max(p["concurrency"])
    blocks = [
        results.text(
            f"Model {label} (hidden {cfg['hidden_size']}, experts of {cfg['intermediate_size']}, "
            f"{cfg['num_local_experts']} experts top-{cfg['num_experts_per_tok']}, {cfg['num_hidden_layers']} layers, "
            f"vocab {cfg['vocab_size']}); {p['threads']} threads everywhere; llama.cpp {result['versions'].get('llama.cpp')}; "
            f"load average at start {result['machine'].get('loadavg_start')}, at end "
            f"{result['machine'].get('loadavg_end')} (a busy machine makes every figure noisy). One format's servers "
            f"at a time; KV cache for {p['parallel']} x {p['ctx']} tokens (llama.cpp f16, moe-serve its dtype). "
            f"Prefill: TTFT of a {p['prefill_len']}-token prompt; decode: batch-1 TPOT of a {p['decode_len']}-token "
            f"answer (both over HTTP, streamed, medians of {p['runs']}); llama-bench (-r {p['runs']}) in-process."),
        results.table(None, [col("engine, weights"), col("weights GiB", ".2f"), col("KV GiB", ".2f"),
                             col("RSS after load GiB", ".2f"), col("RSS / (weights + KV)", ".2f"),
                             col("prefill tok/s (HTTP)", ".1f"), col("decode tok/s (HTTP)", ".1f"),
                             col("output tok/s c=1", ".1f"), col(f"output tok/s c={c_max}", ".1f"),
                             col("llama-bench tok/s")], rows),
    ]
    if ratios:
        blocks.append(results.table("moe-serve / llama.cpp (above 1: moe-serve faster)",
                                    [col("pair"), col("prefill", ".2f"), col("decode", ".2f"), col("c=1", ".2f"),
                                     col(f"c={c_max}", ".2f"), col("vs llama-bench")], ratios))
    blocks.append({"kind": "note"})
    return blocks


if __name__ == "__main__":
    sys.exit(main())
