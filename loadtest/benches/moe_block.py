"""Our MoE block vs transformers' MixtralSparseMoeBlock on the same weights, one forward at 1, 16, 256 tokens.

    python -m loadtest moe-block [--hidden 1024 --intermediate 2048 --experts 8 --top-k 2]
        [--tokens 1 16 256] [--dtype float32] [--threads N] [--min-run-time 2]

Checks the outputs agree first, then times the two alternately, call by call (loadtest/harness.py),
for at least --min-run-time seconds each, and reports each one's median and best wall time and
the ratio transformers / ours (> 1: ours is faster). Our block runs the kernels the plan picks
for a model of this shape (models/kernels/plan.py: on a float32 CPU, the C experts kernel).
"""

from __future__ import annotations

import argparse

import torch
import transformers

from loadtest import output, results
from loadtest.harness import interleave
from models.hf_config import from_hf_config
from models.kernels.packed import PackedExperts, PackedWeight
from models.kernels.plan import LinearLayout, MoEKernel, resolve_plan
from models.layers.moe import MoEBlock

HEADING = "## MoE block micro-benchmark"


def build(hidden: int, inter: int, experts: int, top_k: int, dtype: torch.dtype):
    """transformers' block and ours with the same weights; ours with its planned kernels."""
    hf_cfg = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                                        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=8,
                                        num_key_value_heads=8, vocab_size=32)
    torch.manual_seed(0)
    ref = transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock(hf_cfg).eval()
    for p in ref.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cfg = from_hf_config(hf_cfg, "MixtralForCausalLM")
    ours = MoEBlock(cfg, 0).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(ref.gate.weight)
        ours.w13.copy_(ref.experts.gate_up_proj)  # [E, 2I, H]: gate rows then up rows, as ours
        ours.w2.copy_(ref.experts.down_proj)  # [E, H, I]
    ref, ours = ref.to(dtype), ours.to(dtype)
    plan = resolve_plan(cfg, torch.device("cpu"), dtype)
    lk = plan.layers[0]  # the block's kernels and packed copies, as MoEForCausalLM.apply_plan gives them
    packed_w13 = ([PackedWeight(ours.w13, lk.gate_up, e) for e in range(experts)]
                  if lk.gate_up != LinearLayout.PLAIN else None)
    packed = PackedExperts(ours.w13, ours.w2) if MoEKernel.CPU in (lk.moe, lk.moe_large) else None
    ours.apply_kernels(lk, plan, packed_w13, packed)
    return ref, ours, plan


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest moe-block", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, help="torch threads (default: PyTorch's)")
    ap.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed calls per block and size")
    output.add_args(ap)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ref, ours, plan = build(args.hidden, args.intermediate, args.experts, args.top_k, dtype)
    result = results.new_result("moe-block", argv, vars(args) | {"threads": torch.get_num_threads()},
                                heading=HEADING)
    result["measurements"] = {"kernel_plan": plan.to_dict(), "sizes": []}
    rows = []
    for n in args.tokens:
        x = torch.randn(n, args.hidden, dtype=dtype)
        with torch.inference_mode():
            diff = (ref(x[None])[0] - ours(x)).abs().max().item()
            assert diff < (1e-4 if dtype == torch.float32 else 5e-2), f"outputs differ by {diff}"
            t = interleave({"transformers": lambda: ref(x[None]), "moe-serve": lambda: ours(x)},
                           rounds=5, warmup=1, min_time=args.min_run_time)
        s = {k: v.summary() for k, v in t.items()}
        result["measurements"]["sizes"].append({"tokens": n, "max_abs_diff": diff,
                                                "samples": {k: v.to_json() for k, v in t.items()}, "summary": s})
        tf, ms = s["transformers"]["wall_median_s"], s["moe-serve"]["wall_median_s"]
        rows.append([n, tf * 1e3, s["transformers"]["wall_best_s"] * 1e3, ms * 1e3, s["moe-serve"]["wall_best_s"] * 1e3,
                     s["moe-serve"]["n"], f"{tf / ms:.2f}x"])
        print(f"tokens {n}: transformers {tf * 1e3:.3f} ms, moe-serve {ms * 1e3:.3f} ms (median)", flush=True)
    lk = plan.layers[0]
    result["summary"]["blocks"] = [
        results.text(f"Our `MoEBlock` (experts kernel from the plan: {lk.moe.value}"
                     + (f", {lk.moe_large.value} above its pairs-per-expert limit" if lk.moe_large else "")
                     + f") against transformers' `MixtralSparseMoeBlock` on the same weights (outputs checked "
                     f"equal first): hidden {args.hidden}, intermediate {args.intermediate}, {args.experts} experts "
                     f"top-{args.top_k}, {args.dtype}, {torch.get_num_threads()} thread(s). The two blocks are "
                     "timed alternately, call by call, at least "
                     f"{args.min_run_time:g} s each per size; wall time per forward."),
        results.table(None, [results.column("tokens", "d"), results.column("transformers median (ms)", ".3f"),
                             results.column("best (ms)", ".3f"), results.column("moe-serve median (ms)", ".3f"),
                             results.column("best (ms)", ".3f"), results.column("calls timed", "d"),
                             results.column("speed-up (medians)")], rows),
        {"kind": "note"},
    ]
    output.finish(result, args)
    return result
