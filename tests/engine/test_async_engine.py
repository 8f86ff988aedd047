"""AsyncEngine: concurrent streams, aborts, fault isolation, bounded memory."""

from __future__ import annotations

import asyncio
import gc
import os
import time

import pytest

from server.config import EngineConfig
from server.engine.factory import build_native_core
from server.engine.native.async_engine import AsyncEngine
from server.engine.native.outputs import SchedulerOutput
from server.engine.protocol import EngineDeadError, EngineOverloadedError
from server.engine.request import EngineRequest, SamplingParams


@pytest.fixture()
def make_engine(tiny_mixtral):
    engines: list[AsyncEngine] = []

    def make(max_queue_len=1024, **kwargs) -> AsyncEngine:
        kwargs.setdefault("dtype", "float32")
        cfg = EngineConfig(model=tiny_mixtral, **kwargs)
        core, info = build_native_core(cfg, progress=False)
        eng = AsyncEngine(core, info, max_queue_len=max_queue_len, max_num_seqs=cfg.max_num_seqs)
        engines.append(eng)
        return eng

    yield make
    for eng in engines:
        assert eng.core.pool.num_free == eng.core.pool.num_blocks, "KV blocks leaked"


async def collect(eng, rid, prompt, **params):
    text, tokens, last = "", [], None
    async for out in eng.generate(EngineRequest(rid, prompt, SamplingParams(**params))):
        for c in out.outputs:
            text += c.text
            tokens += c.token_ids
        last = out
    return text, tokens, last


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_concurrent_streams_match_sequential(make_engine, async_scheduling):
    eng = make_engine(num_kv_blocks=256, block_size=8, async_scheduling=async_scheduling)

    async def main():
        await eng.start()
        prompts = [[5 + i, 6, 7 + i, 8] * (i + 1) for i in range(8)]
        params = dict(temperature=0.0, max_tokens=12, ignore_eos=True)
        together = await asyncio.gather(*(collect(eng, f"c{i}", p, **params) for i, p in enumerate(prompts)))
        alone = [await collect(eng, f"s{i}", p, **params) for i, p in enumerate(prompts)]
        await eng.shutdown()
        return together, alone

    together, alone = run(main())
    for (t1, k1, o1), (t2, k2, _) in zip(together, alone):
        assert k1 == k2 and t1 == t2 and len(k1) == 12
        assert o1.finished and o1.metrics.num_generation_tokens == 12


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_consumer_going_away_aborts_and_frees(make_engine, async_scheduling):
    eng = make_engine(num_kv_blocks=128, block_size=8, async_scheduling=async_scheduling)

    async def main():
        await eng.start()
        gen = eng.generate(EngineRequest("gone", [5, 6, 7, 8] * 4, SamplingParams(max_tokens=500, ignore_eos=True)))
        await gen.__anext__()
        await gen.__anext__()
        assert eng.num_free_kv_blocks() < eng.num_total_kv_blocks()
        await gen.aclose()  # what a disconnect does to the API's stream
        for _ in range(200):
            if eng.num_free_kv_blocks() == eng.num_total_kv_blocks() and not eng.core.has_unfinished():
                break
            await asyncio.sleep(0.01)
        await eng.shutdown()

    run(main())
    assert not eng.core.has_unfinished()


def test_queue_limit_refuses(make_engine):
    eng = make_engine(num_kv_blocks=128, block_size=8, max_num_seqs=1, max_queue_len=1)

    async def main():
        await eng.start()
        # long enough that "a" still runs and "b" still waits when "c" comes (a fast CPU decoded
        # 30 tokens of the test model within the 50 ms)
        params = dict(max_tokens=500, ignore_eos=True)
        a = asyncio.create_task(collect(eng, "a", [5, 6, 7], **params))
        b = asyncio.create_task(collect(eng, "b", [5, 6, 8], **params))
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloadedError):
            await collect(eng, "c", [5, 6, 9], **params)
        await asyncio.gather(a, b)
        await eng.shutdown()

    run(main())


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_step_exception_fails_only_that_step(make_engine, async_scheduling):
    eng = make_engine(num_kv_blocks=128, block_size=8, async_scheduling=async_scheduling)
    calls = {"n": 0}

    def hook(scheduled):
        if any(s.seq.request.request_id == "bad" for s in scheduled) and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("injected fault")

    eng.core.fault_hook = hook

    async def main():
        await eng.start()
        with pytest.raises(Exception, match="injected fault"):
            async for out in eng.generate(EngineRequest("bad", [5, 6, 7], SamplingParams(max_tokens=5))):
                if out.error:
                    raise RuntimeError(out.error)
        text, toks, last = await collect(eng, "good", [5, 6, 7], max_tokens=5, ignore_eos=True)
        await eng.check_health()
        await eng.shutdown()
        return toks

    assert len(run(main())) == 5


def test_repeated_failures_mark_engine_dead(make_engine):
    eng = make_engine(num_kv_blocks=64, block_size=8)

    def hook(scheduled):
        raise RuntimeError("broken device")

    eng.core.fault_hook = hook

    async def main():
        await eng.start()
        for i in range(3):
            async for out in eng.generate(EngineRequest(f"r{i}", [5, 6], SamplingParams(max_tokens=3))):
                assert out.error and out.finished
        with pytest.raises(EngineDeadError):
            await eng.check_health()
        with pytest.raises(EngineDeadError):
            await collect(eng, "after", [5], max_tokens=2)
        await eng.shutdown()

    run(main())


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_flat_over_200_requests(make_engine):
    eng = make_engine(num_kv_blocks=256, block_size=8, max_num_seqs=16)

    async def wave(start):
        await asyncio.gather(*(collect(eng, f"m{start + i}", [5 + i % 50, 6, 7, 8, 9] * 3,
                                       max_tokens=16, temperature=0.8, logprobs=2, ignore_eos=True)
                               for i in range(40)))

    async def main():
        await eng.start()
        samples = []
        for w in range(5):  # 200 requests in waves of 40
            await wave(w * 40)
            gc.collect()
            samples.append(_rss_mb())
        await eng.shutdown()
        return samples

    rss = run(main())
    # after warm-up, resident memory must not keep growing (allow allocator noise)
    assert rss[-1] - rss[1] < 20, f"RSS grew: {rss}"
    assert not eng.core.requests and not eng.core.scheduler.running and not eng.core.scheduler.waiting


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
