"""Packed CPU linears (the C panel kernel, oneDNN where it is not built or the shape does not
fit): same results as F.linear, re-packed when the weight changes, and the model-level switch
(packed vs plain) gives the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import load_model
from models.generate import prefill_logits
from models.kernels import KernelConfig
from models.kernels.cpu_linear import (PackedWeight, onednn_available, packed_linear, packing_available,
                                       panels_available)
from tests.models.kernels.conftest import rel_err

pytestmark = pytest.mark.skipif(not packing_available(), reason="no C kernels and no oneDNN here")


@pytest.mark.parametrize("out_features", [96, 40])  # 40: not a multiple of the 16-wide panels -> oneDNN
@pytest.mark.parametrize("rows", [0, 1, 7, 13, 64])
def test_packed_linear_matches_linear(rows, out_features):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, 48, generator=g)
    b = torch.randn(out_features, generator=g)
    x = torch.randn(rows, 48, generator=g)
    pw = PackedWeight(w)
    if out_features == 40 and not onednn_available():
        pytest.skip("no oneDNN in this torch build")
    assert pw.layout == ("panels" if out_features % 16 == 0 and panels_available() else "onednn")
    assert packed_linear(x, pw, b).shape == (rows, out_features)
    if rows:
        assert rel_err(packed_linear(x, pw, b), F.linear(x, w, b)) < 1e-6
        assert rel_err(packed_linear(x, pw), F.linear(x, w)) < 1e-6


def test_panel_linear_is_batch_and_thread_invariant():
    """A row's output does not depend on the other rows nor on the thread count (the LM head's
    logits, hence greedy tokens, do not change with the batch a request lands in)."""
    if not panels_available():
        from tests.conftest import skip_or_fail

        skip_or_fail("the C panel kernel is not built here (no C compiler or no AVX2 + FMA)")
    from models.kernels.cpu_linear import MIN_MACS_PER_THREADING

    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 64, generator=g)
    rows = MIN_MACS_PER_THREADING // (1024 * 64) + 3  # above the threading bound
    x = torch.randn(rows, 64, generator=g)
    pw = PackedWeight(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = packed_linear(x, pw)
        torch.set_num_threads(3)
        three = packed_linear(x, pw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    for r in (0, 7, rows - 1):
        assert torch.equal(packed_linear(x[r : r + 1], pw)[0], one[r])


def test_packed_weight_repacks_after_an_in_place_change():
    w = torch.randn(32, 16)
    stacked = torch.randn(3, 32, 16)
    pw, pe = PackedWeight(w), PackedWeight(stacked, index=2)
    x = torch.randn(4, 16)
    packed_linear(x, pw), packed_linear(x, pe)
    w.mul_(2.0)  # e.g. weights reloaded in place
    stacked[2].add_(1.0)
    assert rel_err(packed_linear(x, pw), F.linear(x, w)) < 1e-6
    assert rel_err(packed_linear(x, pe), F.linear(x, stacked[2])) < 1e-6


def test_model_packed_and_plain_agree(family_checkpoint):
    path, _ = family_checkpoint("mixtral")
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    model.set_kernels(KernelConfig(cpu_linear="packed"))
    assert model.packed_lm_head is not None and all(b.packed_w13 for b in model.moe_blocks())
    prompts = [[5, 9, 23, 7, 81, 3], [11, 2, 40]]
    packed = torch.cat(prefill_logits(model, prompts))
    model.set_kernels(KernelConfig(cpu_linear="plain"))
    assert model.packed_lm_head is None
    assert rel_err(packed, torch.cat(prefill_logits(model, prompts))) < 1e-5
