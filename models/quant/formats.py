"""Weights kept in the format a checkpoint ships (issue 27): one canonical layout per format.

A `QTensor` stands for a float weight of logical shape [..., N, K] (N output rows, K inputs; leading
dims stack experts). Its tensors, per format (`WeightFormat`):

- `fp8_block`:   data float8_e4m3fn [..., N, K]; scale float32 [..., ceil(N/bn), ceil(K/bk)] with
                 `block` = (bn, bk) (DeepSeek-V3's `weight_scale_inv`: w = data * scale);
- `fp8_channel`: data float8_e4m3fn [..., N, K]; scale float32 [..., N, 1];
- `fp8_tensor`:  data float8_e4m3fn [..., N, K]; scale float32 [..., 1, 1];
- `mxfp4`:       data uint8 [..., N, K/2] of E2M1 codes, element 2j in the low nibble of byte j and
                 2j+1 in the high one; scale uint8 [..., N, K/32] of E8M0 exponents (w = v * 2^(s-127));
- `int4_group`:  data uint8 [..., N, K/2] of unsigned codes 0..15, nibble order as mxfp4; scale
                 float16 / bfloat16 / float32 [..., N, K/g] with `group` = g; zero uint8 [..., N, K/g]
                 (asymmetric) or None (symmetric, zero point 8): w = (q - zero) * scale;
- `int8_channel`: data int8 [..., N, K]; scale float32 [..., N, 1] (W8A16).

`dequant` is the reference every kernel is tested against (float64 math where asked); kernels
consume the tensors as they are. Checkpoint layouts (GPTQ, AWQ, compressed-tensors, DeepSeek's
FP8, gpt-oss's MXFP4) are converted to these at load by their readers, once.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol

import torch

# E2M1 code -> value (bit 3 is the sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_GROUP = 32


class WeightFormat(str, Enum):
    BF16 = "bf16"  # not quantized: the compute dtype (the name vLLM's plan tables use)
    FP8_BLOCK = "fp8_block"
    FP8_CHANNEL = "fp8_channel"
    FP8_TENSOR = "fp8_tensor"
    MXFP4 = "mxfp4"
    INT4_GROUP = "int4_group"
    INT8_CHANNEL = "int8_channel"


class FormatError(ValueError):
    pass


@dataclass
class QTensor:
    fmt: WeightFormat
    shape: tuple[int, ...]  # the logical float weight [..., N, K]
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None = None
    block: tuple[int, int] | None = None  # fp8_block: (bn, bk)
    group: int | None = None  # int4_group: g; mxfp4: 32

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.data, self.scale, self.zero) if t is not None)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def device(self) -> torch.device:
        return self.data.device

    def to(self, device: torch.device | str) -> QTensor:
        return replace(self, data=self.data.to(device), scale=self.scale.to(device),
                       zero=None if self.zero is None else self.zero.to(device))

    def __getitem__(self, i: int | torch.Tensor | slice) -> QTensor:
        """Select along the first leading (expert) dim: the same format over fewer experts."""
        if len(self.shape) < 3:
            raise FormatError("indexing a QTensor selects experts; this one is a single weight")
        data = self.data[i]
        lead = tuple(data.shape[: data.dim() - 2])
        return replace(self, shape=lead + self.shape[-2:], data=data, scale=self.scale[i],
                       zero=None if self.zero is None else self.zero[i])

    def dequant(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequant(self, dtype)


def _unpack_nibbles(data: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int64 codes [..., K] (low nibble first)."""
    d = data.to(torch.uint8)
    return torch.stack(((d & 0x0F), (d >> 4)), dim=-1).flatten(-2).long()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int codes 0..15 [..., K] -> uint8 [..., K/2] (element 2j low, 2j+1 high)."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def dequant(q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [..., N, K] a QTensor stands for (computed in float64 when `dtype` is float64,
    else float32, then cast)."""
    work = torch.float64 if dtype == torch.float64 else torch.float32
    N, K = q.shape[-2:]
    fmt = WeightFormat(q.fmt)
    if fmt in (WeightFormat.FP8_BLOCK, WeightFormat.FP8_CHANNEL, WeightFormat.FP8_TENSOR, WeightFormat.INT8_CHANNEL):
        w = q.data.to(work)
        s = q.scale.to(work)
        if fmt == WeightFormat.FP8_BLOCK:
            if q.block is None:
                raise FormatError("fp8_block needs its block size")
            bn, bk = q.block
            s = s.repeat_interleave(bn, dim=-2)[..., :N, :].repeat_interleave(bk, dim=-1)[..., :K]
        return (w * s).to(dtype)
    if fmt == WeightFormat.MXFP4:
        lut = torch.tensor(FP4_VALUES, dtype=work, device=q.data.device)
        v = lut[_unpack_nibbles(q.data)]  # [..., N, K]
        exp = q.scale.to(torch.int32) - 127
        s = torch.pow(torch.tensor(2.0, dtype=work, device=q.data.device), exp.to(work))
        return (v * s.repeat_interleave(MX_GROUP, dim=-1)).to(dtype)
    if fmt == WeightFormat.INT4_GROUP:
        if q.group is None:
            raise FormatError("int4_group needs its group size")
        codes = _unpack_nibbles(q.data).to(work)
        zero = (q.zero.to(work) if q.zero is not None else torch.full_like(q.scale, 8, dtype=work))
        zero = zero.repeat_interleave(q.group, dim=-1)
        s = q.scale.to(work).repeat_interleave(q.group, dim=-1)
        return ((codes - zero) * s).to(dtype)
    raise FormatError(f"format {fmt.value} has no quantized tensors")


class CheckpointReader(Protocol):
    """Turns one quantization method's checkpoint tensors into QTensors (one reader per method:
    DeepSeek FP8, compressed-tensors, MXFP4, GPTQ, AWQ). The loader asks `group` once over all
    tensor names, then reads each group's tensors and calls `assemble`."""

    def group(self, names: Collection[str]) -> dict[str, tuple[str, ...]]:
        """{the weight's name as an unquantized checkpoint names it ("...q_proj.weight"): the names of
        the checkpoint tensors it is made of} for every quantized weight among `names`. Tensors in no
        group are read as plain tensors."""
        ...

    def assemble(self, name: str, tensors: dict[str, torch.Tensor]) -> QTensor:
        """The QTensor of weight `name` from its tensors (checkpoint name -> tensor); its logical shape
        is the unquantized weight's [out, in] (an nn.Linear weight), leading dims for expert stacks."""
        ...
