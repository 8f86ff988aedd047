"""Engine fixtures: every engine a test builds must end with all KV blocks back in the pool."""

from __future__ import annotations

import pytest
import torch
import transformers

from server.engine.llm import LLM


@pytest.fixture()
def make_llm(tiny_mixtral):
    built: list[LLM] = []

    def make(**kwargs) -> LLM:
        kwargs.setdefault("dtype", "float32")
        llm = LLM(tiny_mixtral, **kwargs)
        built.append(llm)
        return llm

    yield make
    for llm in built:
        core = llm.core
        assert not core.has_unfinished(), "requests left unfinished"
        assert core.pool.num_free == core.pool.num_blocks, (
            f"KV blocks leaked: {core.pool.num_blocks - core.pool.num_free} of {core.pool.num_blocks} still in use")
        assert all(b.ref_count == 0 for b in core.pool.blocks)


@pytest.fixture(scope="module")
def hf_reference(tiny_mixtral):
    ref = transformers.MixtralForCausalLM.from_pretrained(tiny_mixtral, dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None
    cache = {}

    def greedy(prompt, n):
        key = (tuple(prompt), n)
        if key not in cache:
            out = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=n, do_sample=False, pad_token_id=0)
            cache[key] = out[0, len(prompt):].tolist()
        return cache[key]

    return greedy
