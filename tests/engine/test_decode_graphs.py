"""Decode steps padded to batch-size buckets (CUDA graphs on a GPU; the same padded path run
eagerly on the CPU): greedy tokens and routing counts identical to the unpadded engine, and
to transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.engine.request import EngineRequest, SamplingParams
from tests.engine.units import prompts_of

LENS = (5, 17, 40, 3, 9)
MAX_TOKENS = (24, 7, 16, 24, 11)  # requests finish at different steps: the batch shrinks 5 -> 1


def run(core, prompts):
    """Greedy tokens and per-request expert counts, through EngineCore directly."""
    for i, (p, n) in enumerate(zip(prompts, MAX_TOKENS)):
        core.add_request(EngineRequest(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)))
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    counts, buckets = {}, set()
    orig = core.runner.execute

    def execute(batch):
        out = orig(batch)
        buckets.add(out.graph_bucket)
        return out

    core.runner.execute = execute
    while core.has_unfinished():
        outputs, *_ = core.step()
        for out in outputs:
            tokens[out.request_id] += out.outputs[0].token_ids
            if out.finished:
                counts[out.request_id] = out.metrics.expert_counts
    core.runner.execute = orig
    return tokens, counts, buckets


def test_padded_decode_matches_unpadded_and_transformers(make_llm, hf_reference):  # noqa: F811
    prompts = prompts_of(LENS)
    plain = make_llm(device="cpu", num_kv_blocks=128, block_size=4, max_num_seqs=8)
    padded = make_llm(device="cpu", num_kv_blocks=128, block_size=4, max_num_seqs=8)
    padded.core.runner.enable_decode_graphs([1, 2, 4, 8], cuda_graphs=False)
    ref_tokens, ref_counts, ref_buckets = run(plain.core, prompts)
    tokens, counts, buckets = run(padded.core, prompts)
    assert ref_buckets == {None}
    assert {2, 4, 8} & buckets, f"no padded decode step ran: {buckets}"
    assert tokens == ref_tokens
    assert counts == ref_counts  # routing telemetry: padding rows are never counted
    for i, p in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_reference(p, MAX_TOKENS[i])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_graphs_match_eager_and_transformers(make_llm, hf_reference):  # noqa: F811
    prompts = prompts_of(LENS)
    graphs = make_llm(device="cuda", num_kv_blocks=128, block_size=4, max_num_seqs=8)
    eager = make_llm(device="cuda", num_kv_blocks=128, block_size=4, max_num_seqs=8, enforce_eager=True)
    assert graphs.core.runner.graphs is not None and graphs.core.runner.graphs.cuda_graphs
    assert eager.core.runner.graphs is None
    ref_tokens, ref_counts, _ = run(eager.core, prompts)
    tokens, counts, buckets = run(graphs.core, prompts)
    assert {1, 2, 4, 8} & buckets, f"no decode step replayed a graph: {buckets}"
    assert tokens == ref_tokens and counts == ref_counts
    for i, p in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_reference(p, MAX_TOKENS[i])


def test_graphs_made_again_when_experts_are_placed_after_capture(make_llm):
    """Experts placed (or moved) after the decode graphs were made: the graphs are made again
    (the placed decode step reads nothing back) and the padded buckets keep serving, with the
    same tokens."""
    from server.engine.native.placement.manager import PlacementManager
    from server.config import EngineConfig

    prompts = prompts_of(LENS)
    plain = make_llm(device="cpu", num_kv_blocks=128, block_size=4, max_num_seqs=8)
    placed = make_llm(device="cpu", num_kv_blocks=128, block_size=4, max_num_seqs=8)
    runner = placed.core.runner
    runner.enable_decode_graphs([1, 2, 4, 8], cuda_graphs=False)
    made = []
    capture = runner.graphs.capture
    runner.graphs.capture = lambda: made.append(1) or capture()
    # installs executors on the model's MoE blocks behind the runner's back (the factory places
    # experts before the core is made)
    mgr = PlacementManager.from_config(placed.core.model, EngineConfig(model="x", expert_devices=("cpu:0", "cpu:1")))
    ref_tokens, ref_counts, _ = run(plain.core, prompts)
    tokens, counts, buckets = run(placed.core, prompts)
    assert buckets - {None} and runner.graphs is not None and len(made) == 1
    assert mgr.rebalance(np.arange(16, dtype=np.float64).reshape(2, 8) ** 3)  # moves experts: made again next step
    tokens2, _, buckets2 = run(placed.core, prompts)
    assert buckets2 - {None} and len(made) == 2 and tokens2 == ref_tokens
    assert tokens == ref_tokens and counts == ref_counts
