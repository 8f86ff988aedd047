"""Placement through the real engine: online rebalancing mid-generation, traces, the simulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from loadtest.benches import placement_sim
from server.engine import LLM, SamplingParams
from server.engine.native.placement.trace import RoutingRecorder
from tests.conftest import RoutingCollector

from .conftest import PROMPTS

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def tokens(llm: LLM) -> list[list[int]]:
    return [r.outputs[0].token_ids for r in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def baseline(tiny_mixtral):
    return tokens(LLM(tiny_mixtral, dtype="float32", max_num_seqs=2))


def test_online_rebalancing_keeps_greedy_tokens(tiny_mixtral, baseline, tmp_path):
    trace = tmp_path / "routing.jsonl"
    llm = LLM(tiny_mixtral, dtype="float32", max_num_seqs=2, expert_devices=("cpu:0", "cpu:1"),
              rebalance_interval=2, num_redundant_experts=2, record_routing=str(trace))
    core = llm.core
    mgr = core.placement_manager
    seen = RoutingCollector()
    core.routing_listeners.append(seen)
    changes = []
    mgr.on_change.append(changes.append)
    assert tokens(llm) == baseline
    assert mgr.num_rebalances >= 1 and mgr.experts_moved > 0 and len(changes) == mgr.num_rebalances
    rows = core.placement_info().rows
    assert {d for _, _, d, _ in rows} == {"cpu:0", "cpu:1"}
    assert len(rows) == 2 * (8 + 2)  # 2 MoE layers x (8 experts + 2 replicas)
    for stats in seen:  # every token-expert computation is attributed to a placed device
        assert set(stats.device_tokens) == {"cpu:0", "cpu:1"}
        assert sum(stats.device_tokens.values()) == int(np.sum(stats.expert_tokens))
    # the trace: a header and one line per step, with exactly the counts the engine reported
    mgr.close()
    lines = trace.read_text().splitlines()
    head = json.loads(lines[0])
    assert head["type"] == "header" and (head["num_layers"], head["num_experts"], head["top_k"]) == (2, 8, 2)
    steps = [json.loads(x) for x in lines[1:]]
    assert len(steps) == mgr.steps == len(seen)
    assert all(np.array_equal(s["expert_tokens"], r.expert_tokens) for s, r in zip(steps, seen))
    # ... and it replays through the simulator, which accounts for every pair
    _, results = placement_sim.simulate(["--trace", str(trace), "--devices", "2", "--redundant", "2", "--no-progress"])
    total = int(sum(np.sum(s["expert_tokens"]) for s in steps))
    assert [r.policy for r in results] == ["contiguous", "round_robin", "balanced", "balanced+2"]
    assert all(r.total_pairs == total for r in results)
    assert results[3].replicas == 4
    assert results[2].balancedness_total >= results[0].balancedness_total - 1e-9


def test_cpu_tier_and_replicas_in_the_engine(tiny_mixtral, baseline):
    llm = LLM(tiny_mixtral, dtype="float32", max_num_seqs=2, expert_devices=("cpu:0", "cpu:1"),
              gpu_expert_budget="3", expert_placement="balanced", rebalance_interval=3)
    mgr = llm.core.placement_manager
    assert mgr.placement.host == "cpu"
    assert tokens(llm) == baseline
    assert mgr.num_rebalances >= 1


def test_cpu_tier_format_in_the_engine(tiny_mixtral, baseline):
    """--cpu-expert-format int8: the tier's experts quantized (its bytes in the kernel plan that
    /version reports), the engine serves (a float32 model's auto tier stays float32: greedy exact)."""
    llm = LLM(tiny_mixtral, dtype="float32", max_num_seqs=2, expert_devices=("cpu:0", "cpu:1"),
              gpu_expert_budget="3", cpu_expert_format="int8")
    tier = llm.model_info.kernel_plan["cpu_tier"]
    expert = 3 * 64 * 96  # weights of one tiny expert; int8: a byte each + a float16 scale per 32
    assert tier == {"format": "int8", "bytes": 2 * 2 * expert * 34 // 32, "in_place": False}
    assert llm.core.placement_manager.tier_info() == tier == llm.core.placement_info().cpu_tier  # /v1/moe/routing
    assert all(len(t) == len(b) for t, b in zip(tokens(llm), baseline))
    auto = LLM(tiny_mixtral, dtype="float32", max_num_seqs=2, expert_devices=("cpu:0", "cpu:1"),
               gpu_expert_budget="3")
    assert auto.model_info.kernel_plan["cpu_tier"] == {"format": "float32", "bytes": 2 * 2 * expert * 4,
                                                       "in_place": False}
    assert tokens(auto) == baseline


def test_per_request_device_shares(tiny_mixtral):
    """Finished requests report their token-expert computations per placed device."""
    from server.engine.request import EngineRequest

    llm = LLM(tiny_mixtral, dtype="float32", expert_devices=("cpu:0", "cpu:1"), num_redundant_experts=2,
              gpu_expert_budget="5")
    core = llm.core
    for i, prompt in enumerate(PROMPTS[:2]):
        core.add_request(EngineRequest(f"r{i}", prompt, SamplingParams(max_tokens=4, ignore_eos=True)))
    finished = []
    while core.has_unfinished():
        finished += [o for o in core.step()[0] if o.finished]
    assert len(finished) == 2
    for out in finished:
        shares, counts = out.metrics.device_expert_tokens, out.metrics.expert_counts
        assert set(shares) == {"cpu:0", "cpu:1"}
        assert sum(shares.values()) == int(np.sum(counts)) > 0


def test_device_tokens_for_counts_splits_replicas(tiny_mixtral):
    llm = LLM(tiny_mixtral, dtype="float32", expert_devices=("cpu:0", "cpu:1"), gpu_expert_budget="3")
    mgr = llm.core.placement_manager
    counts = torch.arange(16).view(2, 8)
    got = mgr.device_tokens_for_counts(counts)
    want = {d: 0 for d in mgr.placement.all_devices}
    for li, layer in enumerate(mgr.placement.layers):
        for p in layer.physical:
            want[p.device] += int(counts[li, p.logical])  # budget 3 x 2 < 8: a host tier, no replicas
    assert got == want and "cpu" in got


def test_record_only_places_nothing(tiny_mixtral, tmp_path):
    """--record-routing alone: a trace recorder listens to the routing; no placement manager."""
    trace = tmp_path / "t.jsonl"
    llm = LLM(tiny_mixtral, dtype="float32", record_routing=str(trace))
    assert llm.core.placement_manager is None and llm.core.placement_info() is None
    assert all(b.executor is None for b in llm.core.model.moe_blocks())
    (recorder,) = [lst for lst in llm.core.routing_listeners if isinstance(lst, RoutingRecorder)]
    llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    llm.core.close()
    assert recorder.closed and recorder.steps >= 3
    assert len(trace.read_text().splitlines()) == 1 + recorder.steps


def test_no_placement_options_no_manager(tiny_mixtral):
    assert LLM(tiny_mixtral, dtype="float32").core.placement_manager is None


def test_bad_placement_config_fails_at_build(tiny_mixtral):
    with pytest.raises(ValueError, match="cannot also"):
        LLM(tiny_mixtral, dtype="float32", expert_devices=("cpu",), gpu_expert_budget="2")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            LLM(tiny_mixtral, dtype="float32", expert_devices=("cuda:0", "cuda:1"))


def test_shutdown_closes_the_routing_trace(tiny_mixtral, tmp_path):
    """The factory hands the placement manager to the EngineCore's constructor; shutting the
    AsyncEngine down closes it (the trace file is complete and closed)."""
    import asyncio

    from server.config import EngineConfig
    from server.engine.factory import build_native_core
    from server.engine.native.async_engine import AsyncEngine
    from server.engine.request import EngineRequest

    trace = tmp_path / "t.jsonl"
    core, info = build_native_core(EngineConfig(model=tiny_mixtral, dtype="float32", record_routing=str(trace)),
                                   progress=False)
    (recorder,) = [lst for lst in core.routing_listeners if isinstance(lst, RoutingRecorder)]

    async def run() -> None:
        eng = AsyncEngine(core, info)
        await eng.start()
        async for _ in eng.generate(EngineRequest("t", PROMPTS[0], SamplingParams(max_tokens=3, ignore_eos=True))):
            pass
        assert not recorder.closed
        await eng.shutdown()

    asyncio.run(run())
    assert recorder.closed
    assert len(trace.read_text().splitlines()) == 1 + recorder.steps


def test_models_package_imports_nothing_from_server():
    """models/ is the model library: it must not import the server (issue 16)."""
    import ast
    from pathlib import Path

    offenders = []
    for path in Path(__file__).resolve().parents[2].joinpath("models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n == "server" or n.startswith("server.")]
    assert not offenders, offenders
