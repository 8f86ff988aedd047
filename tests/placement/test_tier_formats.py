"""The CPU expert tier in its formats (`--cpu-expert-format`): bf16 weights with float32 math (the
C bf16 experts kernel, in place on a bf16 model), int8 and int4 (the quantized experts kernel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.kernels import cpu_ops
from models.kernels import quant as Q
from models.kernels.fused_moe import moe_loop
from models.kernels.packed import moe_cpu
from models.kernels.quant import QuantWeight, quant_moe
from models.placement.executor import SYNC_FREE_TOKENS, build_layer_state, run_layer, tier_expert_bytes, tier_format
from models.placement.planner import place
from server.engine.native.placement.manager import PlacementManager
from tests.models.simple_runner import greedy_generate, prefill_logits

from .conftest import PROMPTS
from .test_executor import CPU2, HostReads

H, INTER, E = 64, 96, 8  # the tiny Mixtral's experts
ERRORS: dict[str, float] = {}  # format -> relative logit error (test_quantized_tier)


@pytest.fixture(autouse=True, scope="module")
def kernels():
    assert cpu_ops.load() is not None, "the C kernels must build here (the CPU tier's formats need them)"


@pytest.fixture(autouse=True)
def float32_math():
    """The bf16 kernels in float32 math: on an AVX512-BF16 CPU their best level rounds the
    activations to bf16 (VDPBF16PS), tested against its own reference per level in
    tests/models/kernels/test_bf16_weights.py; these tests compare the tier with float32 math on
    the same bf16 weights exactly, at the AVX-512F level there (set per test: loading a model
    sets MOE_SERVE_CPU_ISA's level)."""
    forced = Q.bf16_isa()[1] == "avx512bf16"
    if forced:
        Q.set_isa("avx512")
    yield
    if forced:
        Q.set_isa(None)


def reference_f64(x, w13, w2, ids, w):
    """sum_k w * Expert(x) in float64 over the weights as given (e.g. bf16-rounded)."""
    return moe_loop(x.double(), w13.double(), w2.double(), ids, w.double())


def tier_experts(mgr, li: int) -> list[int]:
    return sorted(mgr.placement.layers[li].device_logicals("cpu"))


@pytest.mark.parametrize("E_, H_, I_, T, k", [(8, 64, 96, 1, 2), (8, 64, 96, 16, 2), (5, 128, 32, 7, 3)])
def test_bf16_kernel_matches_float64_reference(E_, H_, I_, T, k):
    """bf16 weights, float32 math: the float64 result of the same bf16 weights, and each token's
    result the same bits whatever else is in the batch."""
    gen = torch.Generator().manual_seed(E_ + T)
    w13 = (torch.randn(E_, 2 * I_, H_, generator=gen) * 0.1).bfloat16()
    w2 = (torch.randn(E_, H_, I_, generator=gen) * 0.1).bfloat16()
    x = torch.randn(T, H_, generator=gen)
    ids = torch.stack([torch.randperm(E_, generator=gen)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=gen)
    w[0, -1] = 0.0  # padding (weight 0) adds nothing; the kernel skips it
    y = torch.ops.moe_serve.moe_experts_bf16_cpu(x, ids, w, w13, w2)
    torch.testing.assert_close(y.double(), reference_f64(x, w13, w2, ids, w), atol=2e-6, rtol=1e-5)
    moved = ids.clone()
    moved[0, -1] = (ids[0, -1] + 1) % E_  # a weight-0 pair's expert changes nothing
    assert torch.equal(torch.ops.moe_serve.moe_experts_bf16_cpu(x, moved, w, w13, w2), y)
    alone = torch.ops.moe_serve.moe_experts_bf16_cpu(x[-1:], ids[-1:], w[-1:], w13, w2)
    assert torch.equal(alone, y[-1:])
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.moe_serve.moe_experts_bf16_cpu(x, ids, w, w13.float(), w2)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_kernel_skips_weight_zero_pairs(fmt):
    """The executor pads its buffers with weight-0 pairs: the quantized experts kernel computes
    them not at all (whichever expert they name, the result is the same bits)."""
    gen = torch.Generator().manual_seed(7)
    q13 = QuantWeight.of(torch.randn(E, 2 * INTER, H, generator=gen) * 0.1, fmt)
    q2 = QuantWeight.of(torch.randn(E, H, INTER, generator=gen) * 0.1, fmt)
    x = torch.randn(5, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(5)])
    w = torch.rand(5, 2, generator=gen)
    w[1, 0] = w[3, 1] = 0.0
    y = quant_moe(x, ids, w, q13, q2)
    moved = ids.clone()
    moved[1, 0], moved[3, 1] = (ids[1, 0] + 3) % E, (ids[3, 1] + 5) % E
    assert torch.equal(quant_moe(x, moved, w, q13, q2), y)
    alone = quant_moe(x[1:2], ids[1:2, 1:], w[1:2, 1:], q13, q2)  # token 1 by its other pair only
    assert torch.equal(alone, y[1:2])


def test_tier_format_names():
    assert tier_format("auto", torch.bfloat16) == "bf16"
    assert tier_format("auto", torch.float32) == tier_format("auto", torch.float16) == "float32"
    assert tier_format("int4", torch.float32) == "int4"
    with pytest.raises(ValueError, match="one of auto, float32, bf16, int8, int4"):
        tier_format("fp8", torch.float32)


def test_bf16_tier_matches_bf16_rounded_weights(model, reference, monkeypatch):
    """A float32 model, the CPU tier in bf16: greedy outputs and logits of the same model with the
    tier's experts rounded to bf16 and no placement; the tier holds 2 bytes a weight."""
    ref_logits, _ = reference
    plan = place("contiguous", np.zeros((2, E)), CPU2, [2, 2], 0, host="cpu")
    blocks = sorted(model.moe_blocks(), key=lambda b: b.layer_idx)
    saved = [(b.w13.detach().clone(), b.w2.detach().clone()) for b in blocks]
    with torch.no_grad():
        for li, b in enumerate(blocks):
            tier = list(plan.layers[li].device_logicals("cpu"))
            b.w13[tier] = b.w13[tier].bfloat16().float()
            b.w2[tier] = b.w2[tier].bfloat16().float()
    want_logits, want_tokens = prefill_logits(model, PROMPTS), greedy_generate(model, PROMPTS, 8)
    with torch.no_grad():
        for b, (w13, w2) in zip(blocks, saved):
            b.w13.copy_(w13)
            b.w2.copy_(w2)
    assert any(not torch.equal(a, b) for a, b in zip(want_logits, ref_logits))  # rounding shows

    mgr = PlacementManager(model, CPU2, budget="2", tier_format="bf16")
    assert [tier_experts(mgr, li) for li in range(2)] == [sorted(plan.layers[li].device_logicals("cpu"))
                                                          for li in range(2)]
    assert mgr.tier_info() == {"format": "bf16", "bytes": 2 * 4 * 3 * H * INTER * 2, "in_place": False}
    for st in mgr.executor.states.values():
        bw13, bw2 = st.host.packed.get()
        assert bw13.dtype == torch.bfloat16 and bw13.shape == (4, 2 * INTER, H) and bw2.shape == (4, H, INTER)
    gen = torch.Generator().manual_seed(4)
    cases = [(layer_idx, torch.randn(T, H, generator=gen), torch.randint(0, E, (T, 2), generator=gen),
              torch.rand(T, 2, generator=gen)) for T in (1, 16) for layer_idx in mgr.layer_ids]
    reads = HostReads(monkeypatch)
    with torch.inference_mode():
        for case in cases:  # decode-sized passes: nothing read back to the host
            mgr.executor(*case)
    assert reads.calls == []
    monkeypatch.undo()
    got = prefill_logits(model, PROMPTS)
    for a, b in zip(got, want_logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert greedy_generate(model, PROMPTS, 8) == want_tokens
    assert "CPU expert tier: bf16, 0.3 MiB (a copy)" in model.kernel_plan.table()
    assert model.kernel_plan.to_dict()["cpu_tier"] == mgr.tier_info()
    mgr.close()


def test_bf16_model_tier_computes_the_model_weights_in_place(model):
    """A bf16 model's tier (auto) is its own weights, read in place by the bf16 kernel: no copy."""
    block = next(iter(model.moe_blocks()))
    w13, w2 = block.w13.detach().bfloat16(), block.w2.detach().bfloat16()
    plan = place("contiguous", np.zeros((2, E)), CPU2, [2, 2], 0, host="cpu").layers[0]
    state, _ = build_layer_state(plan, w13, w2, torch.device("cpu"), block.placed_fn, host="cpu")
    tier = state.host
    assert tier.fmt == "bf16" and tier.in_place and tier.nbytes == 4 * 3 * H * INTER * 2
    assert tier.packed.get()[0].data_ptr() == w13.data_ptr() and tier.packed.get()[1].data_ptr() == w2.data_ptr()
    gen = torch.Generator().manual_seed(5)
    T = 6
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(4, generator=gen)[:2] + 4 for _ in range(T)])  # the tier's experts 4-7
    w = torch.rand(T, 2, generator=gen)
    want = reference_f64(x, w13, w2, ids, w)
    torch.testing.assert_close(moe_cpu(x, tier.packed, tier.local[ids], w).double(), want, atol=2e-6, rtol=1e-5)
    got = run_layer(state, x.bfloat16(), ids, w.bfloat16())  # as the bf16 model runs it: bf16 in and out
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    again, _ = build_layer_state(plan, w13, w2, torch.device("cpu"), block.placed_fn, host="cpu", previous=state)
    assert again.host.packed is tier.packed  # a rebalance keeping the tier's experts rebuilds nothing


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_tier(model, reference, monkeypatch, fmt):
    """int8 / int4 tier: decode-sized passes read nothing back and give the devices' float experts
    plus the QuantWeight reference of the tier's experts (the same kernel on the same quantized
    weights); prefill-sized passes the same; logits within a bound of the float model's; the tier
    holds the format's bytes."""
    ref_logits, _ = reference
    mgr = PlacementManager(model, CPU2, budget="2", tier_format=fmt)
    ex = mgr.executor
    per_layer = 4 * tier_expert_bytes(fmt, H, INTER)
    assert mgr.tier_info() == {"format": fmt, "bytes": 2 * per_layer, "in_place": False}
    blocks = {b.layer_idx: b for b in model.moe_blocks()}
    refs = {}
    for li, layer_idx in enumerate(mgr.layer_ids):
        tier = tier_experts(mgr, li)
        src = torch.tensor(tier)
        q13, q2 = (QuantWeight.of(blocks[layer_idx].w13.detach()[src], fmt),
                   QuantWeight.of(blocks[layer_idx].w2.detach()[src], fmt))
        host = ex.states[layer_idx].host
        assert host.fmt == fmt and host.nbytes == q13.nbytes + q2.nbytes == per_layer
        assert torch.equal(host.packed.qw13.q, q13.q) and torch.equal(host.packed.qw2.scales, q2.scales)
        refs[layer_idx] = (tier, q13, q2)

    def want(layer_idx, x, ids, w):
        tier, q13, q2 = refs[layer_idx]
        on_tier = torch.isin(ids, torch.tensor(tier))
        local = torch.tensor([tier.index(e) if e in tier else 0 for e in range(E)])[ids]
        block = blocks[layer_idx]
        dev = moe_loop(x, block.w13.detach(), block.w2.detach(), ids, torch.where(on_tier, 0.0, w))
        return dev + quant_moe(x, local, torch.where(on_tier, w, 0.0), q13, q2)

    gen = torch.Generator().manual_seed(2)
    cases = [(layer_idx, torch.randn(T, H, generator=gen),
              torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)]), torch.rand(T, 2, generator=gen))
             for T in (1, 16) for layer_idx in mgr.layer_ids]
    reads = HostReads(monkeypatch)
    with torch.inference_mode():
        got = [ex(*case) for case in cases]
    assert reads.calls == []
    monkeypatch.undo()
    assert ex._worker is not None  # the tier ran on its thread
    for case, y in zip(cases, got):
        torch.testing.assert_close(y, want(*case), atol=1e-5, rtol=1e-5)

    T = SYNC_FREE_TOKENS + 5  # prefill-sized: the compact dispatch computes the tier in its format too
    layer_idx = mgr.layer_ids[1]
    x = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(T)])
    w = torch.rand(T, 2, generator=gen)
    torch.testing.assert_close(ex(layer_idx, x, ids, w), want(layer_idx, x, ids, w), atol=1e-5, rtol=1e-5)

    # the model's logits: near the float ones (relative norm of the error; a token whose top-2
    # experts flip moves more than the weights' rounding), int4 further than int8
    got, ref = torch.cat(prefill_logits(model, PROMPTS)), torch.cat(ref_logits)
    err = float((got - ref).norm() / ref.norm())
    ERRORS[fmt] = err
    assert 0 < err <= {"int8": 0.06, "int4": 0.25}[fmt], err
    if len(ERRORS) == 2:
        assert ERRORS["int8"] < ERRORS["int4"]
    mgr.close()


