"""Checkpoint readers (`formats.CheckpointReader`) of the float formats: DeepSeek's FP8 with block
scales, compressed-tensors' `float-quantized` FP8 (tensor / channel / block scales) and gpt-oss's
MXFP4. Each turns a weight's checkpoint tensors into a `QTensor` in its canonical layout
(models/quant/formats.py), once, as the loader streams them; nothing is dequantized here.

- DeepSeek `fp8` (`weight_block_size`): `X.weight` float8_e4m3fn [N, K] with `X.weight_scale_inv`
  float32 [ceil(N/bn), ceil(K/bk)] (w = q * scale_inv) -> `fp8_block`;
- compressed-tensors float-quantized: `X.weight` float8_e4m3fn with `X.weight_scale` of one
  element (`fp8_tensor`), [N, 1] (`fp8_channel`) or [ceil(N/bn), ceil(K/bk)] (`fp8_block`);
- `mxfp4` (gpt-oss): `X_blocks` uint8 [..., N, K/32, 16] (two E2M1 codes per byte, low nibble
  first) with `X_scales` uint8 [..., N, K/32] (E8M0) -> `mxfp4` [..., N, K] (the rows are the
  output features: gpt-oss's unquantized `gate_up_proj` [E, H, 2I] is their transpose).
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from models.quant.formats import MX_GROUP, FormatError, QTensor, WeightFormat


def _fp8_data(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float8_e4m3fn:
        raise FormatError(f"{name}: fp8 weights must be float8_e4m3fn, not {str(t.dtype).removeprefix('torch.')}")
    return t


def _blocks(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[-2] // block[0]), -(-shape[-1] // block[1])


class DeepSeekFP8Reader:
    """`quant_method: fp8` with `weight_block_size` (DeepSeek-V3/R1, Kimi K2, Qwen3 FP8 releases)."""

    suffixes = ("_scale_inv",)
    unquantized_layout_transposed = False

    def __init__(self, block: tuple[int, int] | None):
        self.block = block

    def group(self, names: Collection[str]) -> dict[str, tuple[str, ...]]:
        names = set(names)
        out: dict[str, tuple[str, ...]] = {}
        for n in names:
            for suffix in self.suffixes:
                if n.endswith(".weight") and n + suffix in names:
                    out[n] = (n, n + suffix)
                    break
        return out

    def describe(self, name: str, shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, str] | None = None) -> tuple[WeightFormat, tuple[int, ...],
                                                                            tuple[int, int] | None]:
        """(format, logical shape, block) of weight `name` from its tensors' shapes alone (the
        checkpoint header: the loader plans before reading any data)."""
        shape = shapes[name]
        scale = next(s for n, s in shapes.items() if n != name)
        fmt, block = self.fmt_of(scale, shape)
        return fmt, shape, block

    def fmt_of(self, scale_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[WeightFormat, tuple[int, int] | None]:
        if self.block is None:
            raise FormatError("fp8 block scales need weight_block_size")
        return WeightFormat.FP8_BLOCK, self.block

    def assemble(self, name: str, tensors: dict[str, torch.Tensor]) -> QTensor:
        data = _fp8_data(name, tensors[name])
        scale = tensors[next(n for n in tensors if n != name)].to(torch.float32)
        fmt, block = self.fmt_of(tuple(scale.shape), tuple(data.shape))
        return _fp8(name, fmt, data, scale, block)


class CompressedFloatReader(DeepSeekFP8Reader):
    """compressed-tensors `float-quantized` (FP8 weights with `weight_scale` per tensor, channel or block)."""

    suffixes = ("_scale",)

    def fmt_of(self, scale_shape: tuple[int, ...], shape: tuple[int, ...]) -> tuple[WeightFormat, tuple[int, int] | None]:
        numel = 1
        for d in scale_shape:
            numel *= d
        N = shape[-2]
        if numel == 1:
            return WeightFormat.FP8_TENSOR, None
        if tuple(scale_shape[-2:]) == (N, 1):
            return WeightFormat.FP8_CHANNEL, None
        if self.block is not None and tuple(scale_shape[-2:]) == _blocks(shape, self.block):
            return WeightFormat.FP8_BLOCK, self.block
        raise FormatError(f"fp8 scale of shape {tuple(scale_shape)} fits no strategy for a weight of shape {shape}")


def _fp8(name: str, fmt: WeightFormat, data: torch.Tensor, scale: torch.Tensor,
         block: tuple[int, int] | None) -> QTensor:
    shape = tuple(data.shape)
    lead = shape[:-2]
    if fmt == WeightFormat.FP8_TENSOR:
        scale = scale.reshape(*lead, 1, 1) if scale.numel() == 1 else scale
    want = {WeightFormat.FP8_TENSOR: (1, 1), WeightFormat.FP8_CHANNEL: (shape[-2], 1),
            WeightFormat.FP8_BLOCK: _blocks(shape, block) if block else None}[fmt]
    if want is None or tuple(scale.shape) != lead + want:
        raise FormatError(f"{name}: fp8 scale of shape {tuple(scale.shape)} does not fit a weight of shape {shape}"
                          + (f" in blocks of {block[0]}x{block[1]}" if block else ""))
    return QTensor(fmt, shape, data, scale.contiguous(), block=block)


class MXFP4Reader:
    """`quant_method: mxfp4` (gpt-oss experts): `*_blocks` and `*_scales`."""

    # gpt-oss's unquantized expert tensors are [E, in, out]: the float fallback transposes
    unquantized_layout_transposed = True

    def __init__(self, block: tuple[int, int] | None = None):
        pass

    def group(self, names: Collection[str]) -> dict[str, tuple[str, ...]]:
        names = set(names)
        return {n[: -len("_blocks")]: (n, n[: -len("_blocks")] + "_scales") for n in names
                if n.endswith("_blocks") and n[: -len("_blocks")] + "_scales" in names}

    def describe(self, name: str, shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, str] | None = None) -> tuple[WeightFormat, tuple[int, ...], None]:
        scales = shapes[name + "_scales"]
        return WeightFormat.MXFP4, tuple(scales[:-1]) + (scales[-1] * MX_GROUP,), None

    def assemble(self, name: str, tensors: dict[str, torch.Tensor]) -> QTensor:
        blocks, scales = tensors[name + "_blocks"], tensors[name + "_scales"]
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[-1] != MX_GROUP // 2 \
                or tuple(blocks.shape[:-1]) != tuple(scales.shape):
            raise FormatError(f"{name}: mxfp4 blocks {tuple(blocks.shape)} {blocks.dtype} do not match scales "
                              f"{tuple(scales.shape)} {scales.dtype} (uint8 [..., N, K/32, 16] and [..., N, K/32])")
        data = blocks.reshape(*blocks.shape[:-2], -1)  # [..., N, K/2]
        shape = tuple(scales.shape[:-1]) + (scales.shape[-1] * MX_GROUP,)
        return QTensor(WeightFormat.MXFP4, shape, data.contiguous(), scales.contiguous(), group=MX_GROUP)
