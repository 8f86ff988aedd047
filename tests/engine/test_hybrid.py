"""Hybrid models (linear-attention or Mamba2 layers beside attention) through the engine: the
recurrent state slots are admitted, forked, freed and sized like KV blocks are (the families'
parity with transformers, chunked prefill and preemption included, is in
tests/engine/test_families.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from models.config import MoEModelConfig
from models.model import MoEForCausalLM
from server.config import EngineConfig
from server.engine import LLM
from server.engine.factory import num_kv_blocks
from server.engine.native.state_slots import StateSlots
from server.engine.request import EngineRequest, SamplingParams
from tests.engine.test_families import check_pool_empty, hf_greedy
from tests.engine.units import prompts_of
from scripts.model_families import config_of, published

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["qwen3_next", "granitemoehybrid"])
def hybrid(request, checkpoint):
    """A hybrid tiny checkpoint: Gated DeltaNet (Qwen3-Next) or Mamba2 (Granite 4.0-H) layers."""
    return checkpoint(request.param)


@pytest.fixture(scope="module")
def kimi_linear(checkpoint):
    """Kimi Delta Attention layers beside MLA (latent KV blocks)."""
    return checkpoint("kimi_linear")


def test_state_slots_pool():
    slots = StateSlots(3)
    assert slots.allocate(2) == [0, 1]
    assert slots.allocate(2) is None and slots.num_free == 1  # all or nothing
    slots.free([0])
    with pytest.raises(ValueError, match="not in use"):
        slots.free([0])
    assert sorted(slots.allocate(2)) == [0, 2]


@pytest.mark.parametrize("family", ["qwen3_next", "granitemoehybrid", "kimi_linear"])
def test_forked_completions_continue_from_the_prompts_state(family, checkpoint):
    """n > 1: each completion gets its own slot holding a copy of the prompt's state; greedy
    completions are then all the single greedy continuation (a missing or wrong copy diverges)."""
    path, ref = checkpoint(family)
    llm = LLM(path, dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=4)
    prompt = prompts_of([21])[0]
    want = hf_greedy(ref, prompt, 10)
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=10, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [want] * 3
    # seeded sampling: the same seed gives the same completions, as for attention-only models
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    first = [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    again = [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]
    assert first == again
    check_pool_empty(llm)


def test_admission_waits_for_state_slots_and_aborts_free_them(hybrid):
    """More requests than slots (--max-num-seqs 2, an n = 2 request among them): they queue for
    slots, every output is still the greedy continuation, and an aborted request's slot returns."""
    path, ref = hybrid
    llm = LLM(path, dtype="float32", num_kv_blocks=64, block_size=4, max_num_seqs=2, max_num_batched_tokens=16)
    core = llm.core
    prompts = prompts_of([9, 30, 4, 17])
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    core.add_request(EngineRequest("pair", prompts[0], SamplingParams(n=2, temperature=0.0, max_tokens=6,
                                                                      ignore_eos=True)))
    for i, p in enumerate(prompts[1:]):
        core.add_request(EngineRequest(f"r{i}", p, greedy))
    core.add_request(EngineRequest("gone", prompts[1], greedy))
    done: dict[str, list[list[int]]] = {}
    aborted = False
    while core.has_unfinished():
        assert core.state_slots.num_free >= 0
        assert len(core.scheduler.running) <= 2 + 1  # a fork may add its second completion
        outs = core.step()[0]
        if not aborted and any(s.request.request_id == "gone" for s in core.scheduler.running):
            held = core.state_slots.num_free
            aborted = core.abort("gone")  # while it runs, holding a slot
            assert core.state_slots.num_free == held + 1
        for o in outs:  # each output carries the step's new tokens
            for c in o.outputs:
                got = done.setdefault(o.request_id, [])
                got += [[] for _ in range(c.index + 1 - len(got))]
                got[c.index] += c.token_ids
    assert aborted and len(done.get("gone", [[]])[0]) < 6  # stopped before its max_tokens
    assert done["pair"] == [hf_greedy(ref, prompts[0], 6)] * 2
    for i, p in enumerate(prompts[1:]):
        assert done[f"r{i}"] == [hf_greedy(ref, p, 6)], f"prompt {i + 1}"
    check_pool_empty(llm)


@pytest.mark.parametrize("family", ["qwen3_next", "granitemoehybrid", "kimi_linear"])
def test_state_memory_is_taken_from_the_cache_budget(family, checkpoint):
    path, _ = checkpoint(family)
    budget = 1 << 20
    llm = LLM(path, dtype="float32", kv_cache_memory=budget, block_size=4, max_num_seqs=5)
    core, model = llm.core, llm.core.model
    cfg = model.config
    per_seq = model.state_bytes_per_sequence()
    assert per_seq == cfg.state_bytes_per_sequence(4) > 0
    state_tensors = [t for i, pair in enumerate(core.runner.kv_caches) if cfg.layer_kind(i) != "attention" for t in pair]
    kv_tensors = [t for i, pair in enumerate(core.runner.kv_caches) if cfg.layer_kind(i) == "attention" for t in pair]
    state_allocated = sum(t.numel() * t.element_size() for t in state_tensors)
    assert state_allocated == (5 + 1) * per_seq  # a slot per sequence + the scratch row
    blocks = core.pool.num_blocks
    assert blocks == (budget - state_allocated) // model.kv_bytes_per_block(4)
    assert blocks == num_kv_blocks(EngineConfig(model=path, kv_cache_memory=budget, block_size=4, max_num_seqs=5),
                                   model)
    assert sum(t.numel() * t.element_size() for t in kv_tensors) == (blocks + 1) * model.kv_bytes_per_block(4)
    assert state_allocated + (blocks + 1) * model.kv_bytes_per_block(4) <= budget + model.kv_bytes_per_block(4)
    with pytest.raises(ValueError, match="recurrent state"):
        LLM(path, dtype="float32", kv_cache_memory=per_seq * 3, block_size=4, max_num_seqs=5)


def _readme_row(checkpoint: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    line = next(ln for ln in readme.splitlines() if ln.startswith("| ") and f"| {checkpoint} |" in ln)
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.mark.parametrize("published_name", ["Qwen3-Next-80B-A3B-Instruct", "Qwen3.5-35B-A3B (text)", "granite-4.0-h-tiny",
                                        "Kimi-Linear-48B-A3B", "DeepSeek-V3.2-Exp", "GLM-5"])
def test_readme_state_and_kv_bytes_are_what_the_engine_allocates(published_name):
    """The README's per-sequence state and per-token KV figures for the published configs, against
    the tensors the model allocates (a bf16 model built on the meta device: no memory used)."""
    row = _readme_row(published_name)
    kv_per_token, state_per_seq = (int(re.sub(r"\D", "", c) or 0) for c in row[5:7])  # "-": no state
    cfg: MoEModelConfig = config_of(next(p for p in published() if p.checkpoint == published_name))
    with torch.device("meta"):
        model = MoEForCausalLM(cfg).to(torch.bfloat16)
    blocks, bs, slots = 3, 16, 2
    caches = model.allocate_kv_cache(blocks, bs, num_state_slots=slots, device="meta")
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    state = nbytes(t for i, pair in enumerate(caches) if cfg.layer_kind(i) != "attention" for t in pair)
    kv = nbytes(t for i, pair in enumerate(caches) if cfg.layer_kind(i) == "attention" for t in pair)
    assert abs(state / slots - state_per_seq) <= 0.05 * state_per_seq  # both 0 without stateful layers
    assert abs(kv / (blocks * bs) - kv_per_token) <= 0.05 * kv_per_token
