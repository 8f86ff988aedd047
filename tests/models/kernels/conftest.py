"""Kernel tests: every kernel against its PyTorch reference, at small shapes.

Without a GPU, the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before anything imports triton: triton reads it when kernels are defined).
The `cuda` variants (pytest -m cuda) run the compiled kernels on the GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("no GPU and TRITON_INTERPRET is not 1: tests/conftest.py sets it before triton is imported")

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]),
]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN never passes a bound."""
    out, ref = out.double(), ref.double()
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return err if err == err else float("inf")


def rope_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, H: int, KVH: int, D: int,
                   q_norm=None, k_norm=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (head-normed by the RMSNorm modules q_norm / k_norm if given, then rotated) and v of
    a fused q/k/v row block [T, (H + 2 KVH) D], by the layers' PyTorch code: what the fused
    rotary + KV store ops must give."""
    from models.layers.rotary import apply_rotary

    T = qkv.shape[0]
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], -1)
    q, k, v = q.reshape(T, H, D), k.reshape(T, KVH, D), v.reshape(T, KVH, D)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch's thread count (the C kernels' threads) at `n` inside the block, restored after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
