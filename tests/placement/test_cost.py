"""The host-tier cost model and budget parsing."""

from __future__ import annotations

import pytest
import torch

from server.engine.native.placement.cost import HostCost, measure_cpu_flops
from server.engine.native.placement.manager import budget_slots

MIXTRAL = (4096, 14336, 2)  # hidden, intermediate, bytes per weight (bf16)


def test_fetch_threshold_follows_the_cost_model():
    server = HostCost(cpu_flops=2e12, dram_bytes_per_s=200e9, link_bytes_per_s=25e9, link_measured=False)
    n = server.fetch_threshold(*MIXTRAL)
    assert n == 80  # ~ b * cpu_flops / (2 * link) = 2 * 2e12 / 5e10
    assert server.cpu_seconds(n, *MIXTRAL, 2) >= server.fetch_seconds(*MIXTRAL) > server.cpu_seconds(n - 1, *MIXTRAL, 2)
    faster_link = HostCost(2e12, 200e9, 50e9, False)
    assert faster_link.fetch_threshold(*MIXTRAL) < n
    slow_host = HostCost(1e11, 15e9, 25e9, False)  # weights stream slower than the link: always copy
    assert slow_host.fetch_threshold(*MIXTRAL) == 1
    # a CPU tier in int4 (0.5625 bytes per weight) reads 3.6x fewer bytes than the bf16 it copies in:
    # on the slow host the CPU now wins for small token counts (bandwidth-bound there); the
    # server's threshold is where its CPU is compute-bound, which the format does not change
    assert slow_host.fetch_threshold(*MIXTRAL, cpu_wbytes=0.5625) == 4
    assert server.fetch_threshold(*MIXTRAL, cpu_wbytes=0.5625) == n


def test_cpu_measurement_is_positive():
    assert measure_cpu_flops(64, 96, torch.float32, tokens=8, reps=1) > 0


@pytest.mark.parametrize("budget, slots", [("4", 4), (4, 4), ("1KiB", 1), ("2.5kib", 2), ("3000B", 2), ("2e3b", 1)])
def test_budget_slots(budget, slots):
    assert budget_slots(budget, expert_bytes=512, num_moe_layers=2) == slots


@pytest.mark.parametrize("bad", ["", "4 experts", "-2GiB", "2XB"])
def test_budget_slots_rejects(bad):
    with pytest.raises(ValueError, match="gpu-expert-budget"):
        budget_slots(bad, expert_bytes=512, num_moe_layers=2)
