"""Sorting (token, slot) pairs by expert, on the device, with no host sync.

`align_pairs` pads each expert's run of pairs to a multiple of `block_m` (as vLLM's
`moe_align_block_size` does), so that every BLOCK_M rows of the sorted order belong to one
expert: one program of the grouped GEMM then multiplies by one expert's weights. All sizes
are static upper bounds (`P + E * (block_m - 1)` rows), so the result can live in a CUDA
graph; the true padded length is a device tensor the kernels read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AlignedPairs:
    sorted_pairs: torch.Tensor  # [max_rows] pair index (token * top_k + slot), P for padding
    block_experts: torch.Tensor  # [max_rows / block_m] expert of each block of rows
    num_rows: torch.Tensor  # [1] rows in use (padded), read by the kernels
    block_m: int


def expert_counts(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[P] expert ids -> [E] int64 counts (scatter_add: bincount would read its size back)."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_ids.device)
    return counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))


def sort_pairs(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The host-side grouping of the CPU loops: (order [P] pairs sorted by expert, token_of [P]
    source token of each sorted pair, counts per expert as host ints: a sync on CUDA)."""
    flat = topk_ids.reshape(-1)  # [P]
    order = torch.argsort(flat, stable=True)  # [P]
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, order // topk_ids.shape[1], counts


def expert_runs(counts: list[int]):
    """(expert, start, end) of each expert's non-empty run in the sorted pair order."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def align_pairs(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    flat = topk_ids.reshape(-1).to(torch.int64)  # [P]
    P = flat.numel()
    dev = flat.device
    counts = expert_counts(flat, num_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    ends = padded.cumsum(0)  # [E] end row of each expert's padded run
    order = torch.argsort(flat, stable=True)  # [P] pairs sorted by expert
    sorted_e = flat[order]  # [P]
    first_unpadded = counts.cumsum(0) - counts  # [E] start of each expert's run, unpadded
    rank = torch.arange(P, device=dev) - first_unpadded[sorted_e]  # [P] position inside its run
    dest = (ends - padded)[sorted_e] + rank  # [P] padded row of each sorted pair
    max_rows = P + num_experts * (block_m - 1)
    max_rows = (max_rows + block_m - 1) // block_m * block_m
    sorted_pairs = torch.full((max_rows,), P, dtype=torch.int64, device=dev)
    sorted_pairs.index_copy_(0, dest, order)
    block_start = torch.arange(0, max_rows, block_m, device=dev)  # [num_blocks]
    block_experts = torch.searchsorted(ends, block_start, right=True).clamp_(max=num_experts - 1)
    return AlignedPairs(sorted_pairs, block_experts, ends[-1:], block_m)
