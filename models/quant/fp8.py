"""FP8 (e4m3) weights with block or channel scales -> the compute dtype."""

from __future__ import annotations

import torch


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                block: tuple[int, int] | None = None) -> torch.Tensor:
    """weight [out, in] float8 times its scale -> [out, in] in `dtype`.

    `scale` is one of: a scalar / [1] (per tensor), [out, 1] (per output channel), or
    [ceil(out / bn), ceil(in / bk)] for `block` = (bn, bk) (one scale per tile, the last tiles
    partial; DeepSeek's `weight_scale_inv` and compressed-tensors' block strategy both multiply).
    """
    w = weight.to(torch.float32)  # [out, in]
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return (w * s.reshape(())).to(dtype)
    out_dim, in_dim = w.shape
    if block is not None and s.dim() == 2 and s.shape == (-(-out_dim // block[0]), -(-in_dim // block[1])):
        bn, bk = block
        full = s.repeat_interleave(bn, dim=0)[:out_dim].repeat_interleave(bk, dim=1)[:, :in_dim]  # [out, in]
        return (w * full).to(dtype)
    if s.dim() == 2 and s.shape == (out_dim, 1):
        return (w * s).to(dtype)  # per output channel
    raise ValueError(f"fp8 scale of shape {tuple(s.shape)} does not fit a weight of shape {tuple(w.shape)}"
                     + (f" in blocks of {block[0]}x{block[1]}" if block else ""))
