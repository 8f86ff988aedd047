"""The paged KV cache as the attention layers see it: the step's metadata and the cache pair of
one layer, with the two ways tokens move in and out of it.

A layer's cache is a pair of tensors `[num_blocks, block_size, heads, width]`: K and V for GQA
layers, the latent and the rotary key for MLA layers (`heads` 1). A sequence's tokens live in
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


def write_kv(cache: KVCache, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store a step's new entries: k, v [num_tokens, heads, width] at their flat slots."""
    k_cache, v_cache = cache
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def gather_kv(cache: KVCache, block_table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `length` entries of one sequence, contiguous: [length, heads, width] each."""
    k_cache, v_cache = cache
    bs = k_cache.shape[1]
    ids = block_table[: (length + bs - 1) // bs]
    return k_cache[ids].flatten(0, 1)[:length], v_cache[ids].flatten(0, 1)[:length]
