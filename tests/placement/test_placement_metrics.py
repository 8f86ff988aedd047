"""The placement metric follows rebalancing; routing series count MoE layers only."""

from __future__ import annotations

import asyncio

from server.config import EngineConfig
from server.engine.factory import build_native_core
from server.engine.native.async_engine import AsyncEngine
from server.engine.request import EngineRequest, SamplingParams
from server.metrics import ServerMetrics


def test_placement_metric_refreshed_after_rebalance(tiny_mixtral):
    cfg = EngineConfig(model=tiny_mixtral, dtype="float32", expert_devices=("cpu:0", "cpu:1"),
                       expert_placement="balanced", rebalance_interval=2, num_kv_blocks=128, block_size=8)
    core, info = build_native_core(cfg, progress=False)
    engine = AsyncEngine(core, info)
    metrics = ServerMetrics(info.name, "native", num_layers=info.num_moe_layers, num_experts=info.num_experts)
    seen = []
    engine.add_stat_logger(metrics.stat_logger)
    engine.add_placement_listener(metrics.set_placement)
    engine.add_placement_listener(seen.append)
    metrics.set_placement(engine.placement())

    async def main():
        await engine.start()
        # a skewed workload: the same prompt over and over routes to the same experts
        for i in range(6):
            async for _ in engine.generate(EngineRequest(f"r{i}", [5, 6, 7, 8] * 8,
                                                         SamplingParams(max_tokens=12, ignore_eos=True))):
                pass
        await engine.shutdown()

    asyncio.run(main())
    body = metrics.render()[0].decode()
    placed = [ln for ln in body.splitlines() if ln.startswith("moe_expert_placement{")]
    assert placed, "placement series missing"
    assert seen, "the skewed load should have triggered a rebalance"
    latest = {(str(r[0]), str(r[1]), r[2]) for r in seen[-1].rows}  # experts moved: export the latest
    exported = set()
    for ln in placed:
        labels = dict(kv.split("=", 1) for kv in ln[ln.index("{") + 1 : ln.index("}")].split(","))
        exported.add((labels["layer"].strip('"'), labels["expert"].strip('"'), labels["device"].strip('"')))
    assert exported == latest
    assert info.num_moe_layers == 2
