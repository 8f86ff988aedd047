"""Pure-PyTorch reference implementations: the ground truth the kernels are tested against,
and the fallback wherever no kernel applies (CPU without a compiler, attention variants).

They favour clarity over speed: the paged decode gathers each sequence's blocks into a
contiguous tensor; the MoE masks the tokens of each expert in turn (transformers' formulation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_decode_reference(
    q: torch.Tensor,  # [B, heads, d] one query token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, d]
    v_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, d]
    block_tables: torch.Tensor,  # [B, max_blocks] block ids
    seq_lens: torch.Tensor,  # [B] keys each sequence attends to
    scale: float,
) -> torch.Tensor:
    """Attention of each sequence's query over its first seq_lens[b] cached keys -> [B, heads, d]."""
    bsz, heads, d = q.shape
    bs, kvh = k_cache.shape[1], k_cache.shape[2]
    max_len = int(seq_lens.max())
    nblocks = (max_len + bs - 1) // bs
    tables = block_tables[:, :nblocks]  # [B, nblocks]
    k = k_cache[tables].flatten(1, 2)  # [B, L, kvh, d]
    v = v_cache[tables].flatten(1, 2)
    group = heads // kvh
    qg = q.view(bsz, kvh, group, d)  # [B, kvh, group, d]: a KV head's query heads as the query axis
    pos = torch.arange(k.shape[1], device=q.device)
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
