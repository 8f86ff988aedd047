"""Model parameters kept in a checkpoint's quantized format (`QParam`), written slice by slice as
the loader streams the checkpoint.

A `QParam` replaces one float parameter (which stays a shape on the meta device, as
`--quantization int8|int4` does with `models/kernels/quant.QuantWeight`): its `QTensor` [..., N, K]
in one canonical format (models/quant/formats.py) and, for gpt-oss's expert stacks whose bias rides
as one more input column of the float parameter ([E, N, K + 1]), the bias apart ([E, N], float).

Writes select whole rows (an index over the leading dims and the rows: our fused q/k/v, gate/up and
stacked experts); an FP8-block weight's row slices must start and end on its block boundaries.
A per-tensor FP8 weight written into a slice (gate and up of one expert, q/k/v) is held per
channel: each row keeps its tensor's scale (lossless; 4 bytes a row more).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from models.quant.formats import MX_GROUP, FormatError, QTensor, WeightFormat

E4M3_MAX = 448.0
FP8 = (WeightFormat.FP8_BLOCK, WeightFormat.FP8_CHANNEL, WeightFormat.FP8_TENSOR)


def empty_qtensor(shape: tuple[int, ...], fmt: WeightFormat, block: tuple[int, int] | None = None,
                  group: int | None = None, device: torch.device | str = "cpu", zero: bool = False,
                  scale_dtype: torch.dtype = torch.float32) -> QTensor:
    """A zero QTensor of logical `shape` [..., N, K] in `fmt` (`group`, `zero` and `scale_dtype`:
    int4_group's group size, zero points and scale dtype)."""
    *rest, N, K = shape
    lead = tuple(rest)
    if fmt == WeightFormat.INT8_CHANNEL:
        return QTensor(fmt, tuple(shape), torch.zeros(*lead, N, K, dtype=torch.int8, device=device),
                       torch.zeros(*lead, N, 1, dtype=torch.float32, device=device))
    if fmt == WeightFormat.INT4_GROUP:
        if group is None or K % group:
            raise FormatError(f"int4_group needs a group size dividing its input size {K}, got {group}")
        return QTensor(fmt, tuple(shape), torch.zeros(*lead, N, K // 2, dtype=torch.uint8, device=device),
                       torch.zeros(*lead, N, K // group, dtype=scale_dtype, device=device),
                       zero=torch.zeros(*lead, N, K // group, dtype=torch.uint8, device=device) if zero else None,
                       group=group)
    if fmt in FP8:
        data = torch.zeros(*lead, N, K, dtype=torch.float8_e4m3fn, device=device)
        if fmt == WeightFormat.FP8_BLOCK:
            if block is None:
                raise FormatError("fp8_block needs its block size")
            s: tuple[int, ...] = (-(-N // block[0]), -(-K // block[1]))
        else:
            s = (N, 1) if fmt == WeightFormat.FP8_CHANNEL else (1, 1)
        return QTensor(fmt, tuple(shape), data, torch.zeros(*lead, *s, dtype=torch.float32, device=device),
                       block=block)
    if fmt == WeightFormat.MXFP4:
        if K % MX_GROUP:
            raise FormatError(f"mxfp4 needs an input size that is a multiple of {MX_GROUP}, got {K}")
        return QTensor(fmt, tuple(shape), torch.zeros(*lead, N, K // 2, dtype=torch.uint8, device=device),
                       torch.zeros(*lead, N, K // MX_GROUP, dtype=torch.uint8, device=device), group=MX_GROUP)
    raise FormatError(f"no quantized holder for format {WeightFormat(fmt).value}")


def to_channel(q: QTensor) -> QTensor:
    """An fp8_tensor QTensor as fp8_channel (the tensor's scale on every row: the same weights)."""
    if q.fmt != WeightFormat.FP8_TENSOR:
        return q
    scale = q.scale.expand(*q.shape[:-2], q.shape[-2], 1).contiguous()
    return replace(q, fmt=WeightFormat.FP8_CHANNEL, scale=scale)


def quantize_fp8_channel(w: torch.Tensor) -> QTensor:
    """A float weight [..., N, K] -> fp8_channel (scale = max |row| / 448; round to nearest)."""
    x = w.detach().float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)
    data = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return QTensor(WeightFormat.FP8_CHANNEL, tuple(w.shape), data, scale)


def permute_rows(q: QTensor, perm: torch.Tensor) -> QTensor:
    """The same weight with its rows (dim -2) reordered by `perm`: formats with per-row (or
    per-tensor) scales only; an FP8-block tile spans rows that a permutation would split."""
    if q.fmt == WeightFormat.FP8_BLOCK:
        raise FormatError("a row permutation splits fp8 blocks")
    perm = perm.to(q.data.device)
    scale = q.scale if q.scale.shape[-2] == 1 and q.shape[-2] != 1 else q.scale.index_select(-2, perm)
    zero = None if q.zero is None else q.zero.index_select(-2, perm)
    return replace(q, data=q.data.index_select(-2, perm), scale=scale, zero=zero)


@dataclass
class QParam:
    """One model parameter kept quantized (see the module docstring)."""

    name: str
    param_shape: tuple[int, ...]  # the float parameter's shape (bias column included)
    q: QTensor
    bias: torch.Tensor | None = None  # [..., N] where the parameter carries a bias column

    @classmethod
    def empty(cls, name: str, param_shape: tuple[int, ...], fmt: WeightFormat, block: tuple[int, int] | None = None,
              bias_column: bool = False, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu", **extras) -> QParam:
        """`extras`: `empty_qtensor`'s group / zero / scale_dtype (int4_group)."""
        shape = tuple(param_shape[:-1]) + (param_shape[-1] - (1 if bias_column else 0),)
        bias = torch.zeros(shape[:-1], dtype=dtype, device=device) if bias_column else None
        return cls(name, tuple(param_shape), empty_qtensor(shape, WeightFormat(fmt), block, device=device, **extras),
                   bias)

    @property
    def fmt(self) -> WeightFormat:
        return WeightFormat(self.q.fmt)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())

    def is_bias_index(self, index: tuple) -> bool:
        """Whether `index` selects the bias column (the last input column of the float parameter)."""
        return (self.bias is not None and len(index) == len(self.param_shape) and isinstance(index[-1], int)
                and index[-1] == self.param_shape[-1] - 1)

    def _scale_index(self, index: tuple) -> tuple:
        """The index into the scales that matches `index` into the rows."""
        lead = len(self.q.shape) - 2
        if len(index) <= lead:
            return index
        rows = index[lead]
        if self.fmt == WeightFormat.FP8_TENSOR:
            if rows != slice(None):
                raise FormatError(f"{self.name}: a per-tensor fp8 weight is written whole, not rows {rows}")
            return index
        if self.fmt != WeightFormat.FP8_BLOCK:
            return index
        bn = self.q.block[0]
        N = self.q.shape[-2]
        start, stop, step = rows.indices(N) if isinstance(rows, slice) else (rows, rows + 1, 1)
        if step != 1 or start % bn or (stop % bn and stop != N):
            raise FormatError(f"{self.name}: rows {start}:{stop} are not whole blocks of {bn}")
        return index[:lead] + (slice(start // bn, -(-stop // bn)),)

    def write(self, index: tuple, value: QTensor | torch.Tensor) -> None:
        """Write the rows `index` selects from a QTensor (its format converted where that is
        lossless) or from a float tensor (quantized per channel: `--quantization fp8`); a float
        tensor at the bias column fills the bias."""
        if isinstance(value, torch.Tensor):
            if self.is_bias_index(index):
                self.bias[index[:-1]].copy_(value)
                return
            if self.fmt != WeightFormat.FP8_CHANNEL:
                raise FormatError(f"{self.name}: a float tensor cannot be written into {self.fmt.value} weights")
            value = quantize_fp8_channel(value)
        if WeightFormat(value.fmt) == WeightFormat.FP8_TENSOR and self.fmt == WeightFormat.FP8_CHANNEL:
            value = to_channel(value)
        if WeightFormat(value.fmt) != self.fmt or value.block != self.q.block:
            raise FormatError(f"{self.name}: {WeightFormat(value.fmt).value} weights written into "
                              f"{self.fmt.value} ones")
        data = self.q.data[index] if index else self.q.data
        scale = self.q.scale[self._scale_index(index)] if index else self.q.scale
        if tuple(data.shape) != tuple(value.data.shape) or tuple(scale.shape) != tuple(value.scale.shape):
            raise FormatError(f"{self.name}: a {tuple(value.shape)} weight does not fit rows {index} "
                              f"(data {tuple(data.shape)} vs {tuple(value.data.shape)}, scales {tuple(scale.shape)} "
                              f"vs {tuple(value.scale.shape)})")
        if value.group != self.q.group or (value.zero is None) != (self.q.zero is None):
            raise FormatError(f"{self.name}: group {value.group} / zero points {value.zero is not None} written into "
                              f"group {self.q.group} / zero points {self.q.zero is not None}")
        data.copy_(value.data)
        scale.copy_(value.scale)
        if self.q.zero is not None:
            (self.q.zero[index] if index else self.q.zero).copy_(value.zero)

    def dequant(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float parameter it stands for (bias column included): tests and the placement fallback."""
        w = self.q.dequant(dtype)
        return w if self.bias is None else torch.cat((w, self.bias.to(dtype)[..., None]), dim=-1)
