"""The quantized CPU GEMM kernels (int8 / int4, csrc/quant_gemm*.h) against float32, by batch rows M.

    python -m loadtest quant-gemm [--rows 1,4,16,64,512] [--rounds 5] [--formats int8,int4]
        [--shapes all] [--threads N] [--baseline REF]

Linear shapes: the 140M benchmark checkpoint's q/k/v (1024 x 512) and an expert's gate/up
(2048 x 512: w13 of one expert), and the 2.4B Mixtral-shaped model's expert gate/up (11264 x 2048,
one expert's w13) and down (2048 x 5632). Experts: the 140M checkpoint's MoE layer (8 experts
top-2, hidden 512, intermediate 1024; `experts`) and the 2.4B model's (hidden 2048, intermediate 5632;
`experts-2.4b`) with M tokens routed at random. Each (shape, M) times, in
one interleaved run (loadtest/harness.py): float32 through torch's F.linear (oneDNN / MKL), the C
panel kernels (linear_cpu / moe_experts_cpu over packed float32 weights), and the quantized
kernels per format; `--baseline REF` also builds the kernels of git REF (e.g. main) into a
second library and times its quantized kernels beside (before/after in one run). The tables give
best-round milliseconds and each quantized kernel's speed relative to the C float32 kernel
(> 1: faster).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from loadtest import output, results
from loadtest.harness import interleave

HEADING = "### Quantized CPU GEMM kernels by batch rows (int8 / int4 vs float32)"
REPO = Path(__file__).resolve().parents[2]
LINEAR = {"140M q/k/v": (1024, 512), "140M LM head": (32000, 512), "140M expert w13": (2048, 512), "2.4B expert w13": (11264, 2048),
          "2.4B expert w2": (2048, 5632)}
EXPERTS = {"experts": (8, 512, 1024, "experts 140M"), "experts-2.4b": (8, 2048, 5632, "experts 2.4B")}  # E, H, I
TOPK = 2
BASE_NS = "moe_serve_qbase"


def build_baseline(ref: str) -> bool:
    """Build git `ref`'s CPU kernels into the namespace BASE_NS and load them; whether they read
    the weights in the kernel order (csrc/quant_gemm.h QGROUP; older kernels read them row-major)."""
    import torch

    from models.kernels import cpu_build

    tmp = Path(tempfile.mkdtemp(prefix="qgemm-base-"))
    csrc = "models/kernels/csrc"
    tar = subprocess.run(["git", "-C", str(REPO), "archive", ref, csrc], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
    saved = cpu_build.CSRC
    cpu_build.CSRC = tmp / csrc
    try:
        path = cpu_build.build(cpu_build.torch_runs_gomp(), BASE_NS, out_dir=tmp)
    finally:
        cpu_build.CSRC = saved
    torch.ops.load_library(str(path))
    return "QGROUP" in (tmp / csrc / "quant_gemm.h").read_text()


def base_args(qw, kernel_order: bool) -> tuple:
    """(q, scales, minimums) of `qw` as the baseline's kernels read them."""
    return (qw.q, qw.scales, qw.mins) if kernel_order else qw.rows()


