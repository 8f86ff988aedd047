"""Micro-benchmark: our MoE block vs transformers' MixtralSparseMoeBlock, same weights.

    python loadtest/bench_moe_block.py [--hidden 1024 --intermediate 2048 --experts 8 --top-k 2]

Times one forward at 1, 16 and 256 tokens (median of repeated runs, torch.utils.benchmark)
and prints the ratio transformers / ours (> 1: ours is faster). Checks the outputs agree.
"""

from __future__ import annotations

import argparse

import torch
import transformers
from torch.utils import benchmark

from models.config import MoEModelConfig
from models.layers.moe import MoEBlock


def build(hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype):
    hf_cfg = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                                        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=8,
                                        num_key_value_heads=8, vocab_size=32)
    torch.manual_seed(0)
    ref = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(hf_cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ours = MoEBlock(MoEModelConfig.from_hf_config(hf_cfg, "MixtralForCausalLM"), 0).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        ours.w13.copy_(ref.experts.gate_up_proj)  # [E, 2I, H]: gate rows then up rows, as ours
        ours.w2.copy_(ref.experts.down_proj)  # [E, H, I]
    return ref.to(dtype), ours.to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    ref, ours = build(args.hidden, args.intermediate, args.experts, args.top_k, dtype)
    print(f"MoE block: hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts top-{args.top_k}, "
          f"{args.dtype}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print(f"| tokens | transformers (ms) | moe-serve (ms) | speed-up |\n|---:|---:|---:|---:|")
    for n in args.tokens:
        x = torch.randn(n, args.hidden, dtype=dtype)
        with torch.inference_mode():
            diff = (ref(x[None])[0] - ours(x)).abs().max().item()
        assert diff < (1e-4 if dtype == torch.float32 else 5e-2), f"outputs differ by {diff}"
        times = []
        for fn in (lambda: ref(x[None]), lambda: ours(x)):
            t = benchmark.Timer(stmt="with torch.inference_mode(): fn()", globals={"fn": fn, "torch": torch})
            times.append(t.blocked_autorange(min_run_time=args.min_run_time).median * 1e3)
        print(f"| {n} | {times[0]:.3f} | {times[1]:.3f} | {times[0] / times[1]:.2f}x |")


if __name__ == "__main__":
    main()
