"""The C ops for the decode step's norms and rotary + KV store (csrc/norm_rope_cpu.c) against the
layers' PyTorch code, and a model with them (the default float32 CPU plan) against the PyTorch
paths (`--fused-ops torch`)."""

from __future__ import annotations

import pytest
import torch

from models import load_model
from models.kernels.flags import KernelFlags
from models.layers.norm import RMSNorm
from models.layers.rotary import RotaryEmbedding
from tests.conftest import BUNDLED
from tests.models.kernels.conftest import rel_err, rope_reference
from tests.models.kernels.test_quant import needs_kernels
from tests.models.simple_runner import greedy_generate, prefill_logits


@pytest.fixture(autouse=True)
def _kernels():
    needs_kernels()


def test_rmsnorm_with_and_without_residual():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data.copy_(torch.randn(96, generator=g) * 0.1 + 1)
    x = torch.randn(7, 96, generator=g) * 3
    r = torch.randn(7, 96, generator=g)
    out, total = torch.ops.moe_serve.add_rmsnorm_cpu(x, r, norm.weight, norm.eps)
    assert torch.equal(total, x + r)
    assert rel_err(out, norm(x + r)) < 1e-6
    assert rel_err(torch.ops.moe_serve.rmsnorm_cpu(x, norm.weight, norm.eps), norm(x)) < 1e-6
    # rows of a wider tensor (a view with a row stride): each row alone, as a batch of one
    wide = torch.randn(7, 200, generator=g)[:, 50:146]
    assert rel_err(torch.ops.moe_serve.rmsnorm_cpu(wide, norm.weight, norm.eps), norm(wide)) < 1e-6
    one = torch.ops.moe_serve.rmsnorm_cpu(x[3:4].clone(), norm.weight, norm.eps)
    assert torch.equal(one[0], torch.ops.moe_serve.rmsnorm_cpu(x, norm.weight, norm.eps)[3])  # batch invariant


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "head-norm"])
def test_rope_write_kv(qk_norm):
    g = torch.Generator().manual_seed(1)
    H, KVH, D, T = 6, 2, 32, 5
    rot = RotaryEmbedding(D, 10000.0)
    rot.reset_parameters()
    cos, sin = rot.cos_sin(torch.tensor([0, 3, 7, 100, 4]), torch.float32)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=g)
    k_cache = torch.full((10, 4, KVH, D), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.tensor([1, 5, 9, 22, 39])
    qn, kn = RMSNorm(D, 1e-6), RMSNorm(D, 1e-6)
    qn.weight.data.copy_(torch.randn(D, generator=g) * 0.1 + 1)
    kn.weight.data.copy_(torch.randn(D, generator=g) * 0.1 + 1)
    q_ref, k_ref, v_ref = rope_reference(qkv, cos, sin, H, KVH, D, qn if qk_norm else None, kn if qk_norm else None)
    q = torch.ops.moe_serve.rope_write_kv_cpu(qkv, cos, sin, k_cache, v_cache, slots, H, KVH, D,
                                              qn.weight if qk_norm else None, kn.weight if qk_norm else None, 1e-6)
    tol = 1e-6 if qk_norm else 0.0  # the rotation alone rounds as apply_rotary does: equal
    assert rel_err(q, q_ref) <= tol
    assert rel_err(k_cache.view(-1, KVH, D)[slots], k_ref) <= tol
    assert torch.equal(v_cache.view(-1, KVH, D)[slots], v_ref)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[slots] = False
    assert k_cache.view(-1, KVH, D)[untouched].isnan().all() and v_cache.view(-1, KVH, D)[untouched].isnan().all()


def test_rope_write_kv_refuses_a_slot_outside_the_cache():
    H, KVH, D = 2, 1, 8
    cache = torch.zeros(2, 4, KVH, D)
    cos, sin = torch.ones(1, 1, D), torch.zeros(1, 1, D)
    with pytest.raises(IndexError, match="out of the cache's range"):
        torch.ops.moe_serve.rope_write_kv_cpu(torch.zeros(1, (H + 2 * KVH) * D), cos, sin, cache, cache.clone(),
                                              torch.tensor([8]), H, KVH, D, None, None, 1e-6)
    assert not cache.any()  # nothing written
    with pytest.raises(RuntimeError, match="qkv must be"):
        torch.ops.moe_serve.rope_write_kv_cpu(torch.zeros(1, 7), cos, sin, cache, cache.clone(), torch.tensor([0]),
                                              H, KVH, D, None, None, 1e-6)


def test_a_model_with_the_c_ops_matches_the_pytorch_paths():
    """The default float32 CPU plan runs the C ops; the same weights on `--fused-ops torch`."""
    prompts = [[5, 9, 23, 7, 81, 3], [11, 2, 40]]
    out = {}
    for name in ("auto", "torch"):
        model = load_model(str(BUNDLED), dtype="float32", kernels=KernelFlags(fused_ops=name))
        plan = model.kernel_plan
        assert all(lk.fused_rope and lk.fused_norms for lk in plan.layers) == (name == "auto")
        assert plan.to_dict()["fused_ops"] == ("cpu" if name == "auto" else None)
        out[name] = (prefill_logits(model, prompts), greedy_generate(model, prompts, 24))
    for a, b in zip(out["auto"][0], out["torch"][0]):
        assert rel_err(a, b) < 1e-5
    assert out["auto"][1] == out["torch"][1]