def test_tier_format_errors(model):
    with pytest.raises(ValueError, match="one of auto"):
        PlacementManager(model, CPU2, budget="2", tier_format="int2")


def test_rebalance_quantizes_what_enters_the_tier_and_returns_originals(model):
    """Experts moving into an int8 tier are quantized then; experts moving out of it to a device
    get the model's original float weights (the master copy), exactly."""
    from server.engine.stats import RoutingStats

    mgr = PlacementManager(model, CPU2, budget="2", rebalance_interval=4, policy="contiguous", tier_format="int8")
    assert tier_experts(mgr, 0) == [4, 5, 6, 7]
    for _ in range(4):  # 4-7 hot: they move to the devices, 0-3 into the tier
        mgr.on_routing(RoutingStats(2, E, [[10 if e >= 4 else 0 for e in range(E)] for _ in range(2)]))
    assert mgr.num_rebalances == 1 and tier_experts(mgr, 0) == [0, 1, 2, 3]
    for li, block in enumerate(sorted(model.moe_blocks(), key=lambda b: b.layer_idx)):
        state = mgr.executor.states[block.layer_idx]
        for gi, g in enumerate(state.groups):
            if gi == state.host.group:
                continue
            for row, e in enumerate(g.logicals):  # on a device: the original weights
                assert torch.equal(g.w13[row], block.w13.detach()[e]) and torch.equal(g.w2[row], block.w2.detach()[e])
        tier = torch.tensor(tier_experts(mgr, li))
        assert torch.equal(state.host.packed.qw13.q, QuantWeight.of(block.w13.detach()[tier], "int8").q)
        assert torch.equal(state.host.packed.qw2.q, QuantWeight.of(block.w2.detach()[tier], "int8").q)
        assert torch.equal(state.host.local[tier], torch.arange(4))
    assert mgr.info().cpu_tier == {"format": "int8", "bytes": 2 * 4 * tier_expert_bytes("int8", H, INTER),
                                   "in_place": False}
    mgr.close()
