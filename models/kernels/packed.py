"""Weights kept in a kernel's packed layout, for the CPU's decode GEMMs.

Decode on the CPU is bound by reading weights; a packed copy is streamed once per call.
- `PackedWeight`: one `[out, in]` weight (or row `index` of a stacked one) in the layout the
  plan chose: the C kernel's panels (`linear_cpu`: [out/16, in, 16], each panel one sequential
  stream) or oneDNN's blocked layout; `packed_linear` is `F.linear` over it.
- `PackedExperts`: an MoE layer's w13 [E, 2I, H] and w2 [E, H, I] in the C experts kernel's
  panels (`moe_experts_cpu`); `moe_cpu` runs the layer's experts over them.
- `Bf16Experts`: an MoE layer's bf16 stacks as they are, for the C bf16 experts kernel (the
  CPU expert tier's bf16 format: no copy of a bf16 model's weights).
- `QuantizedLinear`, `QuantizedExperts`: weights kept only quantized (int8 / int4,
  models/kernels/quant.py; `--quantization`): no float weight beside them, nothing to remake;
- `QTensorLinear`, `QTensorExperts`: weights kept in a checkpoint's format (FP8, MXFP4, ...:
  `models.quant.weights.QParam`), run by `models.quant.ops` (Triton on CUDA, the torch reference
  on the CPU) on any device.
A copy costs one more copy of the weight. It is made on first use and made again when the
weight changes (its version counter, or its storage moved), so it never goes stale; inside a
`torch.compile` trace the copy is taken as it is (make it before compiling: one eager call).
"""

from __future__ import annotations

from typing import Protocol

import torch

from models.kernels.plan import LinearLayout
from models.kernels.quant import QuantWeight, quant_linear, quant_moe


class ExpertVariantLike(Protocol):
    """What `moe_cpu` reads of a `fused_moe.ExpertVariant` (not imported: fused_moe imports this module)."""

    @property
    def limit(self) -> float | None: ...

    @property
    def alpha(self) -> float: ...

    @property
    def weight_on_input(self) -> bool: ...


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


class QTensorLinear(PackedWeight):
    """A linear's weight kept in a checkpoint's quantized format (a `QParam`; the model's parameter
    is a shape on the meta device)."""

    def __init__(self, param: QParamLike, triton: bool | None = None, cpu: bool | None = None):
        self.param, self.layout, self.index = param, LinearLayout.QUANTIZED, None
        self.triton = triton  # the Triton kernel (None: on CUDA tensors; the plan sets it)
        self.cpu = cpu  # on the CPU: the C fp8 kernel where it serves (None/True) or the torch reference (False)

    def get(self):
        return self.param.q


class QParamLike(Protocol):
    """What the model's packed holders read of a `models.quant.weights.QParam`."""

    @property
    def q(self): ...

    @property
    def bias(self) -> torch.Tensor | None: ...


def packed_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, in] @ weight.T (+ bias) -> [M, out], as F.linear."""
    if isinstance(weight, QTensorLinear):
        from models.quant.ops import qlinear

        return qlinear(x, weight.param.q, bias, triton=weight.triton, cpu=weight.cpu)
    if isinstance(weight, QuantizedLinear):
        return quant_linear(x, weight.quant, bias)
    if weight.layout == LinearLayout.ONEDNN:
        if x.shape[0] == 0:
            return x.new_empty(0, weight.weight.shape[-2])
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.get(), bias, "none", [], "")
    return torch.ops.moe_serve.linear_cpu(x, weight.get(), bias)


class PackedExperts(_Packed):
    """The C experts kernel's packed copy of an MoE layer's w13 [E, 2I, H] and w2 [E, H, I]. With
    `bias` (gpt-oss: the stacks carry the biases as one more last column, w13 [E, 2I, H + 1] and
    w2 [E, H, I + 1]) the weights are packed without it and the biases kept apart ([E, 2I], [E, H])."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, bias: bool = False):
        super().__init__(w13, w2)
        self.w13, self.w2, self.bias = w13, w2, bias

    def _pack(self) -> tuple[torch.Tensor, ...]:
        w13, w2 = self.w13.detach(), self.w2.detach()
        if not self.bias:
            return torch.ops.moe_serve.moe_pack_cpu(w13, w2)
        H, inter = w13.shape[2] - 1, w2.shape[2] - 1
        p13, p2 = torch.ops.moe_serve.moe_pack_cpu(w13[..., :H], w2[..., :inter])
        return p13, p2, w13[..., H].contiguous(), w2[..., inter].contiguous()


