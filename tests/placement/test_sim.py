"""The placement simulator: synthetic traces, policies ranked as expected, exact replica accounting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loadtest.benches import placement_sim
from models.kernels.fused_moe import moe_loop
from models.placement.executor import PlacedExperts, build_layer_state
from models.placement.planner import place
from server.engine.native.placement.trace import read_trace


def test_synthetic_zipf_ranks_policies(tmp_path, capsys):
    out = tmp_path / "syn.jsonl"
    _, results = placement_sim.simulate(["--synthetic", "zipf:1.2", "--devices", "4", "--experts", "16",
                                         "--layers", "3", "--steps", "30", "--tokens", "64", "--save-trace", str(out), "--no-progress"])
    by = {r.policy: r for r in results}
    assert set(by) == {"contiguous", "round_robin", "balanced", "balanced+4"}
    assert by["balanced"].balancedness_total >= max(by["contiguous"].balancedness_total,
                                                    by["round_robin"].balancedness_total) - 1e-9
    assert by["balanced+4"].balancedness_total > by["balanced"].balancedness_total
    assert by["balanced+4"].replicas == 12
    assert all(r.total_pairs == 30 * 64 * 3 * 2 for r in results)
    table = capsys.readouterr().out
    assert "| policy | balancedness (per step)" in table and "| balanced+4 |" in table
    header, _ = read_trace(str(out))  # the saved synthetic trace replays identically
    assert (header.num_layers, header.num_experts, header.top_k) == (3, 16, 2)
    _, again = placement_sim.simulate(["--trace", str(out), "--devices", "4", "--no-progress"])
    assert [r.balancedness_step for r in again] == pytest.approx([r.balancedness_step for r in results])


def test_online_mode_with_drift_reports_moves():
    _, results = placement_sim.simulate(["--synthetic", "zipf:1.5", "--devices", "2", "--experts", "8",
                                         "--layers", "2", "--steps", "40", "--tokens", "32", "--drift", "10",
                                         "--rebalance-interval", "5", "--no-progress"])
    assert results[2].rebalances >= 1 and results[2].moved > 0


def test_simulated_device_loads_match_the_executor():
    """The simulator's even replica split is what the executor does, up to one pair per replica."""
    loads = np.array([[50.0, 1, 1, 9, 1, 1, 30, 1]] * 2)
    placement = place("balanced", loads, ["cpu:0", "cpu:1", "cpu:2"], [4, 4, 4], 4)
    ex = PlacedExperts([0, 1])
    for li in range(2):
        state, _ = build_layer_state(placement.layers[li], torch.zeros(8, 2, 1), torch.zeros(8, 1, 1),
                                     torch.device("cpu"), moe_loop)
        ex.swap(li, state)
    routing = torch.randint(0, 8, (37, 2, 2))
    routing[::2, :, 0] = 0  # a hot expert
    got = ex.device_tokens(routing, placement, "cpu")
    counts = np.stack([np.bincount(routing[:, li].reshape(-1).numpy(), minlength=8) for li in range(2)])
    sim = placement_sim._Layout(placement).device_counts(counts).sum(axis=0)
    assert sum(got.values()) == routing.numel() == pytest.approx(sim.sum())
    slack = placement.num_replicas_used + 2 * 2  # at most one pair per replica, per layer
    assert all(abs(got[d] - s) <= slack for d, s in zip(placement.all_devices, sim))


def test_bad_synthetic_spec():
    with pytest.raises(ValueError, match="unknown synthetic"):
        placement_sim.simulate(["--synthetic", "pareto:2", "--no-progress"])
