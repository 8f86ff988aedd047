"""Pure-PyTorch reference implementations: the ground truth the kernels are tested against,
and the fallback wherever no kernel applies (CPU without a compiler, attention variants).

They favour clarity over speed: the paged decode gathers each sequence's blocks into a
contiguous tensor; the MoE masks the tokens of each expert in turn (transformers' formulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# the reference decode attends over the keys padded to a multiple of this many positions, whatever
# the block size: the attention's reductions then see the same lengths for any KV block layout
KEY_GRANULE = 64


def paged_decode_reference(
    q: torch.Tensor,  # [B, heads, d] one query token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, d]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, d]
    block_tables: torch.Tensor,  # [B, max_blocks] block ids
    seq_lens: torch.Tensor,  # [B] keys each sequence attends to
    scale: float,
    k_scale: float = 1.0,  # an fp8 cache's per-tensor scales: keys are k8 * k_scale, values v8 * v_scale
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Attention of each sequence's query over its first seq_lens[b] cached keys -> [B, heads, d].
    The keys are gathered by position (slot = block of the position, then its offset) into
    `KEY_GRANULE`-padded rows, so the result does not depend on the cache's block size. A
    float8_e4m3fn (or bfloat16) cache is dequantized (after the gather) into q's dtype."""
    bsz, heads, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    length = -(-int(seq_lens.max()) // KEY_GRANULE) * KEY_GRANULE
    pos = torch.arange(length, device=q.device)  # [L]
    blocks = block_tables.gather(1, (pos // bs).clamp(max=block_tables.shape[1] - 1).expand(bsz, -1))  # [B, L]
    slots = blocks * bs + pos % bs  # [B, L]
    k = k_cache.view(-1, kvh, d)[slots]  # [B, L, kvh, d]
    v = v_cache.view(-1, kvh, d)[slots]
    if k.dtype == torch.float8_e4m3fn:
        k, v = (k.float() * k_scale).to(q.dtype), (v.float() * v_scale).to(q.dtype)
    elif k.dtype != q.dtype:  # a bfloat16 cache of a float32 model: widened exactly
        k, v = k.to(q.dtype), v.to(q.dtype)
    group = heads // kvh
    qg = q.view(bsz, kvh, group, d)  # [B, kvh, group, d]: a KV head's query heads as the query axis
    mask = (pos[None, :] < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, L] keys each sequence sees
    # k, v viewed as [B, kvh, L, d] without a copy; SDPA reads them strided
    out = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(bsz, heads, d)


def moe_reference(x, w13, w2, topk_ids, topk_w) -> torch.Tensor:
    """The experts as transformers' Mixtral block writes them (shapes as
    `fused_moe.fused_experts`): per expert, the tokens that chose it (a mask over the top-k
    slots), its SwiGLU on them, scaled by their routing weight and added back. Independent of
    the kernels' sort-by-expert grouping, which is what makes it a reference."""
    inter = w2.shape[-1]
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        tokens, slots = torch.nonzero(topk_ids == e, as_tuple=True)  # [n] each
        if tokens.numel() == 0:
            continue
        h = F.linear(x[tokens], w13[e])  # [n, 2I]
        y = F.linear(F.silu(h[:, :inter]) * h[:, inter:], w2[e])  # [n, H]
        out.index_add_(0, tokens, y * topk_w[tokens, slots, None].to(y.dtype))
    return out
