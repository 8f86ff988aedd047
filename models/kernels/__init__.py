"""Kernels for the hot paths, each with a pure-PyTorch reference the tests compare against.

- `fused_moe`: the experts of an MoE layer. CUDA: a Triton grouped GEMM in the style of
  vLLM's `fused_moe` (pairs aligned to the block size on the device, gate+up with SiLU-and-mul
  fused, then down with the routing weight), or `torch._grouped_mm` (Hopper); CPU: a C kernel
  for decode-sized batches (`cpu_moe`: packed weights read once per step, SiLU-and-mul fused),
  one matmul per active expert for larger ones. None of the CUDA paths reads anything back to
  the host.
- `paged_attention`: decode attention reading the KV blocks in place (Triton on CUDA, a C
  kernel on CPU); the reference gathers each sequence's blocks.
- `cpu_linear`: packed weights for the CPU's decode GEMMs (LM head, q/k/v, o, experts'
  gate+up).
- `triton_ops`: small fused ops on CUDA (RMSNorm with the residual add; q/k norm + rotary +
  KV-cache store), the layers' PyTorch code being their reference.

`KernelConfig` names the backend per op; "auto" picks per device and dtype (see
`attention_backend` / `moe_backend`). A layer that a kernel does not serve (an attention
variant, experts on other devices) keeps the reference path: the layers decide that.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

ATTENTION_BACKENDS = ("auto", "triton", "cpu", "reference")
MOE_BACKENDS = ("auto", "triton", "grouped_mm", "cpu", "loop", "reference")
FUSED_OPS = ("auto", "triton", "torch")
CPU_LINEAR = ("auto", "packed", "panels", "onednn", "plain")
PACKED_BYTES_AUTO = 2**30  # "auto" packs CPU weights while the extra copies stay under this
# backends that never read a device value back to the host (CUDA-graph capturable)
SYNC_FREE_BACKENDS = frozenset({"triton", "grouped_mm", "cpu"})


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm runs bf16 on Hopper (sm90) and newer."""
    return (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(device)[0] >= 9)


@dataclass(frozen=True)
class KernelConfig:
    attention: str = "auto"  # auto | triton | cpu | reference
    moe: str = "auto"  # auto | triton | grouped_mm | cpu | loop | reference
    fused_ops: str = "auto"  # auto | triton | torch: the small fused ops of triton_ops
    # auto | packed | panels | onednn | plain: packed CPU weights (cpu_linear.py); "auto" packs
    # within PACKED_BYTES_AUTO, "packed" always; both in the best layout built here
    cpu_linear: str = "auto"

    def __post_init__(self) -> None:
        if self.cpu_linear not in CPU_LINEAR:
            raise ValueError(f"cpu_linear must be one of {CPU_LINEAR}, not {self.cpu_linear!r}")
        if self.fused_ops not in FUSED_OPS:
            raise ValueError(f"fused_ops must be one of {FUSED_OPS}, not {self.fused_ops!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention kernel must be one of {ATTENTION_BACKENDS}, not {self.attention!r}")
        if self.moe not in MOE_BACKENDS:
            raise ValueError(f"moe kernel must be one of {MOE_BACKENDS}, not {self.moe!r}")

    def attention_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        if self.attention != "auto":
            return self.attention
        if device.type == "cuda":
            return "triton" if triton_available() else "reference"
        from models.kernels import cpu_build

        return "cpu" if dtype == torch.float32 and cpu_build.load() is not None else "reference"

    def use_fused_ops(self, device: torch.device) -> bool:
        if self.fused_ops != "auto":
            return self.fused_ops == "triton"
        return device.type == "cuda" and triton_available()

    def pack_cpu_weights(self, device: torch.device, dtype: torch.dtype, extra_bytes: int) -> bool:
        """Whether to keep oneDNN-packed copies of the decode-heavy weights (`extra_bytes` of them)."""
        from models.kernels.cpu_linear import packing_available

        if self.cpu_linear == "plain" or device.type != "cpu" or dtype != torch.float32 or not packing_available():
            return False
        return self.cpu_linear != "auto" or extra_bytes <= PACKED_BYTES_AUTO

    def cpu_linear_layout(self) -> str | None:
        """The packed layout asked for ("panels" | "onednn"), None for the best one built here."""
        return self.cpu_linear if self.cpu_linear in ("panels", "onednn") else None

    def moe_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        if self.moe != "auto":
            return self.moe
        if device.type == "cuda":
            if triton_available():
                return "triton"
            return "grouped_mm" if grouped_mm_available(device, dtype) else "reference"
        from models.kernels import cpu_moe

        return "cpu" if dtype == torch.float32 and cpu_moe.available() else "loop"
