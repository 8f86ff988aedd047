"""The families with expert variants (gpt-oss: biased, clamped experts; Llama 4: routing weight
on the input) and the grouped sigmoid router (DeepSeek-V3) through the real engine with the
fused kernels (the C experts kernel, the C router) give what the reference path gives (the C
kernels off: the per-expert loop and PyTorch's router): the same greedy tokens, log-probabilities
within float32 rounding."""

from __future__ import annotations

import pytest

from models.kernels.plan import MoEKernel
from server.engine import LLM
from server.engine.request import SamplingParams
from tests.engine.units import prompts_of
from tests.models.kernels.test_fused_moe import needs_cpu_kernel


@pytest.mark.parametrize("family", ["gpt_oss", "llama4", "deepseek_v3"])
def test_fused_expert_kernels_match_the_reference_path(family, checkpoint):
    needs_cpu_kernel()
    path, _ = checkpoint(family)
    fast = LLM(path, dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=4)
    ref = LLM(path, dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=4, cpu_kernels="off")
    moe = [lk for lk in fast.core.model.kernel_plan.layers if lk.moe is not None]
    assert moe and all(lk.moe == MoEKernel.CPU and lk.router == "cpu" for lk in moe), fast.core.model.kernel_plan.table()
    assert all(lk.moe == MoEKernel.LOOP and lk.router == "reference"
               for lk in ref.core.model.kernel_plan.layers if lk.moe is not None)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    prompts = prompts_of((6, 23))
    got = fast.generate(prompts, params, use_tqdm=False)
    want = ref.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert abs(a.logprob - b.logprob) < 1e-4
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert max(abs(x - y) for (_, x), (_, y) in zip(a.top, b.top)) < 1e-4
