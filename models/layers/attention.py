"""Grouped-query attention over a paged KV cache.

The KV cache of one layer is a pair of tensors `[num_blocks, block_size, num_kv_heads,
head_dim]`; a sequence's tokens live in the blocks its block table lists. A step's tokens
are flattened (`[num_tokens, ...]`) with decode sequences (one new token each) first, then
prefill chunks. Decodes are attended in one batched op that reads the KV blocks in place
(`models.kernels.paged_attention`: Triton on CUDA, a C kernel on CPU; the reference gathers
them); each prefill chunk runs through `scaled_dot_product_attention` over its gathered
context (prefix cache hits and earlier chunks included).

Which decode kernel a layer uses is decided in one place, `decode_backend_for`: the kernels
serve plain causal GQA layers; a layer with a variant (sliding window, attention sinks,
chunked attention, latent KV) keeps the reference path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.kernels import KernelConfig
from models.kernels.cpu_linear import packed_linear
from models.kernels.paged_attention import paged_decode
from models.layers.norm import RMSNorm
from models.layers.rotary import RotaryEmbedding, apply_rotary

# attributes that mark an attention variant the paged kernels do not implement
VARIANT_ATTRS = ("sliding_window", "sinks", "attention_chunk_size", "kv_lora_rank")


@dataclass
class AttentionMetadata:
    """How this step's flattened tokens map onto sequences and KV slots."""

    num_decodes: int  # the first `num_decodes` sequences contribute exactly one token each
    query_start_loc: list[int]  # [num_seqs + 1] token offsets of each sequence
    seq_lens: list[int]  # [num_seqs] context length after this step (cached + new tokens)
    slot_mapping: torch.Tensor  # [num_tokens] flat KV slot (block * block_size + offset)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] block ids, padded with 0
    decode_seq_lens: torch.Tensor | None = None  # [num_decodes] as a tensor, for masking

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


KVCache = tuple[torch.Tensor, torch.Tensor]  # k, v: [num_blocks, block_size, kv_heads, head_dim]


def write_kv(cache: KVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # k, v: [num_tokens, kv_heads, head_dim]
    k_cache, v_cache = cache
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def gather_kv(cache: KVCache, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous K/V of one sequence: [length, kv_heads, head_dim] each."""
    k_cache, v_cache = cache
    bs = k_cache.shape[1]
    nblocks = (length + bs - 1) // bs
    ids = block_table[:nblocks]
    k = k_cache[ids].flatten(0, 1)[:length]
    v = v_cache[ids].flatten(0, 1)[:length]
    return k, v


def decode_attention(
    q: torch.Tensor, cache: KVCache, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    backend: str = "reference",
) -> torch.Tensor:
    """q: [B, heads, head_dim] (one token per sequence) -> [B, heads, head_dim].
    Every backend but "reference" reads the blocks in place, with no host sync."""
    k_cache, v_cache = cache
    return paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, backend)


def decode_backend_for(layer: nn.Module, kernels: KernelConfig, device: torch.device, dtype: torch.dtype) -> str:
    """The one place that decides a layer's decode kernel: plain causal GQA layers get the
    configured kernel, layers with a variant the kernels lack keep the reference."""
    if any(getattr(layer, name, None) not in (None, 0, False) for name in VARIANT_ATTRS):
        return "reference"
    return kernels.attention_backend(device, dtype)


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
        self.scale = self.head_dim**-0.5
        # q, k and v fused into one projection: [q_size + 2 * kv_size, hidden]
        self.qkv = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.q_size, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.kv_size, cfg.rms_norm_eps)
        self.clip_qkv = cfg.clip_qkv
        self.rotary = rotary
        self.decode_backend = "auto"  # resolved on first use, or set by MoEForCausalLM.set_kernels
        self.fused_rope = False  # q/k norm + rotary + KV store in one Triton launch (set_kernels)
        self.packed_qkv = None  # CPU: a oneDNN-packed copy of the qkv weight (MoEForCausalLM.set_kernels)

    def set_kernels(self, kernels: KernelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.decode_backend = decode_backend_for(self, kernels, device, dtype)
        plain = not any(getattr(self, name, None) not in (None, 0, False) for name in VARIANT_ATTRS)
        self.fused_rope = (kernels.use_fused_ops(device) and plain and self.clip_qkv is None
                           and self.qk_norm in (None, "head"))

    def _qkv_rope_store(self, x: torch.Tensor, cos_sin, meta: AttentionMetadata, cache: KVCache):
        """(q, k, v) after q/k norm and rotary, each [T, (kv_)heads, head_dim], k and v stored into
        the cache; the fused path returns only q (k and v are where they were stored)."""
        if self.packed_qkv is not None:
            qkv = packed_linear(x, self.packed_qkv, self.qkv.bias)  # [T, q_size + 2 kv_size]
        else:
            qkv = self.qkv(x)
        if self.fused_rope:
            from models.kernels.triton_ops import rope_write_kv

            head = self.qk_norm == "head"
            q = rope_write_kv(qkv, *cos_sin, *cache, meta.slot_mapping, self.num_heads, self.num_kv_heads,
                              self.head_dim, self.q_norm.weight if head else None,
                              self.k_norm.weight if head else None, self.q_norm.eps if head else 1e-6)
            return q, None, None
        T = x.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(T, self.num_heads, self.head_dim)
        k = k.view(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = v.contiguous()
        write_kv(cache, k, v, meta.slot_mapping)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        cache: KVCache,
    ) -> torch.Tensor:
        T = x.shape[0]
        if self.decode_backend == "auto":
            self.set_kernels(KernelConfig(), x.device, x.dtype)
        q, k, v = self._qkv_rope_store(x, cos_sin, meta, cache)  # q: [T, heads, head_dim]
        nd = meta.num_decodes
        if nd == T:  # decode-only step: no prefill chunk, no copy
            out = decode_attention(q, cache, meta.block_tables[:nd], meta.decode_seq_lens, self.scale,
                                   self.decode_backend)
            return self.o_proj(out.view(T, self.q_size))
        out = torch.empty_like(q)  # [T, heads, head_dim]
        if nd:
            out[:nd] = decode_attention(q[:nd], cache, meta.block_tables[:nd], meta.decode_seq_lens, self.scale,
                                        self.decode_backend)
        loc = meta.query_start_loc
        for i in range(nd, meta.num_seqs):  # prefill chunks: one SDPA each
            s, e = loc[i], loc[i + 1]
            if k is not None and meta.seq_lens[i] == e - s:  # no cached prefix: the new keys are the context
                kc, vc = k[s:e], v[s:e]
            else:  # cached prefix / earlier chunks, or the fused path: read back from the cache
                kc, vc = gather_kv(cache, meta.block_tables[i], meta.seq_lens[i])
            out[s:e] = prefill_attention(q[s:e], kc, vc, self.scale)
        return self.o_proj(out.view(T, self.q_size))
