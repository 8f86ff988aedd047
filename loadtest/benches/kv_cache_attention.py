"""The C paged decode attention (csrc/paged_attention_cpu.c) over a float32, bfloat16 and fp8 KV
cache at a long context, one layer of the 140M benchmark model's shape (8 query heads of 64, 4
KV heads), interleaved call by call in one process; with `--mla`, the C MLA decode kernel
(csrc/mla_decode_cpu.c) over a latent cache of DeepSeek-V3's widths (latent 512, rotary key 64)
with 16 heads instead.

    python -m loadtest.benches.kv_cache_attention [--context 4096] [--batch 1,16] [--rounds 30] [--threads N] [--mla]

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


MLA_HEADS, LATENT, ROPE = 16, 512, 64


def mla_cases(batch: int, context: int, seed: int = 0):
    import torch

    from models.layers.paged import quantize_fp8

    g = torch.Generator().manual_seed(seed)
    nblocks = batch * -(-context // BLOCK)
    lat = torch.randn(nblocks, BLOCK, 1, LATENT, generator=g)
    pe = torch.randn(nblocks, BLOCK, 1, ROPE, generator=g)
    q = (torch.randn(batch, MLA_HEADS, LATENT, generator=g), torch.randn(batch, MLA_HEADS, ROPE, generator=g))
    tables = torch.randperm(nblocks, generator=g).view(batch, -1)
    lens = torch.full((batch,), context, dtype=torch.int64)
    return q, tables, lens, {
        "float32": (lat, pe, 1.0),
        "bfloat16": (lat.bfloat16(), pe.bfloat16(), 1.0),
        "fp8": (quantize_fp8(lat, 0.02), quantize_fp8(pe, 0.02), 0.02),
    }


def measure(batch: int, context: int, rounds: int, mla: bool = False) -> dict[str, dict[str, float]]:
    import torch

    from models.kernels.paged_attention import paged_decode

    if mla:
        (q_lat, q_pe), tables, lens, mcaches = mla_cases(batch, context)

        def call(entry):
            lat, pe, ks = entry
            torch.ops.moe_serve.mla_decode_cpu(q_lat, q_pe, lat, pe, tables, lens, 0.07, ks)

        return _timed(mcaches, call, rounds, lambda e: batch * context * (LATENT + ROPE) * e[0].element_size())
    q, tables, lens, caches = cases(batch, context)
    scale = HEAD_DIM**-0.5

    def attend(entry):
        k, v, (ks, vs) = entry
        paged_decode(q, k, v, tables, lens, scale, "cpu", k_scale=ks, v_scale=vs)

    return _timed(caches, attend, rounds, lambda e: 2 * batch * context * KV_HEADS * HEAD_DIM * e[0].element_size())


def _timed(caches, call, rounds, nbytes) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {name: [] for name in caches}
    cpu: dict[str, list[float]] = {name: [] for name in caches}
    for _ in range(2):  # warm up
        for entry in caches.values():
            call(entry)
    for _ in range(rounds):  # interleaved: each format sees the same machine load
        for name, entry in caches.items():
            t0, c0 = time.perf_counter(), time.process_time()
            call(entry)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    out = {}
    for name, entry in caches.items():
        read = nbytes(entry)
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
    ap.add_argument("--mla", action="store_true", help="the MLA decode kernel over a latent cache instead")
    args = ap.parse_args(argv)

    import torch

    from models.kernels import cpu_ops

    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_ops.load() is None:
        raise SystemExit("the C kernels did not build here")
    what = (f"C MLA decode attention, {MLA_HEADS} heads, latent {LATENT} + rotary key {ROPE}" if args.mla else
            f"C paged decode attention, {HEADS} heads of {HEAD_DIM}, {KV_HEADS} KV heads")
    print(f"{what}, context {args.context}, {torch.get_num_threads()} thread(s), {args.rounds} interleaved rounds "
          "(one layer)")
    print("| batch | KV cache | KV read per call | wall ms median | wall ms best | CPU ms median | "
          "speed vs float32 (best wall) |")
    print("|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batch.split(",") if b]:
        res = measure(batch, args.context, args.rounds, args.mla)
        base = res["float32"]["best_ms"]
        for name, r in res.items():
            print(f"| {batch} | {name} | {r['kv_mib']:.1f} MiB | {r['median_ms']:.2f} | {r['best_ms']:.2f} | "
                  f"{r['cpu_ms']:.2f} | {base / r['best_ms']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
