"""MLA decode in the absorbed form over the paged latent cache, by the kernel the plan chose
(`models.kernels.plan.AttentionKernel`):

- TRITON: `torch.ops.moe_serve.mla_decode_triton` (models/kernels/triton_mla.py; CUDA, CPU
  tensors under TRITON_INTERPRET=1)
- CPU: `torch.ops.moe_serve.mla_decode_cpu`, the C kernel of csrc/mla_decode_cpu.c (float32 math)

Both read a float32, bfloat16 or float8_e4m3fn latent cache (`--kv-cache-dtype`; fp8 values
x8 * k_scale), converting in the kernel.

Both read the latent blocks in place (block tables, ragged lengths) with no host sync. The
weights come in the layout `absorbed_weights` makes once when the plan is applied (views of
`kv_b_proj`'s weight: no copy, and the loader's in-place writes reach them):

    q_lat [B, H, r] = q_nope [B, H, dn] @ W_uk [H, dn, r]   (per head)
    o_lat [B, H, r] = kernel(q_lat, q_pe, caches)
    out   [B, H, dv] = o_lat @ W_uv^T [H, r, dv]            (per head)
"""

from __future__ import annotations

import torch

from models.kernels.plan import AttentionKernel


def absorbed_weights(kv_b_weight: torch.Tensor, num_heads: int, nope: int, v_dim: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`kv_b_proj`'s weight [H * (dn + dv), r] -> (W_uk [H, dn, r], W_uv^T [H, r, dv]) as views,
    laid out for the per-head batched matmuls of `mla_decode`."""
    w = kv_b_weight.view(num_heads, nope + v_dim, kv_b_weight.shape[-1])
    return w[:, :nope], w[:, nope:].transpose(1, 2)


def latent_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, lat_cache: torch.Tensor, pe_cache: torch.Tensor,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     kernel: AttentionKernel, k_scale: float = 1.0) -> torch.Tensor:
    """The kernel alone: q_lat [B, H, r], q_pe [B, H, dr] -> o_lat [B, H, r]. The caches may be
    bfloat16 or float8_e4m3fn (values x8 * k_scale): the kernels convert as they load."""
    kernel = AttentionKernel(kernel)
    if kernel == AttentionKernel.TRITON:
        from models.kernels import triton_mla  # noqa: F401 - registers the op

        return torch.ops.moe_serve.mla_decode_triton(q_lat, q_pe, lat_cache, pe_cache, block_tables, seq_lens, scale,
                                                     k_scale)
    if kernel == AttentionKernel.CPU:
        return torch.ops.moe_serve.mla_decode_cpu(q_lat, q_pe, lat_cache, pe_cache, block_tables, seq_lens, scale,
                                                  k_scale)
    raise ValueError(f"MLA decode has no {kernel.value} kernel (the layer's own PyTorch path serves it)")


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor, w_uk: torch.Tensor, w_uv_t: torch.Tensor,
               lat_cache: torch.Tensor, pe_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               scale: float, kernel: AttentionKernel, k_scale: float = 1.0) -> torch.Tensor:
    """One query token per row: q_nope [B, H, dn], q_pe [B, H, dr] -> [B, H, dv]. Row b attends
    to the first seq_lens[b] tokens its block table lists."""
    q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [B, H, r]
    o_lat = latent_attention(q_lat, q_pe, lat_cache, pe_cache, block_tables, seq_lens, scale, kernel, k_scale)
    return torch.bmm(o_lat.transpose(0, 1), w_uv_t).transpose(0, 1)  # [B, H, dv]
