"""oneDNN-packed CPU linears: same results as F.linear, re-packed when the weight changes, and
the model-level switch (packed vs plain) gives the same logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import load_model
from models.generate import prefill_logits
from models.kernels import KernelConfig
from models.kernels.cpu_linear import PackedWeight, packed_linear, packing_available
from tests.models.kernels.conftest import rel_err

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize("rows", [0, 1, 7, 64])
def test_packed_linear_matches_linear(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 48, generator=g)
    b = torch.randn(96, generator=g)
    x = torch.randn(rows, 48, generator=g)
    pw = PackedWeight(w)
    assert packed_linear(x, pw, b).shape == (rows, 96)
    if rows:
        assert rel_err(packed_linear(x, pw, b), F.linear(x, w, b)) < 1e-6


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
