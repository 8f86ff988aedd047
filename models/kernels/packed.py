"""Weights kept in a kernel's packed layout, for the CPU's decode GEMMs.

Decode on the CPU is bound by reading weights; a packed copy is streamed once per call.
- `PackedWeight`: one `[out, in]` weight (or row `index` of a stacked one) in the layout the
  plan chose: the C kernel's panels (`linear_cpu`: [out/16, in, 16], each panel one sequential
  stream) or oneDNN's blocked layout; `packed_linear` is `F.linear` over it.
- `PackedExperts`: an MoE layer's w13 [E, 2I, H] and w2 [E, H, I] in the C experts kernel's
  panels (`moe_experts_cpu`); `moe_cpu` runs the layer's experts over them.
- `QuantizedLinear`, `QuantizedExperts`: weights kept only quantized (int8 / int4,
  models/kernels/quant.py; `--quantization`): no float weight beside them, nothing to remake.
A copy costs one more copy of the weight. It is made on first use and made again when the
weight changes (its version counter, or its storage moved), so it never goes stale; inside a
`torch.compile` trace the copy is taken as it is (make it before compiling: one eager call).
"""

from __future__ import annotations

import torch

from models.kernels.plan import LinearLayout
from models.kernels.quant import QuantWeight, quant_linear, quant_moe


def version(t: torch.Tensor) -> int:
    """The tensor's version counter; inference tensors have none (they cannot change in place
    outside inference mode): 0."""
    try:
        return t._version
    except RuntimeError:
        return 0


class _Packed:
    """A packed copy of `sources`, remade when any of them changes."""

    def __init__(self, *sources: torch.Tensor):
        self.sources = sources
        self._key: tuple | None = None
        self._packed = None

    def _pack(self):
        raise NotImplementedError

    def get(self):
        if not torch.compiler.is_compiling():
            key = tuple((s.data_ptr(), version(s)) for s in self.sources)
            if key != self._key:
                self._packed, self._key = self._pack(), key
        return self._packed


class PackedWeight(_Packed):
    """A packed copy of a float32 `[out, in]` weight (or of row `index` of a stacked one)."""

    def __init__(self, weight: torch.Tensor, layout: LinearLayout, index: int | None = None, batch_hint: int = 64):
        if layout == LinearLayout.PLAIN:
            raise ValueError("a plain weight needs no packed copy")
        super().__init__(weight)
        self.weight, self.layout, self.index, self.batch_hint = weight, layout, index, batch_hint

    def _pack(self) -> torch.Tensor:
        src = (self.weight if self.index is None else self.weight[self.index]).detach()
        if self.layout == LinearLayout.PANELS:
            return torch.ops.moe_serve.linear_pack_cpu(src)
        return torch.ops.mkldnn._reorder_linear_weight(src.contiguous(), self.batch_hint)


class QuantizedLinear(PackedWeight):
    """A linear's weight kept only quantized (the model's parameter is a shape on the meta device)."""

    def __init__(self, quant: QuantWeight):  # no float source to pack from
        self.quant, self.layout, self.index = quant, LinearLayout.QUANTIZED, None

    def get(self):
        return self.quant


def packed_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ weight.T (+ bias) -> [M, out], as F.linear."""
    if isinstance(weight, QuantizedLinear):
        return quant_linear(x, weight.quant, bias)
    if weight.layout == LinearLayout.ONEDNN:
        if x.shape[0] == 0:
            return x.new_empty(0, weight.weight.shape[-2])
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.get(), bias, "none", [], "")
    return torch.ops.moe_serve.linear_cpu(x, weight.get(), bias)


class PackedExperts(_Packed):
    """The C experts kernel's packed copy of an MoE layer's w13 [E, 2I, H] and w2 [E, H, I]."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        super().__init__(w13, w2)
        self.w13, self.w2 = w13, w2

    def _pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.moe_serve.moe_pack_cpu(self.w13.detach(), self.w2.detach())


class QuantizedExperts(PackedExperts):
    """An MoE layer's w13 [E, 2I, H] and w2 [E, H, I] kept only quantized, for the C experts kernel."""

    def __init__(self, w13: QuantWeight, w2: QuantWeight):  # no float source to pack from
        self.qw13, self.qw2 = w13, w2

    def get(self):
        return self.qw13, self.qw2


def moe_cpu(x: torch.Tensor, packed: PackedExperts, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> torch.Tensor:
    """sum_k topk_w[t, k] * Expert_{topk_ids[t, k]}(x[t]) -> [T, H], as `fused_experts`."""
    if isinstance(packed, QuantizedExperts):
        return quant_moe(x, topk_ids, topk_w, packed.qw13, packed.qw2)
    p13, p2 = packed.get()
    return torch.ops.moe_serve.moe_experts_cpu(x, topk_ids, topk_w, p13, p2)
