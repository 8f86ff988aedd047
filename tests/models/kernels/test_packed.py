"""Packed CPU linears (models/kernels/packed.py: the C panel kernel, oneDNN's layout): the same
results as F.linear, re-packed when the weight changes, batch and thread invariant; the plan's
packed and plain layouts give the same model logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import load_model
from tests.models.simple_runner import prefill_logits
from models.kernels import cpu_ops
from models.kernels.flags import KernelFlags
from models.kernels.packed import PackedWeight, packed_linear
from models.kernels.plan import LinearLayout, onednn_available
from tests.conftest import skip_or_fail
from tests.models.kernels.conftest import rel_err

MIN_MACS_PER_THREADING = 1 << 24  # kMinMacsPerThreading in csrc/ops.cpp: past it the panels use every thread


def needs_panels():
    if cpu_ops.load() is None:
        skip_or_fail("the C panel kernel is not built here (no C compiler or no AVX2 + FMA)")


LAYOUTS = [pytest.param(LinearLayout.PANELS, id="panels"), pytest.param(LinearLayout.ONEDNN, id="onednn")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [0, 1, 7, 13, 64])
def test_packed_linear_matches_linear(rows, layout):
    if layout == LinearLayout.PANELS:
        needs_panels()
    elif not onednn_available():
        pytest.skip("no oneDNN in this torch build")
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 48, generator=g)
    b = torch.randn(96, generator=g)
    x = torch.randn(rows, 48, generator=g)
    pw = PackedWeight(w, layout)
    assert packed_linear(x, pw, b).shape == (rows, 96)
    if rows:
        assert rel_err(packed_linear(x, pw, b), F.linear(x, w, b)) < 1e-6
        assert rel_err(packed_linear(x, pw), F.linear(x, w)) < 1e-6


def test_panels_refuse_shapes_they_do_not_serve():
    needs_panels()
    with pytest.raises(RuntimeError, match="multiple of 16"):
        PackedWeight(torch.randn(40, 16), LinearLayout.PANELS).get()  # 40 rows: not whole panels
    with pytest.raises(ValueError, match="no packed copy"):
        PackedWeight(torch.randn(32, 16), LinearLayout.PLAIN)


def test_panel_linear_is_batch_and_thread_invariant():
    """A row's output does not depend on the other rows nor on the thread count (the LM head's
    logits, hence greedy tokens, do not change with the batch a request lands in)."""
    needs_panels()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 64, generator=g)
    rows = MIN_MACS_PER_THREADING // (1024 * 64) + 3  # above the threading bound
    x = torch.randn(rows, 64, generator=g)
    pw = PackedWeight(w, LinearLayout.PANELS)
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_packed_weight_repacks_after_an_in_place_change(layout):
    if layout == LinearLayout.PANELS:
        needs_panels()
    elif not onednn_available():
        pytest.skip("no oneDNN in this torch build")
    w = torch.randn(32, 16)
    stacked = torch.randn(3, 32, 16)
    pw, pe = PackedWeight(w, layout), PackedWeight(stacked, layout, index=2)
    x = torch.randn(4, 16)
    packed_linear(x, pw), packed_linear(x, pe)
    w.mul_(2.0)  # e.g. weights reloaded in place
    stacked[2].add_(1.0)
    assert rel_err(packed_linear(x, pw), F.linear(x, w)) < 1e-6
    assert rel_err(packed_linear(x, pe), F.linear(x, stacked[2])) < 1e-6


def test_model_packed_and_plain_agree(family_checkpoint):
    path, _ = family_checkpoint("mixtral")
    model = load_model(path, dtype="float32", device="cpu", progress=False,
                       kernels=KernelFlags(cpu_linear="packed", moe="loop"))
    assert model.packed_lm_head is not None and all(b.packed_w13 for b in model.moe_blocks())
    prompts = [[5, 9, 23, 7, 81, 3], [11, 2, 40]]
    packed = torch.cat(prefill_logits(model, prompts))
    model.plan_kernels(KernelFlags(cpu_linear="plain", moe="loop"))
    assert model.packed_lm_head is None and all(b.packed_w13 is None for b in model.moe_blocks())
    assert rel_err(packed, torch.cat(prefill_logits(model, prompts))) < 1e-5
