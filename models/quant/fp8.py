"""FP8 (e4m3) weights with block or channel scales -> the compute dtype."""

from __future__ import annotations

import torch


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight [out, in] float8 times its scale -> [out, in] in `dtype`.

    `scale` is one of: a scalar / [1] (per tensor), [out, 1] (per output channel), or
    [ceil(out / bn), ceil(in / bk)] (one scale per [bn, bk] tile; DeepSeek's `weight_scale_inv`
    and compressed-tensors' block strategy both multiply). The tile size follows from the shapes.
    """
    w = weight.to(torch.float32)  # [out, in]
    s = scale.to(torch.float32)
    if s.numel() == 1:
        return (w * s.reshape(())).to(dtype)
    out_dim, in_dim = w.shape
    if s.dim() == 2 and s.shape[1] == 1 and s.shape[0] == out_dim:
        return (w * s).to(dtype)  # per output channel
    if s.dim() != 2:
        raise ValueError(f"fp8 scale of shape {tuple(s.shape)} does not fit a weight of shape {tuple(w.shape)}")
    rows, cols = s.shape
    bn, bk = -(-out_dim // rows), -(-in_dim // cols)  # tile size (the last tile may be partial)
    if -(-out_dim // bn) != rows or -(-in_dim // bk) != cols:
        raise ValueError(f"fp8 block scale {tuple(s.shape)} does not tile a weight of shape {tuple(w.shape)}")
    full = s.repeat_interleave(bn, dim=0)[:out_dim].repeat_interleave(bk, dim=1)[:, :in_dim]  # [out, in]
    return (w * full).to(dtype)
