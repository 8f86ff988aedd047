"""Compile the quantized MoE / linear Triton kernels (models/kernels/triton_qmoe.py) for NVIDIA
targets without a GPU: Triton's front end, its NVIDIA passes and the bundled ptxas, at the tile
configs `tile_config` picks on CUDA (decode to prefill). Catches what the interpreter cannot (types
the target lacks, shared memory over the limit, a constexpr path that does not lower).

    .venv/bin/python scripts/compile_qmoe_kernels.py [90 89 80]   # compute capabilities (default 90)

Prints one line per (config, format, W8A8 or not, kernel): shared memory, wgmma or mma; exits 1 on a
failure. The fp8 dots (W8A8) exist from sm89; below, the fp8 formats compile as W8A16 only.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from models.kernels import triton_qmoe as q  # noqa: E402
from models.kernels.triton_moe import tile_config  # noqa: E402

FORMATS = {  # name: FMT, SCALE, data pointer type (W8A8), scale type, zero type
    "fp8_block": (0, 1, "*fp8e4nv", "*fp32", None),
    "fp8_channel": (0, 0, "*fp8e4nv", "*fp32", None),
    "int8_channel": (1, 0, "*i8", "*fp32", None),
    "mxfp4": (2, 2, "*u8", "*u8", None),
    "int4_zp": (3, 2, "*u8", "*bf16", "*u8"),
    "int4_sym": (3, 2, "*u8", "*fp16", None),
}
SMEM_LIMIT = {90: 232448, 89: 101376, 80: 166912}


def signature(fn, ptrs: dict, consts: dict) -> dict:
    return {n: "constexpr" if n in consts else ptrs.get(n, "*i64") if n.endswith("_ptr")
            else "fp32" if n in ("limit", "alpha") else "i32" for n in fn.arg_names}


def main(caps: list[int]) -> int:
    fails = 0
    for cap in caps:
        limit = SMEM_LIMIT.get(cap, 101376)
        for rows in (1, 50, 300, 1000):  # rows per expert: the decode, mid and prefill tiles
            cfg = tile_config(rows * 8, 8, "cuda", 2)
            launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            cfg.pop("BLOCK_N_DOWN")
            for name, (FMT, SCALE, dt, st, zt) in FORMATS.items():
                for a8 in ((True, False) if FMT == 0 and cap >= 89 else (False,)):
                    act = "*fp8e4nv" if a8 else "*bf16"
                    base = dict(cfg, FMT=FMT, SCALE=SCALE, A8=a8, PRECISION="tf32")
                    if zt is None:
                        base["z_ptr"] = None
                    ptrs = dict(d_ptr=dt if a8 or FMT else "*u8", x_ptr=act, xs_ptr="*fp32", hs_ptr="*fp32", s_ptr=st,
                                z_ptr=zt or "*u8", b_ptr="*bf16", y_ptr="*bf16", weights_ptr="*fp32")
                    jobs = [("gate_up", q._qgate_up_kernel, dict(base, TOP_K=8, HAS_BIAS=True, CLAMP=FMT == 2,
                                                                 SCALE_INPUT=False), dict(ptrs, h_ptr="*bf16")),
                            ("down", q._qdown_kernel, dict(base, HAS_BIAS=False, SCALE_INPUT=False),
                             dict(ptrs, h_ptr=act)),
                            ("linear", q._qlinear_kernel, dict(base, HAS_BIAS=True), ptrs)]
                    for kname, fn, consts, p in jobs:
                        t = time.time()
                        try:
                            k = triton.compile(ASTSource(fn, signature(fn, p, consts), constexprs=consts),
                                               target=GPUTarget("cuda", cap, 32), options=launch)
                        except Exception as e:  # noqa: BLE001
                            fails += 1
                            print(f"sm{cap} rows/E {rows} {name} A8={a8} {kname}: FAILED {str(e)[:800]}", flush=True)
                            continue
                        smem = k.metadata.shared
                        fails += smem > limit
                        print(f"sm{cap} rows/E {rows:4d} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} {name:12s} "
                              f"A8={a8!s:5s} {kname:7s} smem {smem:6d}{' OVER' if smem > limit else ''} "
                              f"{'wgmma' if 'wgmma' in k.asm['ptx'] else 'mma'} {time.time() - t:.1f}s", flush=True)
        if cap >= 89:
            triton.compile(ASTSource(q._quant_fp8_kernel, signature(q._quant_fp8_kernel, dict(
                x_ptr="*bf16", q_ptr="*fp8e4nv", s_ptr="*fp32"), dict(BLOCK=1024)), constexprs=dict(BLOCK=1024)),
                target=GPUTarget("cuda", cap, 32), options=dict(num_warps=4))
            print(f"sm{cap} activation quantization kernel: ok")
    print(f"{fails} failures")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main([int(c) for c in sys.argv[1:]] or [90]))
