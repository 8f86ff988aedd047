"""The executor: placed experts give the single-device outputs, for every policy, replica and tier."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models.simple_runner import greedy_generate, prefill_logits
from models.kernels.fused_moe import moe_loop
from models.placement.executor import build_layer_state, run_layer, torch_device
from server.engine.native.placement.manager import NEVER_FETCH, PlacementManager, budget_slots
from models.placement.planner import place

from .conftest import PROMPTS

CPU2 = ["cpu:0", "cpu:1"]
CPU3 = ["cpu:0", "cpu:1", "cpu:2"]


def assert_same_as_reference(model, reference) -> None:
    ref_logits, ref_tokens = reference
    got = prefill_logits(model, PROMPTS)
    for a, b in zip(got, ref_logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert greedy_generate(model, PROMPTS, 8) == ref_tokens


@pytest.mark.parametrize("policy", ["contiguous", "round_robin", "balanced"])
@pytest.mark.parametrize("devices, redundant", [(["cpu"], 0), (CPU2, 0), (CPU2, 3), (CPU3, 4)])
def test_every_policy_matches_single_device(model, reference, policy, devices, redundant):
    loads = np.random.default_rng(0).pareto(1.0, (2, 8)) * 10  # skewed: replicas go to hot experts
    mgr = PlacementManager(model, devices, policy=policy, num_redundant=redundant, initial_loads=loads)
    assert mgr.placement.num_replicas_used == 2 * redundant
    assert {g.name for s in mgr.executor.states.values() for g in s.groups} == set(devices)
    assert_same_as_reference(model, reference)


@pytest.mark.parametrize("threshold", [NEVER_FETCH, 1, 3])
def test_cpu_tier_matches_single_device(model, reference, threshold):
    """Budget of 2 experts per device: 4 experts on the host tier, computed there or copied in."""
    mgr = PlacementManager(model, CPU2, budget="2", fetch_threshold=threshold)
    assert mgr.placement.host == "cpu"
    assert all(len(layer.device_slots("cpu")) == 4 for layer in mgr.placement.layers)
    assert_same_as_reference(model, reference)


def test_cpu_tier_with_replicas_and_bytes_budget(model, reference):
    per_layer = 3 * 64 * 96 * 4  # one tiny expert in float32
    assert budget_slots(f"{per_layer * 2 * 5}B", per_layer, 2) == 5
    mgr = PlacementManager(model, CPU2, budget=f"{per_layer * 2 * 5}B", num_redundant=1, policy="balanced")
    assert mgr.capacity == [5, 5] and mgr.placement.host is None  # 10 slots: 8 experts + 1 replica fit
    assert mgr.placement.num_replicas_used == 2
    assert_same_as_reference(model, reference)


def test_rebalance_keeps_outputs_and_old_state_stays_usable(model, reference):
    mgr = PlacementManager(model, CPU2, num_redundant=2)
    layer0 = mgr.layer_ids[0]
    old_state = mgr.executor.states[layer0]
    old_w13 = [g.w13.clone() for g in old_state.groups]
    hot = np.ones((2, 8))
    hot[:, 5] = 50.0
    assert mgr.rebalance(hot)
    assert mgr.num_rebalances == 1 and mgr.experts_moved > 0
    assert mgr.placement.layers[0].num_replicas(5) == 2
    assert_same_as_reference(model, reference)
    # a pass that started with the old state (in-flight) still computes correctly: it was not mutated
    assert all(torch.equal(g.w13, w) for g, w in zip(old_state.groups, old_w13))
    x = torch.randn(5, 64)
    ids = torch.randint(0, 8, (5, 2))
    w = torch.rand(5, 2)
    torch.testing.assert_close(run_layer(old_state, x, ids, w), run_layer(mgr.executor.states[layer0], x, ids, w))
    assert not mgr.rebalance(hot)  # already balanced for these loads: nothing moves
    assert mgr.num_skipped == 1


def test_replicas_share_tokens_evenly_and_deterministically():
    plan = place("contiguous", np.ones((1, 4)), CPU2, [3, 3], 2).layers[0]  # experts 0 and 2 replicated
    w13, w2 = torch.randn(4, 6, 3), torch.randn(4, 3, 3)
    state, copied = build_layer_state(plan, w13, w2, torch.device("cpu"), moe_loop)
    assert copied == 6
    ids = torch.tensor([[0, 1], [0, 2], [3, 0], [0, 1], [2, 0], [0, 3], [1, 2]])  # [T, k]
    slots = state.assign(ids)
    assert torch.equal(slots, state.assign(ids))
    zero_slots = slots[ids.reshape(-1) == 0].tolist()
    assert sorted(zero_slots.count(s) for s in set(zero_slots)) == [3, 3]  # 6 pairs over 2 replicas
    assert len({plan.physical[s].device for s in zero_slots}) == 2
    assert plan.num_replicas(2) == 2  # expert 1's device was full: its replica went to expert 2
    two_slots = slots[ids.reshape(-1) == 2].tolist()  # 3 pairs over 2 replicas: 2 and 1
    assert sorted(two_slots.count(s) for s in set(two_slots)) == [1, 2]


def test_single_pairs_do_not_all_go_to_replica_zero():
    """Decode-sized batches: which replica takes an expert's lone pair follows the token."""
    plan = place("contiguous", np.ones((1, 4)), CPU2, [3, 3], 2).layers[0]
    state, _ = build_layer_state(plan, torch.randn(4, 6, 3), torch.randn(4, 3, 3), torch.device("cpu"), moe_loop)
    used = {int(state.assign(torch.tensor([[2, 3]] * t + [[0, 1]]))[-2]) for t in range(4)}
    assert used == set(plan.replicas[0])


