"""The CPU experts kernel (csrc/moe_cpu.c): one call per MoE layer for float32 on AVX2 + FMA.

Decode on the CPU is bound by reading the experts' weights. The kernel reads each active
expert's gate+up and down weights once per step, as sequential runs of a packed layout
(`PackedExperts`: [E, I/16, 2, H, 16] and [E, H/16, I, 16]), with SiLU-and-mul fused into the
gate+up pass; the pairs are grouped by expert inside the call (no per-expert Python).
Measured on the benchmark CPU, one thread, 8 layers of 8 experts (H 512, I 1024) streamed
from memory: see docs/benchmarks.md ("CPU experts kernel"). The packed copy costs one extra
copy of the experts' weights; it is rebuilt when the weights change (version counter or
storage moved), so it never goes stale.
"""

from __future__ import annotations

import functools

import torch

from models.kernels import cpu_build

PANEL = 16  # the kernels' panel width (NR in csrc/panel_gemm.h): H, I and linear outputs are multiples


@functools.lru_cache(maxsize=1)
def available() -> bool:
    lib = cpu_build.load()
    return lib is not None and bool(lib.moe_cpu_available())


def supports(w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether the kernel serves experts of these shapes ([E, 2I, H], [E, H, I]) here."""
    if w13.device.type != "cpu" or w13.dtype != torch.float32 or w2.dtype != torch.float32:
        return False
    E, two_i, H = w13.shape
    return (two_i % (2 * PANEL) == 0 and H % PANEL == 0 and tuple(w2.shape) == (E, H, two_i // 2)
            and available())


def version(t: torch.Tensor) -> int:
    """The tensor's version counter; inference tensors have none (they cannot change in place
    outside inference mode): 0."""
    try:
        return t._version
    except RuntimeError:
        return 0


class PackedExperts:
    """The kernel's packed copy of an MoE layer's w13 [E, 2I, H] and w2 [E, H, I]."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        self.w13, self.w2 = w13, w2
        self._key: tuple | None = None
        self._packed: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        key = (self.w13.data_ptr(), version(self.w13), self.w2.data_ptr(), version(self.w2))
        if key != self._key:
            E, two_i, H = self.w13.shape
            w13, w2 = self.w13.detach().contiguous(), self.w2.detach().contiguous()
            p13, p2 = torch.empty_like(w13), torch.empty_like(w2)
            cpu_build.load().moe_pack_f32(w13.data_ptr(), w2.data_ptr(), p13.data_ptr(), p2.data_ptr(),
                                          E, H, two_i // 2)
            self._packed, self._key = (p13, p2), key
        return self._packed


# below this many token-expert pairs one thread reads the weights as fast as several (measured
# on the benchmark CPU), and starting threads would only add their cost
MIN_PAIRS_PER_THREADING = 32


def threads_for(pairs: int) -> int:
    return torch.get_num_threads() if pairs >= MIN_PAIRS_PER_THREADING else 1


def moe_cpu(x: torch.Tensor, packed: PackedExperts, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
    """sum_k topk_w[t, k] * Expert_{topk_ids[t, k]}(x[t]) -> [T, H], as `fused_experts`."""
    T, k = topk_ids.shape
    E, two_i, H = packed.w13.shape
    x = x.contiguous()
    out = torch.empty(T, H, dtype=torch.float32)
    if T == 0:
        return out
    p13, p2 = packed.get()
    ids = topk_ids.to(torch.int64).contiguous()
    w = topk_w.to(torch.float32).contiguous()
    rc = cpu_build.load().moe_fused_f32(x.data_ptr(), ids.data_ptr(), w.data_ptr(), p13.data_ptr(), p2.data_ptr(),
                                        out.data_ptr(), T, k, E, H, two_i // 2, threads_for(T * k))
    if rc == 2:
        raise IndexError(f"expert id out of range [0, {E}) in topk_ids")
    if rc != 0:
        raise RuntimeError(f"moe_fused_f32 failed (code {rc})")
    return out
