"""Paged decode attention: one query token per sequence over its KV blocks, by the kernel the
plan chose (`models.kernels.plan.AttentionKernel`).

- TRITON: `torch.ops.moe_serve.paged_decode_triton` (CUDA; CPU tensors under TRITON_INTERPRET=1)
- CPU: `torch.ops.moe_serve.paged_decode_cpu`, the C kernel of csrc/paged_attention_cpu.c (float32)
- REFERENCE: gather each sequence's blocks, then SDPA (`reference.paged_decode_reference`)
Both kernels read the blocks in place, with no host sync; the reference reads the longest length.
"""

from __future__ import annotations

import torch

from models.kernels.plan import AttentionKernel
from models.kernels.reference import paged_decode_reference


def paged_decode(
    q: torch.Tensor,  # [B, heads, d]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, d]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
    kernel: AttentionKernel,
) -> torch.Tensor:
    """q: [B, heads, d] -> [B, heads, d]."""
    kernel = AttentionKernel(kernel)  # also takes its name
    if kernel == AttentionKernel.TRITON:
        from models.kernels import triton_attention  # noqa: F401 - registers the op

        return torch.ops.moe_serve.paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if kernel == AttentionKernel.CPU:
        return torch.ops.moe_serve.paged_decode_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return paged_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)
