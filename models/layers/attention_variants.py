"""Attention over the paged cache for layers with a variant: sliding window (gpt-oss, Mixtral /
Qwen checkpoints that set one), chunked attention (Llama 4) and attention sinks (gpt-oss).

These layers take this reference PyTorch path, not the plain causal GQA kernels of
`models/layers/attention.py`: the same cache layout and metadata, with the visibility rule of
the variant. A query at position p sees key position j when j <= p and
- sliding window w: p - j < w (w keys, itself included);
- chunked attention c: j // c == p // c (only its own chunk).
With sinks, each head's softmax has one more logit (a learned per-head value) whose probability
mass is dropped. Only the blocks that hold visible keys are gathered, so a decode step over a
window costs O(window), not O(context).

Where the plan gives these layers a decode kernel (`models/kernels/paged_attention.py`: the C
kernel on the CPU in float32, Triton on CUDA), decodes take it and only prefill chunks come
here. A prefill chunk attends in tiles of queries, each over the keys its queries can see (a
view of the chunk's own K/V when it is the whole context, else of one gather of the cached
blocks from the chunk's first visible key on), so its scores stay bounded
(`PREFILL_SCORES_BUDGET`) and a window layer's prompt costs O(prompt x window), not O(prompt^2).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F

from models.layers.paged import NO_SCALES, AttentionMetadata, KVCache, KVScales, is_fp8, load_kv

PREFILL_SCORES_BUDGET = 2**24  # a prefill query tile's scores (heads x queries x keys) stay under this


@dataclass(frozen=True)
class AttentionVariant:
    window: int | None = None
    chunk: int | None = None
    sinks: bool = False

    @property
    def active(self) -> bool:
        return self.window is not None or self.chunk is not None or self.sinks

    def first_visible(self, qpos: torch.Tensor) -> torch.Tensor:
        """The first key position a query at `qpos` sees (same shape)."""
        lo = torch.zeros_like(qpos)
        if self.window is not None:
            lo = torch.clamp(qpos - self.window + 1, min=0)
        if self.chunk is not None:
            lo = torch.maximum(lo, (qpos // self.chunk) * self.chunk)
        return lo

    def first_visible_at(self, qpos: int) -> int:
        """`first_visible` of one position, on the host."""
        lo = max(qpos - self.window + 1, 0) if self.window is not None else 0
        return max(lo, (qpos // self.chunk) * self.chunk) if self.chunk is not None else lo

    def max_visible(self, seq_len: int) -> int:
        """The most keys a query of a context of `seq_len` sees."""
        return min([seq_len] + [x for x in (self.window, self.chunk) if x is not None])


def kv_reach(cfg) -> int | None:
    """The most positions back any layer of a model with config `cfg` reads keys from (a query
    at p reads p - reach + 1 .. p), when every layer is a GQA attention layer with a sliding
    window or attention chunk; None when some layer reads its whole context (or keeps other
    state). The KV cache manager releases blocks out of this reach."""
    if cfg.mla is not None or not cfg.num_layers:
        return None
    reach = 0
    for i in range(cfg.num_layers):
        limits = [x for x in (cfg.sliding_window(i), cfg.attention_chunk(i)) if x]
        if cfg.layer_kind(i) != "attention" or not limits:
            return None
        reach = max(reach, min(limits))
    return reach


def attend(
    q: torch.Tensor,  # [m, kvh, g, d] or [B, kvh, g, m, d]: query heads grouped by their KV head
    k: torch.Tensor,  # [..., kvh, L, d]
    v: torch.Tensor,  # [..., kvh, L, dv]
    visible: torch.Tensor,  # bool, broadcastable to the scores [..., kvh, g, m, L]
    scale: float,
    sinks: torch.Tensor | None,  # [kvh, g] per-head sink logits, or None
) -> torch.Tensor:
    """Softmax attention with a visibility mask and optional sinks -> [..., kvh, g, m, dv]."""
    if sinks is None:
        # [.., kvh, g*m, d] against [.., kvh, L, d]: SDPA with the group folded into the queries
        *lead, kvh, g, m, d = q.shape
        mask = visible.expand(*lead, kvh, g, m, visible.shape[-1]).reshape(*lead, kvh, g * m, -1)
        out = F.scaled_dot_product_attention(q.reshape(*lead, kvh, g * m, d), k, v, attn_mask=mask, scale=scale)
        return out.view(*lead, kvh, g, m, v.shape[-1])
    scores = torch.einsum("...hgmd,...hld->...hgml", q.float(), k.float()) * scale  # [.., kvh, g, m, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    sink = sinks.float()[..., None, None].expand(*scores.shape[:-1], 1)  # [.., kvh, g, m, 1]
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]  # the sink's mass is dropped
    return torch.einsum("...hgml,...hld->...hgmd", probs.to(v.dtype), v)


def _gather(cache: KVCache, tables: torch.Tensor, first_block: torch.Tensor, nblocks: int,
            scales: KVScales = NO_SCALES, dtype: torch.dtype | None = None):
    """K/V of blocks first_block .. first_block + nblocks - 1 of each row of `tables` [B, W]:
    [B, nblocks * block_size, kvh, d] each (rows past a table's end repeat its last entry and
    are masked out by position; an fp8 cache's dequantized into `dtype`)."""
    k_cache, v_cache = cache
    idx = (first_block[:, None] + torch.arange(nblocks, device=tables.device)).clamp(max=tables.shape[1] - 1)
    ids = tables.gather(1, idx)  # [B, nblocks]
    k, v = k_cache[ids].flatten(1, 2), v_cache[ids].flatten(1, 2)
    if is_fp8(k_cache):
        assert dtype is not None, "an fp8 KV cache is read into the model dtype"
    if dtype is not None and k.dtype != dtype:  # fp8 / bfloat16 cache of a float32 model
        return load_kv(k, scales[0], dtype), load_kv(v, scales[1], dtype)
    return k, v


def decode_variant(q: torch.Tensor, cache: KVCache, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   scale: float, variant: AttentionVariant, sinks: torch.Tensor | None,
                   scales: KVScales = NO_SCALES) -> torch.Tensor:
    """q: [B, heads, d], one token per sequence at position seq_len - 1 -> [B, heads, dv]."""
    bsz, heads, d = q.shape
    bs, kvh = cache[0].shape[1], cache[0].shape[2]
    qpos = seq_lens - 1  # [B]
    lo = variant.first_visible(qpos)  # [B]
    first = lo // bs  # [B] first block holding a visible key
    nblocks = int(((seq_lens + bs - 1) // bs - first).max())
    k, v = _gather(cache, block_tables, first, nblocks, scales, q.dtype)  # [B, L, kvh, d]
    kpos = first[:, None] * bs + torch.arange(nblocks * bs, device=q.device)  # [B, L]
    visible = (kpos >= lo[:, None]) & (kpos <= qpos[:, None])  # [B, L]
    qg = q.view(bsz, kvh, heads // kvh, 1, d)  # [B, kvh, g, 1, d]
    out = attend(qg, k.transpose(1, 2), v.transpose(1, 2), visible[:, None, None, None, :], scale,
                 None if sinks is None else sinks.view(kvh, heads // kvh))
    return out.reshape(bsz, heads, -1)


def prefill_variant(q: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor | None, cache: KVCache,
                    block_table: torch.Tensor, seq_len: int, scale: float, variant: AttentionVariant,
                    sinks: torch.Tensor | None, scales: KVScales = NO_SCALES) -> torch.Tensor:
    """n new queries (positions seq_len - n ..) of one sequence; q: [n, heads, d] -> [n, heads, dv].
    Keys come from the new K/V when the chunk is the whole context, else from the cache (only
    the blocks from the chunk's first visible key on). Queries go in tiles, each over its
    visible keys only."""
    n, heads, d = q.shape
    bs, kvh = cache[0].shape[1], cache[0].shape[2]
    dev = q.device
    q0 = seq_len - n  # the first query's position
    if seq_len == n and k_new is not None:
        k, v, base = k_new, v_new, 0
    else:
        first = variant.first_visible_at(q0) // bs  # the first query sees the earliest keys
        nblocks = (seq_len + bs - 1) // bs - first
        k, v = _gather(cache, block_table[None], torch.tensor([first], device=dev), nblocks, scales, q.dtype)
        k, v, base = k[0, : seq_len - first * bs], v[0, : seq_len - first * bs], first * bs
    assert v is not None
    tile, reach = n, variant.max_visible(seq_len)
    while tile > 64 and heads * tile * min(seq_len, reach + tile) > PREFILL_SCORES_BUDGET:
        tile = (tile + 1) // 2
    group_sinks = None if sinks is None else sinks.view(kvh, heads // kvh)
    out = q.new_empty(n, heads, v.shape[-1])
    for t0 in range(0, n, tile):
        t1 = min(n, t0 + tile)
        klo, khi = variant.first_visible_at(q0 + t0), q0 + t1  # the tile's keys: klo .. khi - 1
        qpos = torch.arange(q0 + t0, q0 + t1, device=dev)  # [m]
        kpos = torch.arange(klo, khi, device=dev)  # [L]
        visible = (kpos[None, :] >= variant.first_visible(qpos)[:, None]) & (kpos[None, :] <= qpos[:, None])
        qg = q[t0:t1].view(t1 - t0, kvh, heads // kvh, d).permute(1, 2, 0, 3)  # [kvh, g, m, d]
        o = attend(qg, k[klo - base: khi - base].transpose(0, 1), v[klo - base: khi - base].transpose(0, 1),
                   visible, scale, group_sinks)  # [kvh, g, m, dv]
        out[t0:t1] = o.permute(2, 0, 1, 3).reshape(t1 - t0, heads, -1)
    return out


def attend_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                   scale: float, variant: AttentionVariant, sinks: torch.Tensor | None,
                   scales: KVScales = NO_SCALES) -> torch.Tensor:
    """A layer's attention for the whole step (decodes first, then prefill chunks), q: [T, heads, d]."""
    out = torch.empty_like(q)  # [T, heads, d]
    nd = meta.num_decodes
    if nd:
        out[:nd] = decode_variant(q[:nd], cache, meta.block_tables[:nd], meta.decode_seq_lens, scale, variant, sinks,
                                  scales)
    loc = meta.query_start_loc
    for i in range(nd, meta.num_seqs):  # prefill chunks: one attention each
        s, e = loc[i], loc[i + 1]
        out[s:e] = prefill_variant(q[s:e], k[s:e], v[s:e], cache, meta.block_tables[i], meta.seq_lens[i],
                                   scale, variant, sinks, scales)
    return out
