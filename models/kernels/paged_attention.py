"""Paged decode attention: one query token per sequence over its KV blocks, read in place.

Backends (see `models.kernels.KernelConfig`):
  - "triton": the Triton kernel (CUDA; on CPU tensors only under TRITON_INTERPRET=1, for tests)
  - "cpu": the C kernel of csrc/paged_attention_cpu.c (float32 CPU tensors)
  - "reference": gather each sequence's blocks, then SDPA (models.kernels.reference)
None of them syncs with the host except "reference" (it reads the longest length).
"""

from __future__ import annotations

import torch

from models.kernels import cpu_build
from models.kernels.reference import paged_decode_reference


def cpu_kernel_supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return q.device.type == "cpu" and q.dtype == k_cache.dtype == torch.float32 and cpu_build.load() is not None


def paged_decode_cpu(
    q: torch.Tensor,  # [B, heads, d]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, d]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B]
    scale: float,
) -> torch.Tensor:
    lib = cpu_build.load()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available here (see the log)")
    B, heads, d = q.shape
    _, bs, kvh, _ = k_cache.shape
    q = q.contiguous()
    tables = block_tables.to(torch.int64).contiguous()
    lens = seq_lens.to(torch.int64).contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the KV cache must be contiguous")
    out = torch.empty_like(q)  # [B, heads, d]
    rc = lib.paged_decode_f32(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                              lens.data_ptr(), out.data_ptr(), B, heads, kvh, d, bs, tables.shape[1], scale,
                              torch.get_num_threads())
    if rc != 0:
        raise MemoryError("paged_decode_f32 could not allocate its score buffer")
    return out


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """q: [B, heads, d] -> [B, heads, d]; `backend` as resolved by KernelConfig.attention_backend."""
    if backend == "triton":
        from models.kernels.triton_attention import paged_decode_triton

        return paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale)
    if backend == "cpu":
        return paged_decode_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return paged_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)
