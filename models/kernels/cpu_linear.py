"""Linear layers on the CPU with their weights pre-packed.

Two layouts, one copy per weight:
- "panels" (float32, AVX2 + FMA, out_features a multiple of 16): the C kernel of
  csrc/linear_cpu.c, weight packed as [out/16, in, 16] panels that each call streams once.
  It reads the weight near memory speed at decode's small batches, where oneDNN does not
  (measured on the benchmark CPU, one thread, weights streamed from memory: LM head
  [32000 x 512] at 1 / 4 / 16 / 64 rows 6.9 / 8.1 / 13.9 / 38.2 ms against oneDNN-packed
  10.9 / 12.2 / 18.3 / 40.1 ms; within ~10% of oneDNN at 256-2048 rows on two threads).
- "onednn": oneDNN's blocked layout (`torch.ops.mkldnn`), where the C kernel is not built.
A plain `F.linear` re-packs its weight on every call. `PackedWeight` keeps the packed copy
(extra memory: one copy of each packed weight) and re-packs when the weight changes (its
version counter or storage moved), so it never goes stale.
"""

from __future__ import annotations

import functools

import torch

from models.kernels import cpu_build, cpu_moe
from models.kernels.cpu_moe import PANEL, version

# below this many multiply-adds one thread is faster than starting others
MIN_MACS_PER_THREADING = 1 << 24


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))
    except RuntimeError:
        return False


def panels_available() -> bool:
    return cpu_moe.available()  # the same library and CPU features


def packing_available() -> bool:
    return panels_available() or onednn_available()


class PackedWeight:
    """A packed copy of a float32 `[out, in]` weight (or of row `index` of a stacked one)."""

    def __init__(self, weight: torch.Tensor, index: int | None = None, batch_hint: int = 64,
                 layout: str | None = None):
        """`layout`: "panels" or "onednn"; None picks panels where the kernel serves the shape."""
        self.weight, self.index, self.batch_hint = weight, index, batch_hint
        fits = panels_available() and weight.shape[-2] % PANEL == 0
        if layout == "panels" and not fits:
            layout = None  # not built here or not a multiple of the panel width
        if layout == "onednn" and not onednn_available():
            layout = None
        self.layout = layout or ("panels" if fits else "onednn")
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), version(w))
        if key != self._key:
            src = (w if self.index is None else w[self.index]).detach().contiguous()
            if self.layout == "panels":
                packed = torch.empty_like(src)
                cpu_build.load().linear_pack_f32(src.data_ptr(), packed.data_ptr(), *src.shape)
                self._packed = packed
            else:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(src, self.batch_hint)
            self._key = key
        return self._packed

    @property
    def nbytes(self) -> int:
        w = self.weight if self.index is None else self.weight[self.index]
        return w.numel() * w.element_size()


def packed_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ weight.T (+ bias) -> [M, out], as F.linear."""
    out_features, in_features = weight.weight.shape[-2:]
    M = x.shape[0]
    if M == 0:
        return x.new_empty(0, out_features)
    if weight.layout == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.get(), bias, "none", [], "")
    packed = weight.get()
    x = x.contiguous()
    y = torch.empty(M, out_features, dtype=torch.float32)
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()
    threads = torch.get_num_threads() if M * out_features * in_features >= MIN_MACS_PER_THREADING else 1
    rc = cpu_build.load().linear_f32(x.data_ptr(), packed.data_ptr(), None if b is None else b.data_ptr(),
                                     y.data_ptr(), M, out_features, in_features, in_features, threads)
    if rc != 0:
        raise RuntimeError(f"linear_f32 failed (code {rc})")
    return y
