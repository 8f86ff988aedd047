"""Linear layers on the CPU with their weights pre-packed by oneDNN.

A plain `F.linear` re-packs its weight into the GEMM's blocked layout on every call; for the
decode step's small batches that packing is a large share of the time (measured on the
benchmark CPU, one thread: the LM head [64 x 512] x [512 x 32000] 62.7 -> 37.4 ms, an
expert's gate+up [16 x 512] x [512 x 2048] 1.67 -> 1.31 ms; no gain for the narrow
down-projections, which stay plain). `PackedWeight` keeps a packed copy (extra memory: one
copy of each packed weight) and re-packs when the weight changes (its version counter or
storage moved), so it never goes stale.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=1)
def packing_available() -> bool:
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return (torch.backends.mkldnn.is_available() and ops is not None
                and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))
    except RuntimeError:
        return False


class PackedWeight:
    """A oneDNN-packed copy of a float32 `[out, in]` weight (or of row `index` of a stacked one)."""

    def __init__(self, weight: torch.Tensor, index: int | None = None, batch_hint: int = 64):
        self.weight, self.index, self.batch_hint = weight, index, batch_hint
        self._key: tuple | None = None
        self._packed: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version)
        if key != self._key:
            src = (w if self.index is None else w[self.index]).detach().contiguous()
            self._packed = torch.ops.mkldnn._reorder_linear_weight(src, self.batch_hint)
            self._key = key
        return self._packed

    @property
    def nbytes(self) -> int:
        w = self.weight if self.index is None else self.weight[self.index]
        return w.numel() * w.element_size()


def packed_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ weight.T (+ bias) -> [M, out], as F.linear."""
    if x.shape[0] == 0:
        out_features = weight.weight.shape[-2]
        return x.new_empty(0, out_features)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.get(), bias, "none", [], "")
