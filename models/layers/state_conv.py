"""What the stateful token mixers (Gated DeltaNet, Kimi Delta Attention, Mamba2) share: the causal
depthwise convolution whose last `kernel - 1` inputs each sequence keeps in its state slot, and
the walk over a step's sequences (decodes batched, prefill chunks one by one, each from the
state its earlier chunks left)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from models.layers.paged import AttentionMetadata


def decode_rows(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """The decodes' state slots [B] and which of them start from a zero state ([B, 1, 1]: the
    sequence's first token, its slot holding another sequence's leftovers)."""
    return meta.state_slots[: meta.num_decodes], (meta.decode_seq_lens <= 1)[:, None, None]


def prefill_chunks(meta: AttentionMetadata) -> Iterator[tuple[int, int, torch.Tensor, bool]]:
    """(start, end, state slot, carried) of each prefill chunk; `carried`: earlier chunks of the
    sequence ran before, so its state continues (else it starts from zeros)."""
    loc = meta.query_start_loc
    for i in range(meta.num_decodes, meta.num_seqs):
        s, e = loc[i], loc[i + 1]
        yield s, e, meta.state_slots[i], bool(meta.seq_lens[i] > e - s)


def conv_decode(cache: torch.Tensor, slots: torch.Tensor, fresh: torch.Tensor, new: torch.Tensor,
                weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """One new input per sequence, `new` [B, C]: slide each window (cache rows `slots`,
    [slots, C, K - 1]) and return the convolution [B, C] in float32 (before the activation)."""
    window = torch.cat((cache[slots].masked_fill(fresh, 0), new[:, :, None]), dim=-1)  # [B, C, K]
    cache.index_copy_(0, slots, window[..., 1:])
    out = (window.float() * weight.float()).sum(-1)
    return out if bias is None else out + bias.float()


def conv_prefill(cache: torch.Tensor, slot: torch.Tensor, carried: bool, chunk: torch.Tensor,
                 weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A prefill chunk of one sequence, `chunk` [n, C], after the window its earlier chunks left
    (zeros when not `carried`); keeps the new window and returns the convolution [n, C] in float32."""
    k = weight.shape[-1]
    prev = cache[slot] if carried else chunk.new_zeros(chunk.shape[1], k - 1)
    seq_in = torch.cat((prev, chunk.t()), dim=-1)  # [C, K - 1 + n]
    cache[slot] = seq_in[:, -(k - 1):]
    out = F.conv1d(seq_in[None].float(), weight.float()[:, None, :], None if bias is None else bias.float(),
                   groups=chunk.shape[1])
    return out[0].t()
