"""The Mamba2 scan (models/layers/mamba2.py) on its own: the chunked (SSD) form equals the
token-by-token recurrence, whatever the chunk length and wherever a sequence is split into
prefill chunks carrying the state (chunked prefill); transformers parity is in test_parity.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.layers.mamba2 import mamba2_chunk_scan, mamba2_step


def _inputs(T=29, H=4, P=8, N=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, P, generator=g)
    dt = F.softplus(torch.randn(T, H, generator=g))
    A = -torch.rand(H, generator=g) * 2 - 0.1
    B, C = torch.randn(T, H, N, generator=g), torch.randn(T, H, N, generator=g)
    S0 = torch.randn(H, P, N, generator=g)
    return x, dt, A, B, C, S0


def _recurrence(x, dt, A, B, C, S):
    ys = []
    for t in range(x.shape[0]):
        y, S = mamba2_step(x[t:t + 1], dt[t:t + 1], A, B[t:t + 1], C[t:t + 1], S[None])
        ys.append(y[0])
        S = S[0]
    return torch.stack(ys), S


def test_chunked_scan_equals_the_recurrence():
    x, dt, A, B, C, S0 = _inputs()
    want_y, want_S = _recurrence(x, dt, A, B, C, S0)
    for chunk in (1, 4, 8, 29, 64):  # one token a chunk, several, one padded chunk
        y, S = mamba2_chunk_scan(x, dt, A, B, C, S0, chunk)
        assert (y - want_y).abs().max() < 1e-4, chunk
        assert (S - want_S).abs().max() < 1e-4, chunk
    # no initial state is a zero state
    y, S = mamba2_chunk_scan(x, dt, A, B, C, None, 8)
    zy, zS = _recurrence(x, dt, A, B, C, torch.zeros_like(S0))
    assert (y - zy).abs().max() < 1e-4 and (S - zS).abs().max() < 1e-4


def test_prefill_split_anywhere_carries_the_state():
    x, dt, A, B, C, _ = _inputs(seed=1)
    whole, final = mamba2_chunk_scan(x, dt, A, B, C, None, 8)
    for cuts in ((5,), (8, 16), (3, 13, 14, 27)):
        S, parts, start = None, [], 0
        for end in cuts + (x.shape[0],):
            y, S = mamba2_chunk_scan(x[start:end], dt[start:end], A, B[start:end], C[start:end], S, 8)
            parts.append(y)
            start = end
        assert (torch.cat(parts) - whole).abs().max() < 1e-4, cuts
        assert (S - final).abs().max() < 1e-4, cuts
