"""Pure-PyTorch reference implementations: the ground truth the kernels are tested against,
and the fallback wherever no kernel applies (CPU without a compiler, attention variants).

They favour clarity over speed: the paged decode gathers each sequence's blocks into a
contiguous tensor; the MoE loops over the experts with counts read on the host.
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


def moe_reference(
    x: torch.Tensor,  # [T, H]
    w13: torch.Tensor,  # [E, 2I, H] gate rows, then up rows
    w2: torch.Tensor,  # [E, H, I]
    topk_ids: torch.Tensor,  # [T, k]
    topk_w: torch.Tensor,  # [T, k]
) -> torch.Tensor:
    """sum_k w[t, k] * Expert_{ids[t, k]}(x[t]) for every token, grouped by expert -> [T, H].

    The (token, slot) pairs are sorted by expert and each active expert runs one matmul pair
    over its contiguous slice; the counts are read on the host (a sync on CUDA)."""
    T, k = topk_ids.shape
    num_experts, inter = w13.shape[0], w2.shape[-1]
    flat_ids = topk_ids.reshape(-1)  # [T * k]
    order = torch.argsort(flat_ids, stable=True)  # [T * k] (token, slot) pairs sorted by expert
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    token_of = order // k  # [T * k] source token of each sorted pair
    xs = x.index_select(0, token_of)  # [T * k, H]
    ys = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        end = start + n
        h = F.linear(xs[start:end], w13[e])  # [n, 2I]
        torch.mm(F.silu(h[:, :inter]) * h[:, inter:], w2[e].t(), out=ys[start:end])  # [n, H]
        start = end
    ys = ys * topk_w.reshape(-1)[order].to(ys.dtype)[:, None]
    out = torch.zeros_like(x)
    out.index_add_(0, token_of, ys)
    return out
