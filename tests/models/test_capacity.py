"""Switch-style expert capacity (models/layers/capacity.py) against a brute-force count."""

from __future__ import annotations

import torch

from models.layers.capacity import apply_capacity, expert_capacity


def test_apply_capacity_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for T, k, E, cf in ((7, 2, 4, 1.0), (33, 2, 8, 0.5), (16, 1, 4, 1.25), (5, 3, 3, 0.3)):
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k] distinct per token
        w = torch.rand(T, k, generator=g)
        out_w, dropped = apply_capacity(ids, w, E, cf)
        cap, used, want = expert_capacity(T, k, E, cf), [0] * E, torch.zeros(T, k, dtype=torch.bool)
        for slot in range(k):  # first choices of every token before any second choice
            for t in range(T):
                e = int(ids[t, slot])
                want[t, slot] = used[e] >= cap
                used[e] += 1
        assert torch.equal(dropped, want)
        assert torch.equal(out_w, w.masked_fill(want, 0.0))
