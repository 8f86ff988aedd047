"""MXFP4 (OCP microscaling FP4) expert weights of gpt-oss -> the compute dtype."""

from __future__ import annotations

import torch

# E2M1 code -> value (bit 3 is the sign)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks [..., rows, G, 16] uint8 (two FP4 codes per byte, low nibble first, 32 values per
    block) and scales [..., rows, G] uint8 (E8M0: value 2 ** (s - 127)) -> [..., rows, G * 32].

    For gpt-oss `gate_up_proj_blocks` [E, 2I, H/32, 16] this gives [E, 2I, H] (rows interleave
    gate and up); for `down_proj_blocks` [E, H, I/32, 16], [E, H, I]."""
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"mxfp4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    out = torch.empty(*scales.shape[:-1], scales.shape[-1] * 32, dtype=dtype, device=blocks.device)
    # one leading slice (an expert) at a time: the float32 intermediate stays that small
    for b, s, o in zip(blocks.to(torch.uint8).flatten(0, -4) if blocks.dim() > 3 else [blocks.to(torch.uint8)],
                       scales.flatten(0, -3) if scales.dim() > 2 else [scales],
                       out.flatten(0, -3) if out.dim() > 2 else [out]):
        vals = torch.stack((lut[(b & 0x0F).long()], lut[(b >> 4).long()]), dim=-1)  # [rows, G, 16, 2]
        vals = vals.flatten(-2)  # [rows, G, 32]: low nibble, high nibble, ...
        exp = s.to(torch.int32) - 127  # [rows, G]
        o.copy_(torch.ldexp(vals, exp[..., None].to(torch.float32)).flatten(-2))  # [rows, G * 32]
    return out