def rounds_for(work: float, rounds: int) -> int:
    return max(3, min(rounds * 4, int(rounds * 2e9 / max(work, 1.0))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest quant-gemm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4,16,64,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--formats", default="int8,int4")
    ap.add_argument("--shapes", default="all", help="comma-separated linear shape names, 'experts' (140M), 'experts-2.4b', or all")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    ap.add_argument("--baseline", default=None, help="git ref whose quantized kernels run beside (before/after)")
    output.add_args(ap)
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from models.kernels import cpu_ops
    from models.kernels import quant as Q

    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_ops.load() is None:
        raise SystemExit("the C kernels are not available here")
    ops = torch.ops.moe_serve
    base, base_order = None, True
    if args.baseline:
        base_order = build_baseline(args.baseline)
        base = getattr(torch.ops, BASE_NS)
    rows = [int(r) for r in args.rows.split(",") if r]
    formats = [f for f in args.formats.split(",") if f]
    shapes = list(LINEAR) + list(EXPERTS) if args.shapes == "all" else args.shapes.split(",")
    result = results.new_result("quant-gemm", argv, vars(args) | {"threads": torch.get_num_threads(),
                                                                  "isa": Q.isa()[0]},
                                heading=HEADING, packages=("torch",))
    g = torch.Generator().manual_seed(0)
    table = []
    names = ["F.linear", "C float32"] + [f"{f}{s}" for f in formats for s in ((" before", " after") if base else ("",))]
    for shape in shapes:
        if shape in EXPERTS:
            E, H, I, label = EXPERTS[shape]
            w13, w2 = torch.randn(E, 2 * I, H, generator=g) * 0.05, torch.randn(E, H, I, generator=g) * 0.05
            p13, p2 = ops.moe_pack_cpu(w13, w2)
            qws = {f: (Q.QuantWeight.of(w13, f), Q.QuantWeight.of(w2, f)) for f in formats}
            for M in rows:
                x = torch.randn(M, H, generator=g)
                wt, ids = torch.softmax(torch.randn(M, E, generator=g), -1).topk(TOPK, dim=-1)
                v = {"C float32": lambda: ops.moe_experts_cpu(x, ids, wt, p13, p2)}
                for f, (a, b) in qws.items():
                    args13 = (x, ids, wt, a.code, a.q, a.scales, a.mins, b.q, b.scales, b.mins)
                    v[f + (" after" if base else "")] = lambda args13=args13: ops.quant_moe_cpu(*args13)
                    if base:
                        b13 = (x, ids, wt, a.code, *base_args(a, base_order), *base_args(b, base_order))
                        v[f + " before"] = lambda b13=b13: base.quant_moe_cpu(*b13)
                t = interleave(v, rounds=rounds_for(M * TOPK * 3 * H * I * 2, args.rounds), warmup=1)
                table.append((label, M, {k: s.summary()["wall_best_s"] for k, s in t.items()}))
                print(table[-1], flush=True)
            continue
        N, K = LINEAR[shape]
        w = torch.randn(N, K, generator=g) * 0.05
        pw = ops.linear_pack_cpu(w)
        qws = {f: Q.QuantWeight.of(w, f) for f in formats}
        for M in rows:
            x = torch.randn(M, K, generator=g)
            v = {"F.linear": lambda: F.linear(x, w), "C float32": lambda: ops.linear_cpu(x, pw, None)}
            for f, qw in qws.items():
                a = (x, qw.q, qw.scales, qw.mins, qw.code, None)
                v[f + (" after" if base else "")] = lambda a=a: ops.quant_linear_cpu(*a)
                if base:
                    b = (x, *base_args(qw, base_order), qw.code, None)
                    v[f + " before"] = lambda b=b: base.quant_linear_cpu(*b)
            t = interleave(v, rounds=rounds_for(M * N * K * 2, args.rounds), warmup=1)
            table.append((shape, M, {k: s.summary()["wall_best_s"] for k, s in t.items()}))
            print(table[-1], flush=True)
    col = results.column
    cols = [col("shape"), col("M", "d")] + [col(f"{n} ms", ".3f") for n in names]
    qnames = [n for n in names if n not in ("F.linear", "C float32")]
    cols += [col(f"{n} vs C float32", ".2f") for n in qnames]
    out_rows = []
    for shape, M, best in table:
        ref = best["C float32"]
        out_rows.append([shape, M] + [best[n] * 1e3 if n in best else None for n in names]
                        + [ref / best[n] for n in qnames])
    result["measurements"]["rows"] = [{"shape": s, "M": M, "best_s": b} for s, M, b in table]
    result["summary"]["blocks"] = [
        results.text(f"Best-round times of one call, {torch.get_num_threads()} threads, quantized kernels at level "
                     f"{Q.isa()[0]}; ratios are C float32 time / quantized time (> 1: the quantized kernel is "
                     "faster)." + (f" 'before': the kernels of git {args.baseline}." if base else "")),
        results.table(None, cols, out_rows),
    ]
    output.finish(result, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
