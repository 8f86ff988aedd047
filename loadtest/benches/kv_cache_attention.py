"""The C paged decode attention (csrc/paged_attention_cpu.c) over a float32, bfloat16 and fp8 KV
cache at a long context, one layer of the 140M benchmark model's shape (8 query heads of 64, 4
KV heads), interleaved call by call in one process.

    python -m loadtest.benches.kv_cache_attention [--context 4096] [--batch 1,16] [--rounds 30] [--threads N]

Each batch size holds `--batch` sequences of `--context` tokens in scattered 16-token blocks;
the cache contents are the same values in each format (rounded / quantized from one float32
draw). Printed: per format the median and best wall time of one call, the median process-CPU
time (all threads), the KV bytes it reads, and the speed against the float32 cache (best wall
times: the least disturbed by other jobs on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 8, 4, 64, 16


def cases(batch: int, context: int, seed: int = 0):
    import torch

    from models.layers.paged import quantize_fp8

    g = torch.Generator().manual_seed(seed)
    per_seq = -(-context // BLOCK)
    nblocks = batch * per_seq
    k = torch.randn(nblocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(nblocks, BLOCK, KV_HEADS, HEAD_DIM, generator=g)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=g)
    tables = torch.randperm(nblocks, generator=g).view(batch, per_seq)
    lens = torch.full((batch,), context, dtype=torch.int64)
    return q, tables, lens, {
        "float32": (k, v, (1.0, 1.0)),
        "bfloat16": (k.bfloat16(), v.bfloat16(), (1.0, 1.0)),
        "fp8": (quantize_fp8(k, 0.02), quantize_fp8(v, 0.02), (0.02, 0.02)),
    }


def measure(batch: int, context: int, rounds: int) -> dict[str, dict[str, float]]:
    from models.kernels.paged_attention import paged_decode

    q, tables, lens, caches = cases(batch, context)
    scale = HEAD_DIM**-0.5
    times: dict[str, list[float]] = {name: [] for name in caches}
    cpu: dict[str, list[float]] = {name: [] for name in caches}
    for _ in range(2):  # warm up
        for k, v, (ks, vs) in caches.values():
            paged_decode(q, k, v, tables, lens, scale, "cpu", k_scale=ks, v_scale=vs)
    for _ in range(rounds):  # interleaved: each format sees the same machine load
        for name, (k, v, (ks, vs)) in caches.items():
            t0, c0 = time.perf_counter(), time.process_time()
            paged_decode(q, k, v, tables, lens, scale, "cpu", k_scale=ks, v_scale=vs)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {}
    for name, (k, _, _) in caches.items():
        read = 2 * batch * context * KV_HEADS * HEAD_DIM * k.element_size()
        out[name] = {"median_ms": 1e3 * statistics.median(times[name]), "best_ms": 1e3 * min(times[name]),
                     "cpu_ms": 1e3 * statistics.median(cpu[name]), "kv_mib": read / 2**20}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.benches.kv_cache_attention", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch

    from models.kernels import cpu_ops

    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_ops.load() is None:
        raise SystemExit("the C kernels did not build here")
    print(f"C paged decode attention, {HEADS} heads of {HEAD_DIM}, {KV_HEADS} KV heads, context {args.context}, "
          f"{torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds (one layer)")
    print("| batch | KV cache | KV read per call | wall ms median | wall ms best | CPU ms median | "
          "speed vs float32 (best wall) |")
    print("|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch.split(",") if b]:
        res = measure(batch, args.context, args.rounds)
        base = res["float32"]["best_ms"]
        for name, r in res.items():
            print(f"| {batch} | {name} | {r['kv_mib']:.1f} MiB | {r['median_ms']:.2f} | {r['best_ms']:.2f} | "
                  f"{r['cpu_ms']:.2f} | {base / r['best_ms']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
