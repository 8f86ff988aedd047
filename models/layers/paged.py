"""The paged KV cache as the attention layers see it: the step's metadata and the cache pair of
one layer, with the two ways tokens move in and out of it.

A layer's cache is a pair of tensors `[num_blocks, block_size, heads, width]`: K and V for GQA
layers, the latent and the rotary key for MLA layers (`heads` 1). With `--kv-cache-dtype fp8`
the pair is float8_e4m3fn with one scale per tensor (`KVScales`, vLLM's `k_scale` /
`v_scale`; an MLA layer's latent and rotary key share k_scale): a write stores `x / scale`
saturated to +-448, a read gives back `x8 * scale` in the model dtype. With `--kv-cache-dtype
bfloat16` on a float32 model the pair is bfloat16 (a write rounds to nearest even, a read widens
exactly). What the attention sees is always what the cache holds (`kv_roundtrip`). A sequence's tokens live in
the blocks its block table lists. A step's tokens are flattened (`[num_tokens, ...]`) with the
decode sequences (one new token each) first, then the prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """How this step's flattened tokens map onto sequences and KV slots."""

    num_decodes: int  # the first `num_decodes` sequences contribute exactly one token each
    query_start_loc: list[int]  # [num_seqs + 1] token offsets of each sequence
    seq_lens: list[int]  # [num_seqs] context length after this step (cached + new tokens)
    slot_mapping: torch.Tensor  # [num_tokens] flat KV slot (block * block_size + offset)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] block ids, padded with 0
    decode_seq_lens: torch.Tensor | None = None  # [num_decodes] as a tensor, for masking
    state_slots: torch.Tensor | None = None  # [num_seqs] each sequence's state slot (linear-attention layers)
    # DeepSeek Sparse Attention: the last indexer layer's choice, for layers that reuse it (GLM-5)
    dsa_selection: object = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


KVCache = tuple[torch.Tensor, torch.Tensor]  # [num_blocks, block_size, heads, width] each
KVScales = tuple[float, float]  # (k_scale, v_scale) of an fp8 cache pair; (1.0, 1.0) unless the checkpoint has them

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value: writes saturate there
NO_SCALES: KVScales = (1.0, 1.0)


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype == FP8_KV_DTYPE


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x / scale as float8_e4m3fn, saturated to +-448 (computed in float32)."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize_fp8(x8: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """x8 * scale in `dtype`."""
    return (x8.float() * scale).to(dtype)


def fp8_roundtrip(x: torch.Tensor, scale: float) -> torch.Tensor:
    """What an fp8 cache gives back for x: dequantize(quantize(x)) in x's dtype."""
    return dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype)


def store_kv(x: torch.Tensor, cache_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """x as a cache of `cache_dtype` stores it: fp8 quantized with `scale`, otherwise cast
    (bfloat16: round to nearest even)."""
    if cache_dtype == FP8_KV_DTYPE:
        return quantize_fp8(x, scale)
    return x.to(cache_dtype)


def load_kv(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache entries x back in `dtype` (fp8: x8 * scale)."""
    if is_fp8(x):
        return dequantize_fp8(x, scale, dtype)
    return x.to(dtype)


def kv_roundtrip(x: torch.Tensor, cache_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """What a cache of `cache_dtype` gives back for x, in x's dtype (x itself where it stores x's dtype)."""
    if cache_dtype == x.dtype:
        return x
    return load_kv(store_kv(x, cache_dtype, scale), scale, x.dtype)


def write_rows(cache: torch.Tensor, x: torch.Tensor, slot_mapping: torch.Tensor, scale: float = 1.0) -> None:
    """Store rows x [num_tokens, heads, width] of one cache tensor at their flat slots, converted
    to the cache's dtype (`store_kv`)."""
    if cache.dtype != x.dtype:
        x = store_kv(x, cache.dtype, scale)
    if is_fp8(cache):  # (index_copy_ has no float8 kernel on the CPU: copy the bytes)
        x, cache = x.view(torch.uint8), cache.view(torch.uint8)
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, x)


def write_kv(cache: KVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             scales: KVScales = NO_SCALES) -> None:
    """Store a step's new entries: k, v [num_tokens, heads, width] at their flat slots (an fp8
    cache stores them quantized with `scales`, a bfloat16 one rounded)."""
    write_rows(cache[0], k, slot_mapping, scales[0])
    write_rows(cache[1], v, slot_mapping, scales[1])


def gather_kv(cache: KVCache, block_table: torch.Tensor, length: int, scales: KVScales = NO_SCALES,
              dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` entries of one sequence, contiguous: [length, heads, width] each (a
    cache of another dtype than `dtype` converted into it: fp8 dequantized; an fp8 cache needs it)."""
    k_cache, v_cache = cache
    bs = k_cache.shape[1]
    ids = block_table[: (length + bs - 1) // bs]
    k, v = k_cache[ids].flatten(0, 1)[:length], v_cache[ids].flatten(0, 1)[:length]
    if is_fp8(k_cache):
        assert dtype is not None, "an fp8 KV cache is read into the model dtype"
    if dtype is not None and k.dtype != dtype:
        return load_kv(k, scales[0], dtype), load_kv(v, scales[1], dtype)
    return k, v
