"""The CPU experts kernels for a family variant (gpt-oss: biases, clamped SwiGLU) at batch sizes
past `CPU_KERNEL_PAIRS_PER_EXPERT`: the C variant kernel against the per-expert loop (what the
plan ran there before the variants kept the C kernel at every size), and the plain experts'
loop over packed gate+up (Mixtral's path there) for scale.

    python scripts/bench_variant_experts.py [--threads N] [--tokens 256 1024 4096] [--rounds 5]

Shapes of the family-decode benchmark models (hidden 512, 8 experts of intermediate 1024, top-2),
float32, random weights; each kernel's median time over `--rounds`, the kernels interleaved.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.kernels import cpu_ops  # noqa: E402
from models.kernels.fused_moe import ExpertVariant, moe_loop  # noqa: E402
from models.kernels.packed import PackedExperts, PackedWeight, moe_cpu  # noqa: E402
from models.kernels.plan import CPU_KERNEL_PAIRS_PER_EXPERT, LinearLayout  # noqa: E402

E, H, INTER, TOP_K = 8, 512, 1024, 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_ops.load() is None:
        raise SystemExit("the C kernels are not built here")
    g = torch.Generator().manual_seed(0)
    w13 = torch.randn(E, 2 * INTER, H + 1, generator=g) * 0.02  # the bias as the last column (gpt-oss)
    w2 = torch.randn(E, H, INTER + 1, generator=g) * 0.02
    w13_plain, w2_plain = w13[..., :H].contiguous(), w2[..., :INTER].contiguous()
    packed = PackedExperts(w13, w2, bias=True)
    gate_up = [PackedWeight(w13_plain, LinearLayout.PANELS, index=e) for e in range(E)]
    variant = ExpertVariant(bias=True, limit=7.0, alpha=1.702)
    print(f"{torch.get_num_threads()} thread(s); ms per call, median of {args.rounds}\n")
    print("| tokens | pairs/expert | variant: loop | variant: C kernel | plain: loop (packed gate+up) |")
    print("|---:|---:|---:|---:|---:|")
    for T in args.tokens:
        x = torch.randn(T, H, generator=g)
        w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(TOP_K, dim=-1)
        fns = {"loop": lambda: moe_loop(x, w13, w2, ids, w, variant),
               "c": lambda: moe_cpu(x, packed, ids, w, variant),
               "plain": lambda: moe_loop(x, w13_plain, w2_plain, ids, w, None, gate_up)}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for f in fns.values():
            f()  # warm-up (packing)
        for _ in range(args.rounds):
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        note = "" if T * TOP_K > CPU_KERNEL_PAIRS_PER_EXPERT * E else " (C kernel's range)"
        print(f"| {T} | {T * TOP_K // E}{note} | {med['loop']:.1f} | {med['c']:.1f} | {med['plain']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
