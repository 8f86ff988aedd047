"""CPU decode step, one variant against another, interleaved step by step in one process.

    python loadtest/bench_decode_step.py [--batch 64] [--rounds 8]
        [--variants "cpu/packed/1,cpu/plain/1,reference/packed/1,cpu/packed/2"]

A variant is attention backend / CPU linear / threads [/ MoE backend] (KernelConfig.attention,
KernelConfig.cpu_linear, torch threads, KernelConfig.moe; e.g. "cpu/onednn/1/loop"). The engine (the 140M benchmark checkpoint,
loadtest/bench_model.py, float32) prefills `--batch` requests of 128 random tokens, then runs
decode steps, switching variant every step, so that background load on a shared machine hits
every variant alike. Prints each variant's median and best wall and CPU (process) time per step;
`--profile` also prints, for the first variant, the PyTorch ops per step (`torch.profiler`) and
the Python functions by own time (`cProfile`, which sees the C kernels' ctypes calls).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


VIEW_OPS = {"view", "slice", "select", "as_strided", "t", "transpose", "reshape", "unsqueeze", "expand", "split",
            "split_with_sizes", "_reshape_alias", "alias", "detach", "resolve_conj", "resolve_neg", "empty",
            "empty_like", "_unsafe_view", "lift_fresh", "result_type", "squeeze", "flatten", "empty_strided",
            "narrow", "permute", "item", "_local_scalar_dense"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--variants", default="cpu/packed/1,cpu/plain/1,reference/packed/1,cpu/packed/2")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    import torch

    from bench_model import make_checkpoint
    from models.kernels import KernelConfig
    from server.engine import LLM, SamplingParams
    from server.engine.request import EngineRequest

    variants = []
    for v in args.variants.split(","):
        attn, linear, threads, *moe = v.split("/")
        variants.append((v, KernelConfig(attention=attn, cpu_linear=linear, moe=moe[0] if moe else "auto"),
                         int(threads)))
    llm = LLM(make_checkpoint("mixtral-140m"), dtype="float32", max_num_seqs=args.batch, max_num_batched_tokens=2048,
              max_model_len=128 + 16 + 4 * args.rounds * len(variants))
    core = llm.core
    rng = random.Random(0)
    for i in range(args.batch):
        core.add_request(EngineRequest(f"r{i}", [rng.randrange(3, 30000) for _ in range(128)],
                                       SamplingParams(temperature=0.0, max_tokens=2 * args.rounds * len(variants) + 8,
                                                      ignore_eos=True)))
    while core.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in core.scheduler.running):
        core.step()
    for _, kernels, threads in variants:  # warm-up: packs weights, builds the C kernel
        core.model.set_kernels(kernels)
        torch.set_num_threads(threads)
        core.step()
    wall: dict[str, list[float]] = {v[0]: [] for v in variants}
    cpu: dict[str, list[float]] = {v[0]: [] for v in variants}
    for _ in range(args.rounds):
        for name, kernels, threads in variants:
            core.model.set_kernels(kernels)
            torch.set_num_threads(threads)
            t, c = time.perf_counter(), time.process_time()
            core.step()
            wall[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    if args.profile:
        name, kernels, threads = variants[0]
        core.model.set_kernels(kernels)
        torch.set_num_threads(threads)
        with torch.profiler.profile() as prof:
            for _ in range(4):
                core.step()
        ops = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith(("aten::", "mkldnn::"))]
        work = [e for e in ops if e.name.split("::")[1] not in VIEW_OPS]
        print(f"{name}: {len(ops) / 4:.0f} top-level PyTorch ops per step, {len(work) / 4:.0f} that are not views")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
        # the C kernels are ctypes calls, invisible to torch.profiler: Python's profiler sees them
        import cProfile
        import pstats

        pr = cProfile.Profile()
        t = time.perf_counter()
        pr.enable()
        for _ in range(4):
            core.step()
        pr.disable()
        print(f"{name}: {(time.perf_counter() - t) / 4 * 1e3:.1f} ms per step under cProfile; functions by own time:")
        pstats.Stats(pr).sort_stats("tottime").print_stats(10)
    print(f"decode step, batch {args.batch}, {args.rounds} steps per variant, interleaved")
    print("| attention / linear / threads [/ moe] | wall ms median | wall ms best | CPU ms median |\n|---|---:|---:|---:|")
    for name, *_ in variants:
        print(f"| {name} | {statistics.median(wall[name]) * 1e3:.1f} | {min(wall[name]) * 1e3:.1f} | "
              f"{statistics.median(cpu[name]) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
