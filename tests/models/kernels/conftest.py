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


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """PyTorch's thread count (the C kernels' threads) at `n` inside the block, restored after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
