"""Decode steps with the CPU expert tier as piecewise graphs (models/placement/piecewise.py):
cut at every host-tier call, the calls on static buffers between the pieces. On the CPU the
pieces run eagerly (`cuda_graphs=False`) and the cuts take their recorded calls; on CUDA the
pieces are CUDA graphs (the cuda group: scripts/gpu_check.sh)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.engine.request import EngineRequest, SamplingParams
from tests.engine.units import prompts_of

LENS = (5, 17, 40, 3, 9)
MAX_TOKENS = (12, 5, 9, 15, 7)  # the batch shrinks 5 -> 1: buckets 8, 4, 2, 1
TIER = dict(expert_devices=("cpu:0",), gpu_expert_budget="5")  # 5 experts on the device, 3 on the host tier


class HostReads:
    """Counts the ways a tensor's value reaches Python while `inside` is set (all threads)."""

    METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique", "bincount")

    def __init__(self, monkeypatch):
        self.inside, self.calls = False, []
        for name in self.METHODS:
            self._wrap(monkeypatch, torch.Tensor, name)
        for name in ("nonzero", "unique", "bincount"):
            self._wrap(monkeypatch, torch, name)

    def _wrap(self, monkeypatch, owner, name):
        orig = getattr(owner, name)

        def counted(*args, **kwargs):
            if self.inside:
                self.calls.append(name)
            return orig(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


def run(core, prompts, reads: HostReads | None = None):
    """Greedy tokens, every step's logits and the buckets used, through EngineCore."""
    for i, (p, n) in enumerate(zip(prompts, MAX_TOKENS)):
        core.add_request(EngineRequest(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)))
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    logits, buckets = [], []
    runner = core.runner
    orig_logits, orig_execute = runner.model.compute_logits, runner.execute
    runner.model.compute_logits = lambda h: logits.append(orig_logits(h)) or logits[-1]

    def execute(batch):
        out = orig_execute(batch)
        buckets.append(out.graph_bucket)
        return out

    runner.execute = execute
    graphs_run = runner.graphs.run if runner.graphs is not None else None
    if graphs_run is not None and reads is not None:
        def counted_run(*args, **kwargs):
            reads.inside = True
            try:
                return graphs_run(*args, **kwargs)
            finally:
                reads.inside = False
        runner.graphs.run = counted_run
    try:
        while core.has_unfinished():
            outputs, *_ = core.step()
            for out in outputs:
                tokens[out.request_id] += out.outputs[0].token_ids
    finally:
        del runner.model.compute_logits, runner.execute
        if graphs_run is not None and reads is not None:
            del runner.graphs.run
    return tokens, logits, buckets


