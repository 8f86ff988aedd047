"""The family expert variants in the fused kernels (biases, gpt-oss's clamped SwiGLU, Llama 4's
routing weight on the input) against a float64 reference written from the families' own
formulation, and the fused router (C op, Triton) against `select_experts`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.config import RouterConfig
from models.kernels.fused_moe import ExpertVariant, fused_experts
from models.kernels.packed import PackedExperts
from models.layers.router import select_experts, select_experts_fused
from tests.models.kernels.conftest import DEVICES, rel_err
from tests.models.kernels.test_fused_moe import needs_cpu_kernel

GPT_OSS = ExpertVariant(bias=True, limit=0.7, alpha=1.702)  # a small limit: the clamps bite on these values
LLAMA4 = ExpertVariant(weight_on_input=True)
ALL = ExpertVariant(bias=True, limit=0.7, alpha=1.5, weight_on_input=True)
VARIANTS = {"gpt-oss": GPT_OSS, "llama4": LLAMA4, "all": ALL}


def variant_exact(x, w13, w2, ids, w, v: ExpertVariant) -> torch.Tensor:
    """The experts in float64, per expert over the tokens that chose it (transformers' gpt-oss and
    Llama 4 blocks): biases from the stacks' last column, the clamped SwiGLU, the weight on the
    input or the output."""
    x, w13, w2, w = x.double().cpu(), w13.double().cpu(), w2.double().cpu(), w.double().cpu()
    ids = ids.cpu()
    H = x.shape[1]
    inter = w2.shape[2] - (1 if v.bias else 0)
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        tokens, slots = torch.nonzero(ids == e, as_tuple=True)
        if tokens.numel() == 0:
            continue
        rw = w[tokens, slots, None]
        xe = x[tokens] * rw if v.weight_on_input else x[tokens]
        h = F.linear(xe, w13[e, :, :H], w13[e, :, H] if v.bias else None)
        gate, up = h[:, :inter], h[:, inter:]
        if v.limit is None:
            a = F.silu(gate) * up
        else:
            gate, up = gate.clamp(max=v.limit), up.clamp(-v.limit, v.limit)
            a = (up + 1) * gate * torch.sigmoid(gate * v.alpha)
        y = F.linear(a, w2[e, :, :inter], w2[e, :, inter] if v.bias else None)
        out.index_add_(0, tokens, y if v.weight_on_input else y * rw)
    return out


def make_variant_case(T, H, inter, E, k, v: ExpertVariant, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    extra = 1 if v.bias else 0
    x = torch.randn(T, H, generator=g)
    w13 = torch.randn(E, 2 * inter, H + extra, generator=g) / H**0.5
    w2 = torch.randn(E, H, inter + extra, generator=g) / inter**0.5
    topk_w, ids = torch.softmax(torch.randn(T, E, generator=g), -1).topk(k, dim=-1)
    return x.to(device), w13.to(device), w2.to(device), ids.to(device), topk_w.to(device)


# T, H, I, E, k (C: H, I multiples of 16); the last past CPU_KERNEL_PAIRS_PER_EXPERT pairs per expert
# (the plan keeps variants on the C kernel at every batch size)
SHAPES = [(1, 64, 48, 8, 2), (21, 32, 32, 4, 1), (12, 48, 64, 6, 3), (160, 32, 32, 4, 2)]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("shape", SHAPES, ids=[f"T{s[0]}-E{s[3]}-k{s[4]}" for s in SHAPES])
def test_cpu_kernel_variants_match_reference(name, shape):
    needs_cpu_kernel()
    v = VARIANTS[name]
    x, w13, w2, ids, w = make_variant_case(*shape, v)
    exact = variant_exact(x, w13, w2, ids, w, v)
    packed = PackedExperts(w13, w2, bias=v.bias)
    out = fused_experts(x, w13, w2, ids, w, "cpu", v, packed_experts=packed)
    assert rel_err(out, exact) < 1e-5
    # the loop (the plan's kernel above the C kernel's batch sizes) agrees as well
    assert rel_err(fused_experts(x, w13, w2, ids, w, "loop", v), exact) < 1e-5
    # and the clamp is exercised: the plain SwiGLU gives another answer
    if v.limit is not None:
        plain = variant_exact(x, w13, w2, ids, w, ExpertVariant(bias=v.bias, weight_on_input=v.weight_on_input))
        assert rel_err(plain, exact) > 1e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_variants_match_reference(name, device):
    v = VARIANTS[name]
    x, w13, w2, ids, w = make_variant_case(6, 48, 40, 4, 2, v, device=device)  # I not a multiple of the tile
    out = fused_experts(x, w13, w2, ids, w, "triton", v)
    assert rel_err(out.cpu(), variant_exact(x, w13, w2, ids, w, v)) < 1e-5


def test_variant_kernels_reject_what_they_cannot_run():
    x, w13, w2, ids, w = make_variant_case(2, 32, 16, 4, 2, GPT_OSS)
    with pytest.raises(ValueError, match="expert variants"):
        fused_experts(x, w13, w2, ids, w, "reference", GPT_OSS)


# -- the fused router ---------------------------------------------------------------------------
ROUTERS = {  # name: (E, k, renormalize, RouterConfig, correction bias)
    "mixtral": (8, 2, True, RouterConfig(), False),
    "qwen-no-renorm": (16, 4, False, RouterConfig(), False),
    "gpt-oss": (8, 2, True, RouterConfig(scoring="softmax_topk", bias=True), False),
    "llama4": (4, 1, False, RouterConfig(scoring="sigmoid"), False),
    "deepseek-v3": (16, 4, True, RouterConfig(scoring="sigmoid", correction_bias=True, n_group=4, topk_group=2,
                                               group_score="top2_sum", scaling_factor=2.5), True),
    "deepseek-v2": (12, 3, False, RouterConfig(n_group=3, topk_group=2, scaling_factor=1.5), False),
    "minimax-m2": (8, 2, True, RouterConfig(scoring="sigmoid", correction_bias=True), True),
}


def route_case(name, T=37, device="cpu"):
    E, k, renorm, spec, corr = ROUTERS[name]
    g = torch.Generator().manual_seed(E * 31 + k)
    logits = (torch.randn(T, E, generator=g) * 2).to(device)
    bias = (torch.randn(E, generator=g) * 0.3).to(device) if corr else None
    return logits, k, renorm, spec, bias


def check_same_choice(got, want):
    (gw, gi), (ww, wi) = got, want
    assert gi.dtype == torch.int64 and gw.dtype == torch.float32
    assert torch.equal(gi.cpu(), wi.cpu())
    torch.testing.assert_close(gw.cpu(), ww.cpu(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(ROUTERS))
def test_cpu_router_matches_select_experts(name):
    needs_cpu_kernel()
    logits, k, renorm, spec, bias = route_case(name)
    check_same_choice(select_experts_fused(logits, k, renorm, spec, bias, "cpu"),
                      select_experts(logits, k, renorm, spec, bias))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mixtral", "gpt-oss", "deepseek-v3", "deepseek-v2"])  # the interpreter is slow
def test_triton_router_matches_select_experts(name, device):
    logits, k, renorm, spec, bias = route_case(name, T=5, device=device)
    check_same_choice(select_experts_fused(logits, k, renorm, spec, bias, "triton"),
                      select_experts(logits, k, renorm, spec, bias))


def test_cpu_router_rejects_bad_arguments():
    needs_cpu_kernel()
    with pytest.raises(RuntimeError, match="top_k"):
        torch.ops.moe_serve.moe_route_cpu(torch.randn(2, 4), None, 5, "softmax", True, 0.0, 1, 1, "max", 1.0)
    with pytest.raises(RuntimeError, match="groups"):
        torch.ops.moe_serve.moe_route_cpu(torch.randn(2, 6), None, 2, "softmax", True, 0.0, 4, 2, "max", 1.0)