class QuantizedExperts(PackedExperts):
    """An MoE layer's w13 [E, 2I, H] and w2 [E, H, I] kept only quantized, for the C experts kernel
    (plain SwiGLU experts: the plan quantizes no family variant)."""

    def __init__(self, w13: QuantWeight, w2: QuantWeight):  # no float source to pack from
        self.qw13, self.qw2 = w13, w2

    def get(self):
        return self.qw13, self.qw2


class Bf16Experts(PackedExperts):
    """An MoE layer's w13 [E, 2I, H] and w2 [E, H, I] in bfloat16 as they are (row-major, no packed
    layout: a bf16 model's own weights are computed in place), for the C bf16 experts kernel
    (`moe_experts_bf16_cpu`: float32 math; plain SwiGLU experts)."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor):
        if w13.dtype != torch.bfloat16 or w2.dtype != torch.bfloat16:
            raise ValueError("Bf16Experts holds bfloat16 weights")
        self.bw13, self.bw2 = w13.contiguous(), w2.contiguous()

    def get(self):
        return self.bw13, self.bw2


class QTensorExperts(PackedExperts):
    """An MoE layer's w13 [E, 2I, H] and w2 [E, H, I] kept in a checkpoint's quantized format
    (`QParam`s; gpt-oss's biases apart), for `models.quant.ops.qmoe` on any device."""

    def __init__(self, w13: QParamLike, w2: QParamLike, triton: bool | None = None, cpu: bool | None = None):
        self.qp13, self.qp2 = w13, w2
        self.triton = triton  # the Triton kernel (None: on CUDA tensors; the plan sets it)
        self.cpu = cpu  # on the CPU: the C fp8 kernel where it serves (None/True) or the torch reference (False)

    def get(self):
        return self.qp13.q, self.qp2.q

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor,
                 variant: ExpertVariantLike | None = None) -> torch.Tensor:
        from models.quant.ops import qmoe

        return qmoe(x, self.qp13.q, self.qp2.q, topk_ids, topk_w, b13=self.qp13.bias, b2=self.qp2.bias,
                    limit=None if variant is None else variant.limit,
                    alpha=1.702 if variant is None else variant.alpha,
                    weight_on_input=variant is not None and variant.weight_on_input, triton=self.triton,
                    cpu=self.cpu)


def moe_cpu(x: torch.Tensor, packed: PackedExperts, topk_ids: torch.Tensor, topk_w: torch.Tensor,
            variant: ExpertVariantLike | None = None) -> torch.Tensor:
    """sum_k topk_w[t, k] * Expert_{topk_ids[t, k]}(x[t]) -> [T, H], as `fused_experts` (with the
    family's `variant`: biases, the clamped SwiGLU, routing weights on the input)."""
    if isinstance(packed, QuantizedExperts):
        if variant is not None:
            raise ValueError("quantized experts run plain SwiGLU only (the plan quantizes no family variant)")
        return quant_moe(x, topk_ids, topk_w, packed.qw13, packed.qw2)
    if isinstance(packed, Bf16Experts):
        if variant is not None:
            raise ValueError("bf16 experts run plain SwiGLU only")
        return torch.ops.moe_serve.moe_experts_bf16_cpu(x, topk_ids, topk_w, packed.bw13, packed.bw2)
    p13, p2, *biases = packed.get()
    if variant is None and not biases:
        return torch.ops.moe_serve.moe_experts_cpu(x, topk_ids, topk_w, p13, p2)
    b13, b2 = biases or (None, None)
    limit = None if variant is None else variant.limit
    return torch.ops.moe_serve.moe_experts_variant_cpu(
        x, topk_ids, topk_w, p13, p2, b13, b2, limit, 1.702 if variant is None else variant.alpha,
        variant is not None and variant.weight_on_input)