def assert_same(got, want):
    (tokens, logits, _), (ref_tokens, ref_logits, _) = got, want
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits)
    for a, b in zip(logits, ref_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cpu_tier_piecewise_steps_match_eager_placement(make_llm, monkeypatch):
    prompts = prompts_of(LENS)
    eager = make_llm(device="cpu", num_kv_blocks=128, block_size=4, max_num_seqs=8, **TIER)
    pieces = make_llm(device="cpu", num_kv_blocks=128, block_size=4, max_num_seqs=8, **TIER)
    assert eager.core.runner.graphs is None
    mgrs = [eager.core.placement_manager, pieces.core.placement_manager]
    assert all(m.host == "cpu" for m in mgrs)
    tier_layers = sum(st.host is not None for st in mgrs[1].executor.states.values())
    assert tier_layers == 2
    plan = pieces.core.model.kernel_plan
    runner = pieces.core.runner
    runner.enable_decode_graphs([1, 2, 4, 8], cuda_graphs=False)
    # every bucket: one piece before each layer's host call, one between its start and finish, one after
    assert runner.graphs.num_pieces == {b: 2 * tier_layers + 1 for b in (1, 2, 4, 8)}
    calls = {b: list(p.calls) for b, (p, _, _) in runner.graphs.graphs.items()}
    assert all(c.y_s.shape[0] == b for b, cs in calls.items() for c in cs)  # static, the first rows of bucket 8's
    assert all(c.y_s.data_ptr() == calls[8][i].y_s.data_ptr() for cs in calls.values() for i, c in enumerate(cs))

    reads = HostReads(monkeypatch)
    want = run(eager.core, prompts)
    got = run(pieces.core, prompts, reads)
    assert set(want[2]) == {None}
    assert {1, 2, 4, 8} <= set(got[2]), got[2]
    assert reads.calls == []  # the padded steps (the device pieces and the host's calls) read nothing back
    assert_same(got, want)
    assert plan is pieces.core.model.kernel_plan

    # a rebalance moves experts between the device and the tier: the pieces are recorded again
    # (the calls hold the tier's experts as they were) and the steps stay the eager engine's
    loads = np.arange(16, dtype=np.float64).reshape(2, 8) ** 3
    assert all(m.rebalance(loads) for m in mgrs)
    got2 = run(pieces.core, prompts, reads)
    want2 = run(eager.core, prompts)
    assert all(c not in calls[b] for b, (p, _, _) in runner.graphs.graphs.items() for c in p.calls)
    assert {1, 2, 4, 8} <= set(got2[2]) and reads.calls == []
    assert_same(got2, want2)
    assert got2[0] == want[0]  # the placement never changes the tokens


def test_stale_pieces_are_refused(make_llm):
    """A step that reaches host calls its pieces did not record (here: the same bucket with the
    placement gone) is an error, not a silent mix of placements."""
    from models.placement.piecewise import Pieces

    llm = make_llm(device="cpu", num_kv_blocks=32, block_size=4, max_num_seqs=2, **TIER)
    runner = llm.core.runner
    runner.enable_decode_graphs([2], cuda_graphs=False)
    pieces, _, _ = runner.graphs.graphs[2]
    assert isinstance(pieces, Pieces) and len(pieces.calls) == 2 and len(pieces.actions) == 4  # per layer
    executors = [b.executor for b in runner.model.moe_blocks()]
    for b in runner.model.moe_blocks():
        b.executor = None
    try:
        with pytest.raises(RuntimeError, match="made 0 host calls"):
            with torch.inference_mode():
                runner.graphs.run(2)
    finally:
        for b, ex in zip(runner.model.moe_blocks(), executors):
            b.executor = ex


def cuda_core(tiny_mixtral, devices, graphs: bool, **placement):
    """An EngineCore on cuda:0 with experts placed on `devices`, its plan finished for the engine
    as server/engine/factory.py does (graphs piecewise with the tier; `graphs_across_gpus`)."""
    from transformers import AutoTokenizer

    from models import load_model
    from server.engine.native.core import EngineCore
    from server.engine.native.placement.manager import PlacementManager

    model = load_model(tiny_mixtral, dtype="float32", device="cuda:0", progress=False)
    mgr = PlacementManager(model, devices, **placement)
    model.apply_plan(model.plan_kernels().for_engine(
        placed=True, host_tier=mgr.computes_on_host, several_gpus=mgr.several_gpus, graphs_across_gpus=graphs,
        enforce_eager=not graphs))
    return EngineCore(model, AutoTokenizer.from_pretrained(tiny_mixtral), num_blocks=128, block_size=4,
                      max_model_len=128, max_num_seqs=8, max_num_batched_tokens=512, seed=0, placement=mgr)


def strict_replays(runner):
    """Replays of the decode graphs under torch.cuda.set_sync_debug_mode("error")."""
    replay = runner.graphs.run

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return replay(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    runner.graphs.run = strict


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_piecewise_graphs_with_the_cpu_tier(tiny_mixtral, hf_reference):
    """On the GPU with half the experts on the CPU tier: the plan keeps CUDA graphs (piecewise),
    every bucket is 2 * layers + 1 graphs, replays (under sync debug mode "error") give the
    eager engine's greedy tokens and logits, and transformers' tokens, before and after a
    rebalance."""
    from server.engine.native.placement.manager import NEVER_FETCH

    prompts = prompts_of(LENS)
    tier = dict(budget="4", fetch_threshold=NEVER_FETCH)  # computed on the CPU at every batch size
    graphs, eager = cuda_core(tiny_mixtral, ["cuda:0"], True, **tier), cuda_core(tiny_mixtral, ["cuda:0"], False, **tier)
    plan = graphs.model.kernel_plan
    assert plan.cuda_graphs and any("piecewise" in n for n in plan.notes), plan.notes
    runner = graphs.runner
    assert runner.graphs is not None and runner.graphs.cuda_graphs and eager.runner.graphs is None
    layers = sum(st.host is not None for st in graphs.placement_manager.executor.states.values())
    assert layers and set(runner.graphs.num_pieces.values()) == {2 * layers + 1}
    strict_replays(runner)
    want, got = run(eager, prompts), run(graphs, prompts)
    assert {1, 2, 4, 8} <= set(got[2]), got[2]
    assert_same(got, want)
    for i, p in enumerate(prompts):
        assert got[0][f"r{i}"] == hf_reference(p, MAX_TOKENS[i])
    loads = np.arange(16, dtype=np.float64).reshape(2, 8) ** 3
    assert all(core.placement_manager.rebalance(loads) for core in (graphs, eager))
    got2, want2 = run(graphs, prompts), run(eager, prompts)  # recaptured at the first decode step
    got3 = run(graphs, prompts)  # replays of the graphs made again
    assert {1, 2, 4, 8} <= set(got2[2]) and {1, 2, 4, 8} <= set(got3[2])
    assert_same(got2, want2)
    assert got3[0] == want2[0]
    graphs.placement_manager.close()
    eager.placement_manager.close()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two NVIDIA GPUs")
def test_cuda_piecewise_graphs_across_two_gpus(tiny_mixtral):
    """Experts on two GPUs with graphs asked for (`graphs_across_gpus`): the other GPU's experts
    run between the pieces (event-ordered; replays under sync debug mode "error"); greedy
    tokens and logits equal the eager engine's."""
    prompts = prompts_of(LENS)
    kw = dict(num_redundant=2, policy="balanced")
    graphs = cuda_core(tiny_mixtral, ["cuda:0", "cuda:1"], True, **kw)
    eager = cuda_core(tiny_mixtral, ["cuda:0", "cuda:1"], False, **kw)
    assert graphs.runner.graphs is not None and graphs.runner.graphs.cuda_graphs
    assert max(graphs.runner.graphs.num_pieces.values()) > 1  # cut at the other GPU's experts
    strict_replays(graphs.runner)
    want, got = run(eager, prompts), run(graphs, prompts)
    assert set(got[2]) - {None}
    assert_same(got, want)


def test_cuts_frame_the_device_experts_and_the_shared_expert(tmp_path, monkeypatch):
    """The cut points (qwen2_moe: a shared expert): each layer's host call starts before the
    device's own experts and the shared expert run and finishes after them, so the CPU tier
    overlaps them; the pieces give the unpieced logits."""
    import threading

    from models import load_model
    from models.placement import executor as ex
    from models.placement.piecewise import HostCall, Pieces
    from server.engine.native.placement.manager import PlacementManager
    from tests.models.conftest import make_checkpoint
    from tests.models.simple_runner import prefill_logits

    make_checkpoint("qwen2_moe", tmp_path)
    m = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)
    prompts = [[5, 6, 7, 8, 9], [20, 21, 22]]
    mgr = PlacementManager(m, ["cpu:0"], budget=str(m.config.num_experts // 2))
    want = prefill_logits(m, prompts)
    events = []
    main = threading.current_thread()
    for name in ("start", "finish"):
        orig = getattr(HostCall, name)
        monkeypatch.setattr(HostCall, name, lambda self, orig=orig, name=name: events.append(name) or orig(self))
    moe_cpu = ex.moe_cpu
    monkeypatch.setattr(ex, "moe_cpu", lambda *a, **k: (threading.current_thread() is main and events.append("experts"))
                        or moe_cpu(*a, **k))
    for b in m.moe_blocks():
        b.shared.register_forward_hook(lambda *_: events.append("shared"))
    pieces = Pieces(cuda_graphs=False)
    got = pieces.record(lambda: prefill_logits(m, prompts))
    layers = len(m.moe_blocks())
    assert len(pieces.calls) == layers and pieces.num_pieces == 2 * layers + 1
    assert events == ["start", "experts", "shared", "finish"] * layers, events
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    mgr.close()
