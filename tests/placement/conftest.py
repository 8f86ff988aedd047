"""Placement fixtures: the tiny random Mixtral (tests/conftest.py) loaded once, executors reset."""

from __future__ import annotations

import pytest
import torch

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [3] * 12, list(range(30, 61))]


@pytest.fixture(scope="module")
def tiny_model(tiny_mixtral):
    from models import load_model

    return load_model(tiny_mixtral, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Single-device logits and greedy continuations of PROMPTS."""
    from tests.models.simple_runner import greedy_generate, prefill_logits

    for block in tiny_model.moe_blocks():
        block.executor = None
    return prefill_logits(tiny_model, PROMPTS), greedy_generate(tiny_model, PROMPTS, 8)


@pytest.fixture()
def model(tiny_model, reference):
    """The tiny model with no placement installed (and none left behind)."""
    w = [(b.w13.detach().clone(), b.w2.detach().clone()) for b in tiny_model.moe_blocks()]
    for block in tiny_model.moe_blocks():
        block.executor = None
    yield tiny_model
    for block, (w13, w2) in zip(tiny_model.moe_blocks(), w):
        block.executor = None
        assert torch.equal(block.w13, w13) and torch.equal(block.w2, w2), "placement changed the master weights"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads; on a busy 2-core machine, OpenMP barriers only stall."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
