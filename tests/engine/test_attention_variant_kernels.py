"""The families with attention variants (gpt-oss: sliding window + sinks; Llama 4: chunked
attention; a Mixtral checkpoint with a sliding window on every layer) through the real engine with the
decode kernels on (the C kernel, float32) against the same engine on the reference path: the
same greedy tokens and log-probabilities within float32 rounding, across chunked prefill,
prefix-cache hits and decodes that run past the windows and chunks (8 positions, blocks of 4).
The Triton kernel takes the same path under TRITON_INTERPRET=1 for one family."""

from __future__ import annotations

import pytest
import torch

from server.engine import LLM
from server.engine.request import SamplingParams
from tests.engine.units import prompts_of

FAMILIES = ("gpt_oss", "llama4", "mixtral-sliding")
PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)


def run(path: str, backend: str, prompts: list[list[int]], params: SamplingParams = PARAMS):
    """Each prompt after the one before it finished (a later prompt sharing a prefix hits the cache)."""
    llm = LLM(path, dtype="float32", num_kv_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=8,
              attention_backend=backend)
    variant_layers = [lk for lk in llm.core.model.kernel_plan.layers if lk.attention_kind != "gqa"]
    assert variant_layers and {lk.attention.value for lk in variant_layers} == {backend}
    outs = [llm.generate([p], params, use_tqdm=False)[0].outputs[0] for p in prompts]
    assert llm.core.pool.num_free == llm.core.pool.num_blocks
    assert len(prompts) == 1 or llm.core.total_prefix_hit_tokens > 0
    return [o.token_ids for o in outs], [[lp.top for lp in o.logprobs] for o in outs]


def assert_close(got, want, family):
    tokens, tops = got
    ref_tokens, ref_tops = want
    assert tokens == ref_tokens, family
    for row, ref_row in zip(tops, ref_tops):
        for top, ref_top in zip(row, ref_row):
            assert [t for t, _ in top] == [t for t, _ in ref_top], family
            assert max(abs(a - b) for (_, a), (_, b) in zip(top, ref_top)) < 1e-4, family


@pytest.mark.parametrize("family", FAMILIES)
def test_c_kernel_matches_the_reference_path(family, checkpoint):
    path, _ = checkpoint(family)
    prompts = prompts_of((30,))
    prompts.append(prompts[0][:24] + [7, 9])  # a prefix-cache hit, then prefill past it
    assert_close(run(path, "cpu", prompts), run(path, "reference", prompts), family)


def test_triton_kernel_matches_the_reference_path(checkpoint):
    path, _ = checkpoint("gpt_oss")
    prompts = prompts_of((21,))
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3)
    assert_close(run(path, "triton", prompts, params), run(path, "reference", prompts, params), "gpt_oss")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("family", ["mixtral-sliding", "gpt_oss"])
def test_cuda_triton_variants_match_transformers(family, checkpoint):
    """On a GPU (float32): the Triton decode kernel with the variant (Mixtral with a window: its
    decode steps replay CUDA graphs) gives transformers' greedy tokens."""
    from tests.engine.test_families import hf_greedy

    path, ref = checkpoint(family)
    llm = LLM(path, dtype="float32", device="cuda", num_kv_blocks=64, block_size=4, max_num_seqs=8)
    plan = llm.core.model.kernel_plan
    assert {lk.attention.value for lk in plan.layers} == {"triton"}
    if family == "mixtral-sliding":
        assert plan.cuda_graphs
    prompts = prompts_of((5, 30, 11))
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    for p, r in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        assert r.outputs[0].token_ids == hf_greedy(ref, p, 16), family


def test_blocks_out_of_every_windows_reach_are_released(checkpoint):
    """Mixtral with a sliding window of 8 on every layer, blocks of 4: a sequence holds the
    blocks of its window (plus the partial and parent blocks), not its context, so two
    27-token sequences (7 blocks each) run side by side in 8 blocks without preemption, with
    transformers' tokens; models with a full layer (gpt-oss) keep every block."""
    from models.layers.attention_variants import kv_reach
    from tests.engine.test_families import hf_greedy
    from tests.models.kernels.test_plan import config

    path, ref = checkpoint("mixtral-sliding")
    llm = LLM(path, dtype="float32", num_kv_blocks=8, block_size=4, max_num_seqs=4)
    core = llm.core
    assert core.kv.reach == 8
    held = []
    orig = core.scheduler.update_from_output

    def update(batch, out, on_token):
        finished = orig(batch, out, on_token)
        held.extend(len(s.blocks.table) - s.blocks.dropped for s in core.scheduler.running)
        return finished

    core.scheduler.update_from_output = update
    prompts = prompts_of((10, 11))
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    for p, r in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        assert r.outputs[0].token_ids == hf_greedy(ref, p, 16)
    assert core.total_preemptions == 0 and max(held) <= 4, (core.total_preemptions, max(held))
    assert core.pool.num_free == core.pool.num_blocks
    # a full-attention layer reads the whole context: gpt-oss, Llama 4 (NoPE layers), MLA keep every block
    assert [kv_reach(config(f)) for f in ("gpt_oss", "llama4", "deepseek_v3", "qwen3_moe-sliding")] == [
        None, None, None, 8]
