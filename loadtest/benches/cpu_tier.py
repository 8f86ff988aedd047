"""CPU expert tier by format: the tier's time per decode step, float32 vs bf16 vs int8 vs int4.

    python -m loadtest cpu-tier [--formats float32,bf16,bf16-in-place,int8,int4] [--batches 1,16]
        [--rounds 20] [--shape mixtral-140m] [--on-device 4]

The expert shapes of a benchmark checkpoint (loadtest/checkpoints.py SHAPES: hidden size,
intermediate size, experts, top-k, layers; random weights, no checkpoint written), placed as
`--gpu-expert-budget` does with `--on-device` experts per layer on a virtual device and the rest
in the CPU tier (`--cpu-expert-format`; the executor's `build_layer_state`). One step is every
MoE layer's tier pass (the executor's sync-free dispatch, computed inline: what the tier's worker
thread does while the GPU runs the rest) for `batch` tokens routed uniformly at random (top-k).
`bf16-in-place`: a bf16 model's tier, its own weights read in place; the others convert or
quantize a float32 model's experts. The variants are interleaved step by step
(loadtest/harness.py). Reported: median and best step time, ratio to float32, the tier's bytes.
"""

from __future__ import annotations

import argparse

from loadtest import output, results
from loadtest.harness import interleave

HEADING = "### CPU expert tier by format"


class _CFn:
    """The plan's placed-experts function for a plain SwiGLU layer whose CPU kernel is the C one."""

    def c_kernel(self, device_type: str) -> bool:
        return device_type == "cpu"

    def __call__(self, x, w13, w2, topk_ids, topk_w):
        from models.kernels.fused_moe import moe_loop

        return moe_loop(x, w13, w2, topk_ids, topk_w)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest cpu-tier", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="float32,bf16,bf16-in-place,int8,int4")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=20, help="timed steps per variant")
    ap.add_argument("--shape", default="mixtral-140m", help="expert shapes of this benchmark checkpoint")
    ap.add_argument("--on-device", type=int, default=None, help="experts per layer off the tier (default: half)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    output.add_args(ap)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from loadtest.checkpoints import SHAPES
    from models.kernels import cpu_ops
    from models.placement.executor import _INLINE, _start_host, build_layer_state
    from models.placement.planner import place

    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_ops.load() is None:
        raise SystemExit("the C kernels do not build here")
    shape = SHAPES[args.shape]
    H, inter, E = shape["hidden_size"], shape["intermediate_size"], shape["num_local_experts"]
    k, L = shape["num_experts_per_tok"], shape["num_hidden_layers"]
    on_device = E // 2 if args.on_device is None else args.on_device
    plan = place("contiguous", np.zeros((L, E)), ["cpu:0"], [on_device], 0, host="cpu")
    gen = torch.Generator().manual_seed(0)
    masters = [((torch.randn(E, 2 * inter, H, generator=gen) * 0.02), (torch.randn(E, H, inter, generator=gen) * 0.02))
               for _ in range(L)]
    formats = [f for f in args.formats.split(",") if f]
    tiers, nbytes = {}, {}
    for fmt in formats:
        states = []
        for li, (w13, w2) in enumerate(masters):
            if fmt == "bf16-in-place":
                w13, w2, tf = w13.bfloat16(), w2.bfloat16(), "bf16"
            else:
                tf = fmt
            state, _ = build_layer_state(plan.layers[li], w13, w2, torch.device("cpu"), _CFn(), host="cpu",
                                         tier_format=tf)
            assert state.host is not None and state.host.packed is not None, fmt
            states.append(state)
        tiers[fmt], nbytes[fmt] = states, sum(s.host.nbytes for s in states)
    batches = [int(b) for b in args.batches.split(",") if b]

    def step_fn(states, T):
        xs = [torch.randn(T, H, generator=gen) for _ in range(L)]
        ids = [torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(T)]) for _ in range(L)]
        ws = [torch.rand(T, k, generator=gen) for _ in range(L)]
        pairs = [st.pair_groups(i) for st, i in zip(states, ids)]

        def step():
            for st, x, (group, rows), w in zip(states, xs, pairs, ws):
                _INLINE.begin()
                _start_host(st, None, x, group, rows, w.reshape(-1), T, k)()
        return step

    variants = {f"{f}/{b}": step_fn(tiers[f], b) for f in formats for b in batches}
    result = results.new_result("cpu-tier", argv, vars(args) | {"threads": torch.get_num_threads()},
                                heading=HEADING, packages=("torch",))
    with torch.inference_mode():
        timed = interleave(variants, rounds=args.rounds, warmup=2)
    rows = []
    for b in batches:
        base = timed[f"float32/{b}"].summary()["wall_median_s"] if "float32" in formats else None
        for f in formats:
            s = timed[f"{f}/{b}"].summary()
            ratio = base / s["wall_median_s"] if base else float("nan")
            result["measurements"][f"{f}/{b}"] = {"format": f, "batch": b, "summary": s, "tier_bytes": nbytes[f]}
            rows.append([f, b, s["wall_median_s"] * 1e3, s["wall_best_s"] * 1e3, ratio, nbytes[f] / 2**20])
            print(f"{f:>14} batch {b:>3}: median {s['wall_median_s'] * 1e3:7.2f} ms  best {s['wall_best_s'] * 1e3:7.2f} ms"
                  f"  speed vs float32 {ratio:5.2f}x  tier {nbytes[f] / 2**20:7.1f} MiB", flush=True)
    col = results.column
    result["summary"]["blocks"] = [
        results.text(f"The {args.shape} expert shapes ({L} MoE layers, {E} experts of {H}x{inter}, top-{k}), "
                     f"{E - on_device} experts per layer in the CPU tier; one step = every layer's tier pass for "
                     f"the batch, variants interleaved, {args.rounds} timed steps each, "
                     f"{torch.get_num_threads()} threads."),
        results.table(None, [col("tier format"), col("batch", "d"), col("tier ms/step median", ".2f"),
                             col("best", ".2f"), col("speed vs float32", ".2f"), col("tier MiB", ".1f")], rows),
    ]
    output.finish(result, args)
    return 0
