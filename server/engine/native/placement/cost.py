"""Host-tier cost model: compute a CPU-resident expert on the CPU, or copy it to the GPU?

For one expert with n tokens in a pass (H hidden, I intermediate, b bytes per weight):
    weights      = 3 * H * I * b bytes
    flops        = 6 * H * I * n
    cpu(n)       = max(weights / dram_bw, flops / cpu_flops) + 2 * n * H * act_bytes / link_bw
    fetch(n)     = weights / link_bw (+ GPU compute, negligible next to the copy)
The executor copies an expert in when n >= the smallest n with cpu(n) >= fetch(n)
(`fetch_threshold`). `measure()` times the CPU side on this machine and the host->device link
when CUDA is present; numbers it cannot measure are the stated defaults (estimates).

Run `python -m server.engine.native.placement.cost --hidden 4096 --inter 14336` to print the measurement.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ASSUMED_LINK_BYTES_PER_S = 25e9  # PCIe 4.0 x16, pinned host->device, achieved (estimate)


@dataclass
class HostCost:
    cpu_flops: float  # FLOP/s, expert-shaped SwiGLU on the CPU
    dram_bytes_per_s: float  # streaming read bandwidth (weights from host memory)
    link_bytes_per_s: float  # host -> accelerator copy bandwidth
    link_measured: bool

    def cpu_seconds(self, n: int, hidden: int, inter: int, wbytes: float, abytes: float,
                    cpu_wbytes: float | None = None) -> float:
        """`cpu_wbytes`: bytes per weight the CPU reads (the CPU tier's format), default `wbytes`."""
        weights = 3 * hidden * inter * (wbytes if cpu_wbytes is None else cpu_wbytes)
        compute = max(weights / self.dram_bytes_per_s, 6 * hidden * inter * n / self.cpu_flops)
        return compute + 2 * n * hidden * abytes / self.link_bytes_per_s

    def fetch_seconds(self, hidden: int, inter: int, wbytes: float) -> float:
        return 3 * hidden * inter * wbytes / self.link_bytes_per_s

    def fetch_threshold(self, hidden: int, inter: int, wbytes: float, abytes: float | None = None,
                        limit: int = 1 << 16, cpu_wbytes: float | None = None) -> int:
        """Smallest token count at which copying the expert in (`wbytes` per weight) beats computing
        it on the CPU (reading `cpu_wbytes` per weight: the CPU tier's format; default `wbytes`)."""
        abytes = abytes or wbytes
        fetch = self.fetch_seconds(hidden, inter, wbytes)
        n = 1
        while n < limit and self.cpu_seconds(n, hidden, inter, wbytes, abytes, cpu_wbytes) < fetch:
            n *= 2
        lo, hi = max(1, n // 2), n  # binary search in (lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if self.cpu_seconds(mid, hidden, inter, wbytes, abytes, cpu_wbytes) >= fetch:
                hi = mid
            else:
                lo = mid + 1
        return lo


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu_flops(hidden: int, inter: int, dtype: torch.dtype, tokens: int = 128, reps: int = 3) -> float:
    w13 = torch.randn(2 * inter, hidden, dtype=dtype) * 0.02
    w2 = torch.randn(hidden, inter, dtype=dtype) * 0.02
    x = torch.randn(tokens, hidden, dtype=dtype)

    def expert():
        h = F.linear(x, w13)
        F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2)

    return 6 * hidden * inter * tokens / _best(expert, reps)


def measure_dram_bandwidth(nbytes: int = 256 * 2**20, reps: int = 3) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / _best(lambda: src.sum(), reps)  # one streaming read


def measure_link_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, reps: int = 3) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def copy():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)

    return nbytes / _best(copy, reps)


def measure(hidden: int, inter: int, dtype: torch.dtype, accel: torch.device | None = None) -> HostCost:
    """Measure the CPU now; the link too when `accel` is a CUDA device, else assume PCIe 4.0 x16."""
    cpu = measure_cpu_flops(hidden, inter, dtype)
    dram = measure_dram_bandwidth()
    if accel is not None and accel.type == "cuda":
        return HostCost(cpu, dram, measure_link_bandwidth(accel), True)
    return HostCost(cpu, dram, ASSUMED_LINK_BYTES_PER_S, False)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--weight-bytes", type=int, default=2, help="bytes per weight on the GPU side (bf16: 2)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--assume-cpu-gflops", type=float, help="skip measuring: CPU expert throughput")
    ap.add_argument("--assume-dram-gbs", type=float, help="skip measuring: host memory read bandwidth")
    ap.add_argument("--assume-link-gbs", type=float, help="host->device bandwidth instead of measured/25")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    accel = torch.device("cuda") if torch.cuda.is_available() else None
    if args.assume_cpu_gflops and args.assume_dram_gbs:
        cost = HostCost(args.assume_cpu_gflops * 1e9, args.assume_dram_gbs * 1e9, ASSUMED_LINK_BYTES_PER_S, False)
    else:
        cost = measure(args.hidden, args.inter, dtype, accel)
        if args.assume_cpu_gflops:
            cost.cpu_flops = args.assume_cpu_gflops * 1e9
        if args.assume_dram_gbs:
            cost.dram_bytes_per_s = args.assume_dram_gbs * 1e9
    if args.assume_link_gbs:
        cost.link_bytes_per_s, cost.link_measured = args.assume_link_gbs * 1e9, False
    H, I, b = args.hidden, args.inter, args.weight_bytes
    src = "assumed" if args.assume_cpu_gflops else f"measured, {torch.get_num_threads()} threads"
    src_mem = "assumed" if args.assume_dram_gbs else "measured"
    print(f"CPU {args.dtype} SwiGLU expert: {cost.cpu_flops / 1e9:.1f} GFLOP/s ({src}); "
          f"DRAM read {cost.dram_bytes_per_s / 1e9:.1f} GB/s ({src_mem}); host->device link "
          f"{cost.link_bytes_per_s / 1e9:.1f} GB/s ({'measured' if cost.link_measured else 'assumed'})")
    print(f"expert H={H} I={I}: {3 * H * I * b / 2**20:.0f} MiB at {b} B/weight; "
          f"copy-in {cost.fetch_seconds(H, I, b) * 1e3:.2f} ms")
    for n in (1, 4, 16, 64, 256):
        print(f"  tokens {n:4d}: CPU {cost.cpu_seconds(n, H, I, b, b) * 1e3:8.2f} ms   copy-in "
              f"{cost.fetch_seconds(H, I, b) * 1e3:.2f} ms")
    print(f"fetch threshold: {cost.fetch_threshold(H, I, b)} tokens per expert per pass")


if __name__ == "__main__":
    main()
