"""Grouped-query attention over a paged KV cache.

The KV cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads,
head_dim]`; a sequence's tokens live in the blocks its block table lists. A step's tokens
are flattened (`[num_tokens, ...]`) with decode sequences (one new token each) first, then
prefill chunks. Decodes are attended in one batched op that reads the KV blocks in place
(`models.kernels.paged_attention`: Triton on CUDA, a C kernel on CPU; the reference gathers
them); each prefill chunk runs through `scaled_dot_product_attention` over its gathered
context (prefix cache hits and earlier chunks included).

Layers with a variant (sliding window, chunked attention, sinks) decode with the same kernels,
which take the variant (the keys outside a window are not read), and attend their prefill chunks
through `models/layers/attention_variants.py`; where the plan gives them the reference, their
whole step goes there. MLA layers are `models/layers/mla.py`. Which decode
kernel a layer uses, and whether its rotary and KV store run fused, is the kernel plan's
choice (`models/kernels/plan.py`), handed to the layer by `apply_kernels`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.kernels.packed import PackedWeight, packed_linear
from models.kernels.paged_attention import paged_decode
from models.kernels.plan import AttentionKernel, LayerKernels
from models.layers.attention_variants import AttentionVariant, attend_variant, prefill_variant
from models.layers.norm import RMSNorm
from models.layers.paged import (
    NO_SCALES, AttentionMetadata, KVCache, KVScales, gather_kv, kv_roundtrip, write_kv,
)
from models.layers.rotary import RotaryEmbedding, rotate


def decode_attention(
    q: torch.Tensor, cache: KVCache, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    kernel: AttentionKernel = AttentionKernel.REFERENCE, variant: AttentionVariant | None = None,
    sinks: torch.Tensor | None = None, scales: KVScales = NO_SCALES,
) -> torch.Tensor:
    """q: [B, heads, head_dim] (one token per sequence) -> [B, heads, head_dim]. `scales`: an
    fp8 cache's (k_scale, v_scale).
    Every kernel but the reference reads the blocks in place, with no host sync. A variant
    (window, chunk, sinks) needs a kernel (the reference path is `attend_variant`)."""
    k_cache, v_cache = cache
    if variant is None or not variant.active:
        return paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, kernel,
                            k_scale=scales[0], v_scale=scales[1])
    return paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, kernel, variant.window,
                        variant.chunk, sinks if variant.sinks else None, scales[0], scales[1])


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of `n` new queries over a context of `L >= n` keys whose last `n`
    are the queries' own positions. q: [n, heads, d]; k, v: [L, kv_heads, d] -> [n, heads, d]."""
    n, heads, d = q.shape
    length, kvh = k.shape[0], k.shape[1]
    gqa = kvh != heads  # SDPA shares each KV head among its query heads, no copy
    # [1, heads, *, d]: 4-D inputs take SDPA's fused CPU kernel (3-D ones a slower path)
    qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]
    if length == n:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        # query i sits at absolute position length - n + i and sees keys 0..that position
        qpos = torch.arange(length - n, length, device=q.device)[:, None]
        kpos = torch.arange(length, device=q.device)[None, :]
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=kpos <= qpos, scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int, rotary: RotaryEmbedding):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.q_size, cfg.kv_size
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self.head_dim**-0.5
        # q, k and v fused into one projection: [q_size + 2 * kv_size, hidden]
        # Qwen3-Next: q_proj also yields a per-head output gate, kept as rows q_size..2 q_size
        self.gate_size = self.q_size if cfg.attn_output_gate else 0
        self.qkv = nn.Linear(cfg.hidden_size, self.q_size + self.gate_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.use_rope = cfg.uses_rope(layer_idx)
        self.rope_style = cfg.rope_style
        # Llama 4: q/k L2-normalised after rotary on rotary layers; NoPE layers scale q by position
        self.qk_norm = None if (cfg.qk_norm == "l2" and not self.use_rope) else cfg.qk_norm
        self.l2_eps = cfg.rms_norm_eps
        self.temperature = cfg.attn_temperature if not self.use_rope else None
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.q_size, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_size, cfg.rms_norm_eps)
        self.qk_norm_after_rope = cfg.qk_norm_after_rope
        self.clip_qkv = cfg.clip_qkv
        self.rotary = rotary
        # sliding window / chunked attention / sinks: the decode kernels take them; prefill chunks and
        # the reference path are attention_variants'
        self.variant = AttentionVariant(cfg.sliding_window(layer_idx), cfg.attention_chunk(layer_idx),
                                        cfg.attention_sinks)
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if cfg.attention_sinks else None  # [heads]
        # the kernel plan's choices (apply_kernels): the decode kernel, packed copies of the qkv and
        # o weights (CPU)
        self.decode_kernel: AttentionKernel | None = None
        # q/k norm + rotary + KV store in one op, Triton's or the C op (the model sets it from the
        # plan: models.model.fused_ops); None: not fused
        self.rope_op = None
        self.packed_qkv: PackedWeight | None = None
        self.packed_o: PackedWeight | None = None
        # an fp8 KV cache's per-tensor scales (vLLM's k_scale / v_scale): 1.0 unless the
        # checkpoint carries them (models/kv_cache_dtype.py)
        self.kv_scales: KVScales = NO_SCALES

    def apply_kernels(self, kernels: LayerKernels, packed_qkv: PackedWeight | None,
                      packed_o: PackedWeight | None) -> None:
        self.decode_kernel = kernels.attention
        self.packed_qkv, self.packed_o = packed_qkv, packed_o

    def _l2(self, t: torch.Tensor) -> torch.Tensor:
        tf = t.float()
        return (tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + self.l2_eps)).to(t.dtype)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:  # [T, q_size + 2 kv_size]
        if self.packed_qkv is not None:
            return packed_linear(x, self.packed_qkv, self.qkv.bias)
        return self.qkv(x)

    def _o(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:  # [T, q_size] -> [T, hidden]
        if gate is not None:  # the output gate (Qwen3-Next): [T, q_size]
            x = x * torch.sigmoid(gate)
        if self.packed_o is not None:
            return packed_linear(x, self.packed_o, self.o_proj.bias)
        return self.o_proj(x)

    def project(self, x: torch.Tensor, cos_sin, positions: torch.Tensor | None):
        """q [T, heads, d], k and v [T, kv_heads, d]: projections, q/k norms, rotary; and the
        output gate [T, q_size] (None without one)."""
        T = x.shape[0]
        qkv = self._qkv(x)
        q, gate, k, v = qkv.split([self.q_size, self.gate_size, self.kv_size, self.kv_size], dim=-1)

        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head" and not self.qk_norm_after_rope:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = cos_sin
            q, k = rotate(q, cos, sin, self.rope_style), rotate(k, cos, sin, self.rope_style)
        if self.qk_norm == "head" and self.qk_norm_after_rope:  # HunYuan
            q, k = self.q_norm(q), self.k_norm(k)
        if self.qk_norm == "l2":
            q, k = self._l2(q), self._l2(k)
        if self.temperature is not None:  # Llama 4 NoPE layers: q grows slowly with the position
            floor_scale, attn_scale = self.temperature
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0  # [T]
            q = (q * scales[:, None, None]).to(q.dtype)
        return q, k, v, (gate if self.gate_size else None)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache,
        positions: torch.Tensor | None = None,  # [T], needed by attention temperature tuning only
    ) -> torch.Tensor:
        T = x.shape[0]
        # an fp8 / bfloat16 cache of another dtype than the model's is written by write_kv (torch's
        # saturating round-to-nearest, on every GPU), not by the fused rotary + KV store, which
        # stores the model dtype
        converts = cache[0].dtype != x.dtype
        if self.rope_op is not None and not converts:  # k and v go straight into the cache; only q comes back
            head = self.qk_norm == "head"
            q = self.rope_op(
                self._qkv(x), *cos_sin, *cache, meta.slot_mapping, self.num_heads, self.num_kv_heads, self.head_dim,
                self.q_norm.weight if head else None, self.k_norm.weight if head else None,
                self.q_norm.eps if head else 1e-6)
            k = v = gate = None  # (the plan fuses only layers without an output gate)
        else:
            q, k, v, gate = self.project(x, cos_sin, positions)
            v = v.contiguous()
            write_kv(cache, k, v, meta.slot_mapping, self.kv_scales)
            if converts:  # the prefill attends what the cache holds, as the decode and later chunks do
                k = kv_roundtrip(k, cache[0].dtype, self.kv_scales[0])
                v = kv_roundtrip(v, cache[1].dtype, self.kv_scales[1])
        variant = self.variant
        if variant.active and self.decode_kernel in (None, AttentionKernel.REFERENCE):
            out = attend_variant(q, k, v, cache, meta, self.scale, variant, self.sinks, self.kv_scales)
            return self._o(out.view(T, self.q_size), gate)

        nd = meta.num_decodes
        if nd == T:  # decode-only step: no prefill chunk, no copy
            out = decode_attention(q, cache, meta.block_tables[:nd], meta.decode_seq_lens, self.scale,
                                   self.decode_kernel, variant, self.sinks, self.kv_scales)
            return self._o(out.view(T, self.q_size), gate)
        out = torch.empty_like(q)  # [T, heads, head_dim]
        if nd:
            out[:nd] = decode_attention(q[:nd], cache, meta.block_tables[:nd], meta.decode_seq_lens, self.scale,
                                        self.decode_kernel, variant, self.sinks, self.kv_scales)
        loc = meta.query_start_loc
        for i in range(nd, meta.num_seqs):  # prefill chunks: one SDPA each
            s, e = loc[i], loc[i + 1]
            if variant.active:  # the keys the chunk's queries see, in query tiles
                out[s:e] = prefill_variant(q[s:e], None if k is None else k[s:e], None if v is None else v[s:e],
                                           cache, meta.block_tables[i], meta.seq_lens[i], self.scale, variant,
                                           self.sinks, self.kv_scales)
                continue
            if k is not None and meta.seq_lens[i] == e - s:  # no cached prefix: the new keys are the context
                kc, vc = k[s:e], v[s:e]
            else:  # cached prefix / earlier chunks, or the fused path: read back from the cache
                kc, vc = gather_kv(cache, meta.block_tables[i], meta.seq_lens[i], self.kv_scales, q.dtype)
            out[s:e] = prefill_attention(q[s:e], kc, vc, self.scale)
        return self._o(out.view(T, self.q_size), gate)