def test_device_tokens_count_every_pair(model):
    routing = torch.randint(0, 8, (13, 2, 2))  # [T, layers, k]
    for kwargs, names in (({"budget": "2"}, set(CPU3) | {"cpu"}), ({"num_redundant": 4}, set(CPU3))):
        for block in model.moe_blocks():
            block.executor = None
        mgr = PlacementManager(model, CPU3, policy="balanced", **kwargs)
        counts = mgr.device_tokens(routing)
        assert set(counts) == names
        assert sum(counts.values()) == routing.numel()


def test_torch_device_names():
    assert torch_device("cpu:3") == torch.device("cpu") == torch_device("cpu")
    with pytest.raises(ValueError, match="virtual CPU"):
        torch_device("cpu:x")
    with pytest.raises(ValueError):
        torch_device("bogus:0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            torch_device("cuda:0")


def test_config_errors(model):
    with pytest.raises(ValueError, match="'cpu' cannot also"):
        PlacementManager(model, ["cpu", "cpu:1"], budget="2")
    with pytest.raises(ValueError, match="holds no expert"):
        PlacementManager(model, CPU2, budget="1KiB")
    with pytest.raises(ValueError, match="expected a count"):
        PlacementManager(model, CPU2, budget="lots")
    with pytest.raises(ValueError, match="redundant need 10"):
        PlacementManager(model, CPU2, num_redundant=2, capacity=[4, 4])
    with pytest.raises(ValueError, match="redundant need 9"):
        PlacementManager(model, CPU2, num_redundant=1, budget="3")
    for block in model.moe_blocks():  # a failed build installs nothing
        assert block.executor is None


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs CUDA")
def test_cuda_devices_match(tiny_mixtral):
    from models import load_model

    model = load_model(tiny_mixtral, dtype="float32", device="cuda:0", progress=False)
    ref = prefill_logits(model, PROMPTS)
    n = torch.cuda.device_count()
    devices = [f"cuda:{i % n}" for i in range(min(n, 2))] if n > 1 else ["cuda:0"]
    PlacementManager(model, devices, budget="3", num_redundant=1, policy="balanced", fetch_threshold=2)
    for a, b in zip(prefill_logits(model, PROMPTS), ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
