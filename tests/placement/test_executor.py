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


class HostReads:
    """Counts every way a tensor's value reaches Python (and the ops that read sizes back on
    CUDA) while installed: patched on torch.Tensor / torch, all threads."""

    METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique", "bincount")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.METHODS:
            self._wrap(monkeypatch, torch.Tensor, name)
        for name in ("nonzero", "unique", "bincount"):
            self._wrap(monkeypatch, torch, name)

    def _wrap(self, monkeypatch, owner, name):
        orig = getattr(owner, name)
        calls = self.calls

        def counted(*args, **kwargs):
            calls.append(name)
            return orig(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def single_device(model, layer_idx, x, ids, w):
    block = next(b for b in model.moe_blocks() if b.layer_idx == layer_idx)
    return moe_loop(x, block.w13.detach(), block.w2.detach(), ids, w)


@pytest.mark.parametrize("kwargs", [dict(devices=CPU2, num_redundant=3, policy="balanced"),
                                    dict(devices=CPU2, budget="2"), dict(devices=["cpu:0"], budget="5")],
                         ids=["replicas", "cpu-tier", "one-device+tier"])
def test_placed_decode_step_reads_nothing_back(model, monkeypatch, kwargs):
    """A decode-sized pass through every placed layer: the C kernel on every CPU stack (and the CPU
    tier on its thread), no value read back to the host, the single-device result."""
    from models.kernels import cpu_ops

    assert cpu_ops.load() is not None, "the C kernels must build here (the CPU experts kernel serves placement)"
    loads = np.random.default_rng(1).pareto(1.0, (2, 8)) * 10
    mgr = PlacementManager(model, kwargs.pop("devices"), initial_loads=loads, **kwargs)
    ex = mgr.executor
    for state in ex.states.values():
        assert all(g.packed is not None for i, g in enumerate(state.groups) if not state.host or i != state.host.group)
        assert state.host is None or state.host.packed is not None
    gen = torch.Generator().manual_seed(2)
    cases = []
    for T in (1, 16):
        for layer_idx in mgr.layer_ids:
            x = torch.randn(T, 64, generator=gen)
            ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(T)])
            w = torch.rand(T, 2, generator=gen)
            cases.append((layer_idx, x, ids, w))
    reads = HostReads(monkeypatch)
    with torch.inference_mode():
        got = [ex(*case) for case in cases]
    assert reads.calls == []
    monkeypatch.undo()
    for case, y in zip(cases, got):
        torch.testing.assert_close(y, single_device(model, *case), atol=1e-5, rtol=1e-5)
    assert (ex._worker is not None) == (mgr.host is not None)  # the tier ran on its thread
    mgr.close()


def test_prefill_sized_steps_take_the_compact_dispatch(model):
    """Past SYNC_FREE_TOKENS the devices get only their pairs (counts read back): same result."""
    from models.placement.executor import SYNC_FREE_TOKENS

    mgr = PlacementManager(model, CPU2, budget="3", num_redundant=0, fetch_threshold=NEVER_FETCH)
    layer_idx = mgr.layer_ids[1]
    T = SYNC_FREE_TOKENS + 5
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(T, 64, generator=gen)
    ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(T)])
    w = torch.rand(T, 2, generator=gen)
    want = single_device(model, layer_idx, x, ids, w)
    torch.testing.assert_close(mgr.executor(layer_idx, x, ids, w), want, atol=1e-5, rtol=1e-5)
    chunks = [mgr.executor(layer_idx, x[i:i + 64], ids[i:i + 64], w[i:i + 64]) for i in range(0, T, 64)]
    torch.testing.assert_close(torch.cat(chunks), want, atol=1e-5, rtol=1e-5)
    mgr.close()


def test_the_cpu_tier_follows_the_routing_statistics(model, reference):
    """Which experts stay on the devices: the hottest by decayed frequency (recent steps weigh most);
    moved between steps, outputs unchanged."""
    from server.engine.stats import RoutingStats

    mgr = PlacementManager(model, CPU2, budget="2", rebalance_interval=4, policy="contiguous")
    on_devices = lambda: {e for e in range(8) if e not in mgr.placement.layers[0].device_logicals("cpu")}  # noqa: E731
    assert on_devices() == {0, 1, 2, 3}

    def step(hot):
        counts = [[10 if e in hot else 0 for e in range(8)] for _ in range(2)]
        mgr.on_routing(RoutingStats(2, 8, counts))

    for _ in range(8):  # long ago: 0-3 hot
        step({0, 1, 2, 3})
    for _ in range(4):  # lately: 4-7 hot, as often as 0-3 were; decay makes the recent ones win
        step({4, 5, 6, 7})
    assert on_devices() == {4, 5, 6, 7} and mgr.num_rebalances == 1
    loads = mgr.routing_loads()
    assert loads[0, 4] > loads[0, 0] > 0
    for _ in range(4):  # everyone as frequent in this window: no move without a gain
        step({0, 1, 2, 3, 4, 5, 6, 7})
    assert on_devices() == {4, 5, 6, 7}
    assert_same_as_reference(model, reference)
    mgr.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kwargs", [dict(num_redundant=2, policy="balanced"), dict(budget="4")],
                         ids=["replicas", "cpu-tier"])
