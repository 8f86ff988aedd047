"""Engine fixtures: every engine a test builds must end with all KV blocks back in the pool."""

from __future__ import annotations

import pytest
import torch
import transformers

from server.engine.llm import LLM
from tests.conftest import save_test_tokenizer
from tests.models.conftest import make_checkpoint


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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """family -> (path, transformers reference) of a tiny registered config with the test tokenizer,
    made once per module (its generation stops only at max_new_tokens)."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            path = tmp_path_factory.mktemp(f"engine-{family}")
            ref = make_checkpoint(family, path)
            ref.generation_config.eos_token_id = None
            save_test_tokenizer(path)
            cache[family] = (str(path), ref)
        return cache[family]

    return get
