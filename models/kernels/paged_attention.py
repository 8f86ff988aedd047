"""Paged decode attention: one query token per sequence over its KV blocks, by the kernel the
plan chose (`models.kernels.plan.AttentionKernel`).

- TRITON: `torch.ops.moe_serve.paged_decode_triton` (CUDA; CPU tensors under TRITON_INTERPRET=1)
- CPU: `torch.ops.moe_serve.paged_decode_cpu`, the C kernel of csrc/paged_attention_cpu.c (float32
  math over a float32 or bfloat16 cache); over a float8_e4m3fn cache (`--kv-cache-dtype fp8`)
  `paged_decode_fp8_cpu`; both convert in the kernel
- REFERENCE: gather each sequence's blocks, then SDPA (`reference.paged_decode_reference`)
Both kernels read the blocks in place, with no host sync; the reference reads the longest length.
Both kernels also serve the attention variants: a sliding window (`window`: the query sees its
last `window` keys), chunked attention (`chunk`: the keys of its own chunk) and per-head sinks
(`sinks` [heads]: one more logit in each softmax's denominator); they read only the visible
keys. Every path reads an fp8 cache (float8_e4m3fn, keys k8 * k_scale, values v8 * v_scale) and
a bfloat16 cache of a float32 model (`--kv-cache-dtype bfloat16`).
The reference serves plain causal attention only (the variants' reference path is
`models/layers/attention_variants.py`).
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
    window: int | None = None,
    chunk: int | None = None,
    sinks: torch.Tensor | None = None,  # [heads]
    k_scale: float = 1.0,  # an fp8 cache's per-tensor scales
    v_scale: float = 1.0,
) -> torch.Tensor:
    """q: [B, heads, d] -> [B, heads, d]."""
    kernel = AttentionKernel(kernel)  # also takes its name
    w, c = window or 0, chunk or 0
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if kernel == AttentionKernel.TRITON:
        from models.kernels import triton_attention  # noqa: F401 - registers the op

        if fp8:
            return torch.ops.moe_serve.paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, w, c,
                                                           sinks, k_scale, v_scale)
        return torch.ops.moe_serve.paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, w, c, sinks)
    if kernel == AttentionKernel.CPU:
        if fp8:
            return torch.ops.moe_serve.paged_decode_fp8_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                                            k_scale, v_scale, w, c, sinks)
        return torch.ops.moe_serve.paged_decode_cpu(q, k_cache, v_cache, block_tables, seq_lens, scale, w, c, sinks)
    if w or c or sinks is not None:
        raise ValueError("the reference paged decode serves plain causal attention: variants take "
                         "models.layers.attention_variants.decode_variant")
    return paged_decode_reference(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)
