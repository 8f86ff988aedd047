"""What a user may ask of the kernels: the choices behind `--attention-backend`, `--moe-backend`,
`--cpu-linear-layout`, `--fused-ops` and `--cpu-kernels` (server/config.py makes them flags,
`MOE_SERVE_*` variables and Helm values). Torch-free, so that the config and the CLI import it
cheaply; `models/kernels/plan.py` resolves "auto" and checks what a forced choice needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

AttentionChoice = Literal["auto", "triton", "cpu", "reference"]
MoEChoice = Literal["auto", "triton", "grouped_mm", "cpu", "loop", "reference"]
# "auto": the best packed layout built here while the packed copies stay within the budget;
# "packed": the best layout whatever the size; "panels" / "onednn": that layout; "plain": none
LinearChoice = Literal["auto", "packed", "panels", "onednn", "plain"]
FusedOpsChoice = Literal["auto", "triton", "cpu", "torch"]
# the C kernels' threads: PyTorch's OpenMP pool ("openmp") or their own ("pthreads"); "auto"
# takes the pool where PyTorch runs libgomp; "off" never builds them (the PyTorch paths serve)
CpuKernelsChoice = Literal["auto", "openmp", "pthreads", "off"]


@dataclass(frozen=True)
class KernelFlags:
    attention: AttentionChoice = "auto"
    moe: MoEChoice = "auto"
    cpu_linear: LinearChoice = "auto"
    fused_ops: FusedOpsChoice = "auto"
    cpu_kernels: CpuKernelsChoice = "auto"

    def __post_init__(self) -> None:
        for name, kind in (("attention", AttentionChoice), ("moe", MoEChoice), ("cpu_linear", LinearChoice),
                           ("fused_ops", FusedOpsChoice), ("cpu_kernels", CpuKernelsChoice)):
            value, allowed = getattr(self, name), get_args(kind)
            if value not in allowed:
                raise ValueError(f"{name} kernel choice must be one of {', '.join(allowed)}, not {value!r}")
