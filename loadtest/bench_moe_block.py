"""Micro-benchmark: our MoE block vs transformers' MixtralSparseMoeBlock, same weights.

    python loadtest/bench_moe_block.py [--hidden 1024 --intermediate 2048 --experts 8 --top-k 2]

Times one forward at 1, 16 and 256 tokens and prints the ratio transformers / ours (> 1: ours
is faster). The two are timed alternately, call by call, and each reports its median, so
load from other processes hits both alike. Checks the outputs agree first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from models.hf_config import from_hf_config
from models.layers.moe import MoEBlock


def build(hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype):
    hf_cfg = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                                        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=8,
                                        num_key_value_heads=8, vocab_size=32)
    torch.manual_seed(0)
    ref = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(hf_cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ours = MoEBlock(from_hf_config(hf_cfg, "MixtralForCausalLM"), 0).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        ours.w13.copy_(ref.experts.gate_up_proj)  # [E, 2I, H]: gate rows then up rows, as ours
        ours.w2.copy_(ref.experts.down_proj)  # [E, H, I]
    return ref.to(dtype), ours.to(dtype)


def interleaved(fns, min_run_time: float) -> list[float]:
    """Median milliseconds of each function, timed alternately."""
    samples: list[list[float]] = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:  # warm-up
            fn()
        start = time.perf_counter()
        while time.perf_counter() - start < min_run_time * len(fns) or len(samples[0]) < 5:
            for fn, acc in zip(fns, samples):
                t0 = time.perf_counter()
                fn()
                acc.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(acc) for acc in samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--min-run-time", type=float, default=2.0)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    ref, ours = build(args.hidden, args.intermediate, args.experts, args.top_k, dtype)
    print(f"MoE block: hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts top-{args.top_k}, "
          f"{args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print("| tokens | transformers (ms) | moe-serve (ms) | speed-up |\n|---:|---:|---:|---:|")
    for n in args.tokens:
        x = torch.randn(n, args.hidden, dtype=dtype)
        with torch.inference_mode():
            diff = (ref(x[None])[0] - ours(x)).abs().max().item()
        assert diff < (1e-4 if dtype == torch.float32 else 5e-2), f"outputs differ by {diff}"
        times = interleaved([lambda: ref(x[None]), lambda: ours(x)], args.min_run_time)
        print(f"| {n} | {times[0]:.3f} | {times[1]:.3f} | {times[0] / times[1]:.2f}x |")


if __name__ == "__main__":
    main()