def test_cuda_placed_decode_step_does_not_sync(tiny_mixtral, kwargs):
    """On the GPU a decode-sized placed pass runs under torch.cuda.set_sync_debug_mode("error"):
    replicas over two devices and the CPU tier (its copies asynchronous, its wait on its thread)."""
    from models import load_model

    model = load_model(tiny_mixtral, dtype="float32", device="cuda:0", progress=False)
    if "budget" in kwargs:
        devices = ["cuda:0"]
    else:  # two GPUs, or the GPU and a CPU device (computed on the host, as the tier is)
        devices = ["cuda:0", "cuda:1"] if torch.cuda.device_count() > 1 else ["cuda:0", "cpu:0"]
    mgr = PlacementManager(model, devices, **kwargs)
    assert (mgr.host is not None) == ("budget" in kwargs)
    gen = torch.Generator().manual_seed(4)
    cases = []
    for T in (1, 16):
        for layer_idx in mgr.layer_ids:
            ids = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(T)])
            cases.append((layer_idx, torch.randn(T, 64, generator=gen), ids, torch.rand(T, 2, generator=gen)))
    on_gpu = [(i, x.cuda(), ids.cuda(), w.cuda()) for i, x, ids, w in cases]
    with torch.inference_mode():
        mgr.executor(*on_gpu[0])  # warm-up: Triton compiles, staging is allocated
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = [mgr.executor(*case) for case in on_gpu]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    for (layer_idx, x, ids, w), y in zip(cases, got):
        torch.testing.assert_close(y.cpu(), single_device(model, layer_idx, x, ids, w), atol=1e-4, rtol=1e-4)
    mgr.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_with_placed_experts(tiny_mixtral):
    """Placement no longer turns CUDA graphs off: experts placed on the GPU, decode steps replay
    graphs and give the unplaced engine's greedy tokens; with the CPU tier the graphs are
    piecewise (cut at its calls); several GPUs turn them off by default (the plan says why)."""
    from server.engine import LLM, SamplingParams

    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(**kw):
        llm = LLM(tiny_mixtral, dtype="float32", device="cuda", max_num_seqs=4, **kw)
        outs = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, greedy, use_tqdm=False)]
        return llm, outs

    _, want = run()
    placed, got = run(expert_devices=("cuda:0",), expert_placement="balanced")
    assert all(b.executor is not None for b in placed.core.model.moe_blocks())
    assert placed.core.model.kernel_plan.cuda_graphs and placed.core.runner.graphs is not None
    assert placed.core.runner.graphs.cuda_graphs and placed.core.runner.graphs.graphs
    assert got == want
    if torch.cuda.device_count() > 1:
        two, got_two = run(expert_devices=("cuda:0", "cuda:1"), num_redundant_experts=2)
        assert not two.core.model.kernel_plan.cuda_graphs and got_two == want
    tier, got_tier = run(gpu_expert_budget="4")
    assert tier.core.model.kernel_plan.cuda_graphs and tier.core.runner.graphs.cuda_graphs
    assert any("piecewise" in n and "CPU expert tier" in n for n in tier.core.model.kernel_plan.notes)
    assert max(tier.core.runner.graphs.num_pieces.values()) > 1
    assert got_tier == want


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_shared_experts_and_expert_variants_with_the_cpu_tier(tmp_path, family):
    """The shared expert runs between launching the placed experts and joining them (qwen2_moe);
    biased clamped experts (gpt-oss) run the loop on every stack and on the tier's master
    weights (no C kernel for them): the same greedy tokens and logits as unplaced."""
    from models import load_model
    from tests.models.conftest import make_checkpoint

    make_checkpoint(family, tmp_path)
    m = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22]]
    want_tokens, want_logits = greedy_generate(m, prompts, 6), prefill_logits(m, prompts)
    mgr = PlacementManager(m, CPU2, budget=str(max(1, m.config.num_experts // 4)))
    assert mgr.host is not None
    tier_packed = {st.host.packed is not None for st in mgr.executor.states.values()}
    assert tier_packed == {family != "gpt_oss"}
    if family == "gpt_oss":  # no C kernel for its experts: the tier keeps the model's dtype, no other format
        assert mgr.tier_info()["format"] == "float32" and mgr.tier_info()["in_place"]
        with pytest.raises(ValueError, match="int8 format needs the C experts kernel"):
            PlacementManager(m, CPU2, budget=str(max(1, m.config.num_experts // 4)), tier_format="int8")
        for b in m.moe_blocks():
            b.executor = mgr.executor
    assert greedy_generate(m, prompts, 6) == want_tokens
    for a, b in zip(prefill_logits(m, prompts), want_logits):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    mgr.close()
