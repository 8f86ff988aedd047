"""Engine-level regressions of the hardening issue: each test names the item it covers."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from models.layers.capacity import apply_capacity, expert_capacity
from server.config import EngineConfig
from server.engine.factory import build_native_core
from server.engine.native import sampler as sampler_mod
from server.engine.native.async_engine import AsyncEngine
from server.engine.native.outputs import SchedulerOutput
from server.engine.protocol import EngineDeadError
from server.engine.request import MAX_ROUTING_IDS, EngineRequest, SamplingParams, SamplingParamsError

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_prompt_logprobs_identical_on_a_prefix_cache_hit(make_llm) -> None:
    """Item 1: the second identical request used to get null prompt logprobs from the cache hit."""
    llm = make_llm(num_kv_blocks=64, block_size=4)
    prompt = [(7 * j) % 300 + 3 for j in range(30)]
    sp = SamplingParams(max_tokens=1, prompt_logprobs=2, **GREEDY)
    first, second = (llm.generate([prompt], sp, use_tqdm=False)[0] for _ in range(2))
    assert len(first.prompt_logprobs) == len(second.prompt_logprobs) == len(prompt)
    assert all(lp is not None for lp in first.prompt_logprobs[1:])
    for a, b in zip(first.prompt_logprobs[1:], second.prompt_logprobs[1:]):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
    # a plain request of the same prompt still hits the cache
    hits = llm.core.total_prefix_hit_tokens
    llm.generate([prompt], SamplingParams(max_tokens=1, **GREEDY), use_tqdm=False)
    assert llm.core.total_prefix_hit_tokens > hits


def test_prompt_routing_complete_on_a_prefix_cache_hit(make_llm) -> None:
    """Item 1: prompt_routing had one entry per computed token only (2 instead of 82)."""
    llm = make_llm(num_kv_blocks=64, block_size=4)
    prompt = [(5 * j) % 300 + 3 for j in range(26)]
    outs = []
    for _ in range(2):
        llm.core.add_request(EngineRequest(f"r{len(outs)}", prompt, SamplingParams(max_tokens=2, **GREEDY),
                                           return_routing=True))
        got = []
        while llm.core.has_unfinished():
            got += llm.core.step()[0]
        outs.append(next(o for o in got if o.prompt_routing is not None))
    for out in outs:
        assert tuple(out.prompt_routing.shape) == (len(prompt), 2, 2)  # [tokens, moe layers, top-k]
        assert out.prompt_routing.dtype == torch.uint8  # kept compact (item 7)
        assert tuple(out.prompt_routing_weights.shape) == (len(prompt), 2, 2)
    assert torch.equal(outs[0].prompt_routing, outs[1].prompt_routing)


def test_per_request_sampling_tensors_are_built_once(make_llm, monkeypatch) -> None:
    """Item 5: logit_bias / min_tokens / penalty structures were rebuilt every step."""
    builds: dict[str, int] = {}
    real = sampler_mod.SamplingRow.cached

    def counting(self, key, build):
        if key not in self.cache:
            builds[key] = builds.get(key, 0) + 1
        return real(self, key, build)

    monkeypatch.setattr(sampler_mod.SamplingRow, "cached", counting)
    llm = make_llm(num_kv_blocks=64, block_size=4)
    sp = SamplingParams(temperature=0.8, seed=1, max_tokens=12, min_tokens=6, stop_token_ids=[7, 8],
                        logit_bias={5: 2.0, 6: -1.0}, repetition_penalty=1.2)
    out = llm.generate([[3, 4, 5, 6, 9, 10]], sp, use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) >= 6
    assert builds == {"logit_bias": 1, "banned": 1, "prompt": 1}, builds


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {i: 1.0 for i in range(301)}),
    ("stop_token_ids", list(range(257))),
    ("stop", ["x" * 257]),
])
def test_per_step_parameters_are_bounded(field, value) -> None:
    """Item 5: 800k stop_token_ids or a full-vocabulary logit_bias slowed every step."""
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field


def test_n_above_max_num_seqs_is_refused(make_llm) -> None:
    """Item 9: such a request was admitted only when nothing else ran, draining the server."""
    llm = make_llm(num_kv_blocks=64, block_size=4, max_num_seqs=4)
    with pytest.raises(SamplingParamsError) as e:
        llm.core.validate(EngineRequest("x", [1, 2, 3], SamplingParams(n=5, temperature=1.0)))
    assert e.value.param == "n" and "4" in str(e.value)
    llm.core.validate(EngineRequest("y", [1, 2, 3], SamplingParams(n=4, temperature=1.0)))


def test_return_routing_volume_is_capped(make_llm) -> None:
    """Item 7: routing of n=128 long completions was unbounded (gigabytes)."""
    llm = make_llm(num_kv_blocks=64, block_size=4)  # 2 MoE layers x top-2: 4 ids per token
    ok = MAX_ROUTING_IDS // 4 // 128 - 10
    big = SamplingParams(n=128, temperature=1.0, max_tokens=ok + 20)
    llm.core.scheduler.max_num_seqs = 128
    llm.core.max_model_len = 10**7
    with pytest.raises(SamplingParamsError) as e:
        llm.core.validate(EngineRequest("x", [1, 2, 3], big, return_routing=True))
    assert e.value.param == "return_routing" and str(MAX_ROUTING_IDS) in str(e.value)
    llm.core.validate(EngineRequest("x", [1, 2, 3], big))  # fine without routing
    llm.core.validate(EngineRequest("y", [1, 2], SamplingParams(n=128, temperature=1.0, max_tokens=ok),
                                         return_routing=True))


def test_no_chunked_prefill_needs_a_budget_for_a_whole_prompt(tiny_mixtral) -> None:
    """Item 8: without chunked prefill a prompt longer than the step budget waited forever."""
    cfg = EngineConfig(model=tiny_mixtral, dtype="float32", num_kv_blocks=64, block_size=16,
                       enable_chunked_prefill=False, max_num_batched_tokens=32, max_model_len=512)
    with pytest.raises(ValueError, match="max-num-batched-tokens"):
        build_native_core(cfg, progress=False)
    auto = EngineConfig(model=tiny_mixtral, dtype="float32", num_kv_blocks=64, block_size=16,
                        enable_chunked_prefill=False, max_model_len=512)
    core, _ = build_native_core(auto, progress=False)
    assert core.scheduler.budget >= 512


def test_progress_watchdog_declares_a_wedged_engine_dead(make_llm) -> None:
    """Item 8: an engine with work that never schedules it stayed healthy forever."""
    llm = make_llm(num_kv_blocks=64, block_size=4)
    core = llm.core
    eng = AsyncEngine(core, llm.model_info, progress_timeout=0.5)
    real_schedule = core.scheduler.schedule

    async def main() -> None:
        await eng.start()
        core.scheduler.schedule = lambda: SchedulerOutput()  # wedged: never schedules anything
        gen = eng.generate(EngineRequest("w", [1, 2, 3], SamplingParams(max_tokens=4)))
        task = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.2)
        await eng.check_health()  # not yet
        await asyncio.sleep(0.8)
        with pytest.raises(EngineDeadError, match="no progress"):
            await eng.check_health()
        core.scheduler.schedule = real_schedule  # unwedge: the request completes
        await asyncio.wait_for(task, 30)
        await gen.aclose()
        await eng.check_health()
        await eng.shutdown()

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while core.has_unfinished() and time.monotonic() < deadline:
        core.step()


# -- item 16: expert capacity ------------------------------------------------------------------
def test_apply_capacity_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    for T, k, E, cf in ((7, 2, 4, 1.0), (33, 2, 8, 0.5), (16, 1, 4, 1.25), (5, 3, 3, 0.3)):
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k] distinct per token
        w = torch.rand(T, k, generator=g)
        out_w, dropped = apply_capacity(ids, w, E, cf)
        cap, used, want = expert_capacity(T, k, E, cf), [0] * E, torch.zeros(T, k, dtype=torch.bool)
        for slot in range(k):  # first choices of every token before any second choice
            for t in range(T):
                e = int(ids[t, slot])
                want[t, slot] = used[e] >= cap
                used[e] += 1
        assert torch.equal(dropped, want)
        assert torch.equal(out_w, w.masked_fill(want, 0.0))


def test_capacity_factor_drops_tokens_and_counts_them(make_llm, tiny_mixtral) -> None:
    plain = make_llm(num_kv_blocks=128, block_size=4)
    capped = make_llm(num_kv_blocks=128, block_size=4)
    for block in capped.core.model.moe_blocks():
        block.capacity_factor = 0.25
    roomy = make_llm(num_kv_blocks=128, block_size=4)
    for block in roomy.core.model.moe_blocks():
        block.capacity_factor = 4.0  # capacity >= every token: nothing dropped
    prompts = [[(3 * i + j) % 300 + 2 for j in range(20)] for i in range(4)]
    sp = SamplingParams(max_tokens=8, **GREEDY)
    base = [r.outputs[0].token_ids for r in plain.generate(prompts, sp, use_tqdm=False)]
    assert [r.outputs[0].token_ids for r in roomy.generate(prompts, sp, use_tqdm=False)] == base
    dropped = []
    for i, p in enumerate(prompts):
        capped.core.add_request(EngineRequest(f"c{i}", p, sp))
    metrics = []
    while capped.core.has_unfinished():
        outs, _, _, routing = capped.core.step()
        dropped.append(routing.dropped_tokens)
        metrics += [o.metrics for o in outs if o.finished]
    per_layer = torch.tensor(dropped).sum(0)  # [moe layers]
    assert (per_layer > 0).all(), per_layer
    assert sum(m.num_dropped_assignments for m in metrics) == int(per_layer.sum())
