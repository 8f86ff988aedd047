"""The planner: pure, deterministic, balanced, capacity-respecting, strict about its inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from models.placement import Placement, balancedness_of, default_capacity, place, plan

DEV2 = ["cuda:0", "cuda:1"]
DEV4 = [f"cuda:{i}" for i in range(4)]


def check_valid(p: Placement, capacity, loads) -> None:
    """Every logical expert has a copy; capacity respected; replicas on distinct devices."""
    for layer in p.layers:
        assert sorted({q.logical for q in layer.physical}) == list(range(loads.shape[1]))
        for d, cap in zip(p.devices, capacity):
            assert len(layer.device_slots(d)) <= cap
        for e in range(layer.num_logical):
            devs = [layer.physical[s].device for s in layer.replicas[e]]
            assert len(devs) == len(set(devs))


@pytest.mark.parametrize("devices", [DEV2, DEV4, [f"cuda:{i}" for i in range(8)]])
def test_uniform_loads_contiguous_is_perfectly_balanced(devices):
    loads = np.full((3, 8), 10.0)
    p = place("contiguous", loads, devices, default_capacity(8, 0, len(devices)), 0)
    assert p.balancedness(loads) == pytest.approx(1.0)
    per = 8 // len(devices)
    for d, name in enumerate(devices):  # equal contiguous ranges
        assert p.layers[0].device_logicals(name) == tuple(range(d * per, (d + 1) * per))


def test_round_robin_layout():
    p = place("round_robin", np.ones((1, 8)), DEV4, [2] * 4, 0)
    assert [p.layers[0].device_logicals(d) for d in DEV4] == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_hot_expert_gets_replicas_and_better_balance():
    loads = np.ones((2, 8))
    loads[:, 3] = 30.0  # one very hot expert
    without = plan(loads, DEV4, default_capacity(8, 0, 4), 0)
    with_r = plan(loads, DEV4, default_capacity(8, 3, 4), 3)
    for layer in with_r.layers:
        assert layer.num_replicas(3) == 4  # every redundant slot went to the hot expert
        assert {layer.physical[s].device for s in layer.replicas[3]} == set(DEV4)
    assert with_r.num_replicas_used == 6
    assert without.balancedness(loads) < 0.5
    assert with_r.balancedness(loads) > without.balancedness(loads) + 0.3
    assert with_r.balancedness(loads) > 0.9


def test_replicas_go_to_load_per_replica_order():
    loads = np.array([[40.0, 20.0, 1.0, 1.0]])
    p = plan(loads, DEV4, [3] * 4, 3)  # 40 -> 20,20 ; then 20 vs 20: lowest index first -> 40 gets a third
    assert [p.layers[0].num_replicas(e) for e in range(4)] == [3, 2, 1, 1]


@pytest.mark.parametrize("seed", range(12))
def test_capacity_respected_and_every_expert_placed(seed):
    rng = np.random.default_rng(seed)
    loads = rng.pareto(1.2, (3, 16)) * 100
    capacity = list(rng.integers(3, 9, size=4))
    while sum(capacity) < 16 + 4:
        capacity[int(rng.integers(4))] += 1
    for policy in ("contiguous", "round_robin", "balanced"):
        p = place(policy, loads, DEV4, capacity, 4)
        check_valid(p, capacity, loads)


@pytest.mark.parametrize("seed", range(12))
def test_balanced_never_worse_than_static_policies(seed):
    loads = np.random.default_rng(seed).pareto(1.0, (2, 16)) * 100
    cap = default_capacity(16, 0, 4)
    b = plan(loads, DEV4, cap, 0).balancedness(loads)
    for policy in ("contiguous", "round_robin"):
        assert b >= place(policy, loads, DEV4, cap, 0).balancedness(loads) - 1e-9


def test_balanced_matches_brute_force_on_small_cases():
    for seed in range(40):
        loads = np.random.default_rng(seed).pareto(1.0, (1, 6)) + 0.01
        got = plan(loads, DEV2, [3, 3], 0).balancedness(loads)
        best = max(balancedness_of(np.array([loads[0, list(c)].sum(), loads[0].sum() - loads[0, list(c)].sum()]))
                   for c in itertools.combinations(range(6), 3))
        assert got == pytest.approx(best)


def test_deterministic_and_input_untouched():
    loads = np.random.default_rng(3).pareto(1.0, (4, 32)) * 10
    before = loads.copy()
    a = plan(loads, DEV4, default_capacity(32, 4, 4), 4)
    b = plan(loads.tolist(), list(DEV4), default_capacity(32, 4, 4), 4)
    assert a == b and a.rows() == b.rows()
    assert np.array_equal(loads, before)


def test_host_tier_keeps_the_hottest_on_devices():
    loads = np.array([[1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0]])
    p = plan(loads, DEV2, [2, 2], 2, host="cpu")
    layer = p.layers[0]
    assert set(layer.device_logicals("cpu")) == {0, 2, 4, 6}
    assert set(layer.device_logicals("cuda:0") + layer.device_logicals("cuda:1")) == {1, 3, 5, 7}
    assert p.num_replicas_used == 0  # no slot left for replicas
    assert p.host_fraction(loads) == pytest.approx(10 / 40)
    spare = plan(loads, DEV2, [5, 5], 2, host="cpu")  # everything fits: replicas of the hottest, no host use
    assert spare.host_fraction(loads) == 0 and spare.layers[0].num_replicas(1) == 2


@pytest.mark.parametrize("args, match", [
    ((np.ones(8), DEV2, [4, 4], 0), "num_layers, num_experts"),
    ((np.ones((1, 0)), DEV2, [4, 4], 0), "non-empty"),
    ((-np.ones((1, 8)), DEV2, [4, 4], 0), ">= 0"),
    ((np.full((1, 8), np.nan), DEV2, [4, 4], 0), "finite"),
    ((np.ones((1, 8)), [], [], 0), "at least one device"),
    ((np.ones((1, 8)), ["cuda:0", "cuda:0"], [4, 4], 0), "distinct"),
    ((np.ones((1, 8)), DEV2, [4], 0), "2 devices"),
    ((np.ones((1, 8)), DEV2, [4, -1], 0), "integers >= 0"),
    ((np.ones((1, 8)), DEV2, [4.5, 4], 0), "integers >= 0"),
    ((np.ones((1, 8)), DEV2, [4, 4], -1), "num_redundant"),
    ((np.ones((1, 8)), DEV2, [4, 4], 1), "need 9 slots"),
    ((np.ones((1, 8)), DEV2, [3, 3], 0), "need 8 slots"),
    ((np.ones((1, 4)), DEV2, [9, 9], 5), "at most 1 extra"),
])
def test_invalid_inputs_rejected(args, match):
    with pytest.raises(ValueError, match=match):
        plan(*args)


def test_invalid_policy_and_host():
    with pytest.raises(ValueError, match="unknown placement policy"):
        place("random", np.ones((1, 8)), DEV2, [4, 4], 0)
    with pytest.raises(ValueError, match="host tier"):
        plan(np.ones((1, 8)), ["cpu", "cuda:0"], [4, 4], 0, host="cpu")


def test_placement_model_validation():
    from models.placement import LayerPlan, PhysicalExpert

    with pytest.raises(ValueError, match="no physical copy"):
        LayerPlan(2, (PhysicalExpert(0, "a", 0),))
    with pytest.raises(ValueError, match="replica indices"):
        LayerPlan(1, (PhysicalExpert(0, "a", 1),))
    with pytest.raises(ValueError, match="two replicas on one device"):
        LayerPlan(1, (PhysicalExpert(0, "a", 0), PhysicalExpert(0, "a", 1)))
    with pytest.raises(ValueError, match="unknown device"):
        Placement(("b",), (LayerPlan(1, (PhysicalExpert(0, "a", 0),)),))


def test_replanning_with_previous_keeps_experts_in_place():
    rng = np.random.default_rng(7)
    loads = rng.pareto(1.0, (4, 32)) * 10
    first = plan(loads, DEV4, default_capacity(32, 4, 4), 4)
    drifted = loads * rng.uniform(0.8, 1.25, loads.shape)
    fresh = plan(drifted, DEV4, default_capacity(32, 4, 4), 4)
    sticky = plan(drifted, DEV4, default_capacity(32, 4, 4), 4, previous=first)
    assert sticky.balancedness(drifted) == pytest.approx(fresh.balancedness(drifted))
    assert sticky.moved_experts(first) <= fresh.moved_experts(first)
    assert plan(loads, DEV4, default_capacity(32, 4, 4), 4, previous=first).moved_experts(first) == 0
