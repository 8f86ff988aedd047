"""Async scheduling (`--async-scheduling`, server/engine/native/async_step.py): the same outputs
as synchronous scheduling, token for token (greedy and seeded sampling), across batching, chunked
prefill, prefix hits, preemption, stop strings, stop tokens, max_tokens, n > 1, logprobs, penalties,
structured outputs (synchronous steps) and aborts mid-stream; no KV block leaks (the `make_llm` fixture checks the
pool at the end); streamed deltas add up to the whole answers."""

from __future__ import annotations

import re

from server.engine.request import EngineRequest, SamplingParams
from tests.engine.units import prompts_of

# chunked prefill (budget 16), a KV pool too small for the work (preemption) and shared prefixes
SMALL = dict(num_kv_blocks=40, block_size=4, max_num_batched_tokens=16, max_num_seqs=8)


def _params() -> list[SamplingParams]:
    """Every kind of request the two schedulers must agree on."""
    return [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=18, seed=7, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),  # stops with its first token
        SamplingParams(temperature=0.8, max_tokens=12, seed=3, n=3, ignore_eos=True),  # forks
        SamplingParams(temperature=0.0, max_tokens=16, logprobs=2, prompt_logprobs=1, ignore_eos=True),
        SamplingParams(temperature=0.7, max_tokens=16, seed=11, repetition_penalty=1.3, presence_penalty=0.5,
                       ignore_eos=True),  # needs its tokens on the host: synchronous steps
        SamplingParams(temperature=0.0, max_tokens=20, min_tokens=6, stop_token_ids=list(range(2, 320, 3))),
        SamplingParams(temperature=0.9, max_tokens=30, seed=5),  # may stop on EOS
    ]


def _run(llm, requests: list[EngineRequest], abort_after: dict[str, int] | None = None) -> dict:
    """Step the core, stream each completion's deltas; abort request r after it streamed
    `abort_after[r]` tokens. Returns {(request, index): (ids, text, finish, stop_reason, logprobs)}."""
    acc: dict = {}
    for r in requests:
        llm.core.add_request(r)
    abort_after = dict(abort_after or {})
    while llm.core.has_unfinished():
        for out in llm.core.step()[0]:
            for c in out.outputs:
                ids, text, _, _, lps = acc.get((out.request_id, c.index), ([], "", None, None, []))
                lps = lps + [(lp.token_id, round(lp.logprob, 4)) for lp in (c.logprobs or [])]
                acc[(out.request_id, c.index)] = (ids + c.token_ids, text + c.text, c.finish_reason,
                                                  c.stop_reason, lps)
            rid = out.request_id
            if rid in abort_after and len(acc[(rid, 0)][0]) >= abort_after[rid] and not out.finished:
                assert llm.core.abort(rid)
                del abort_after[rid]
    return acc


def _both(make_llm, requests_of, abort_after=None, **engine) -> tuple[dict, dict, object]:
    sync = _run(make_llm(**engine), requests_of(), abort_after)
    llm = make_llm(async_scheduling=True, **engine)
    assert llm.core.async_step is not None
    return sync, _run(llm, requests_of(), abort_after), llm


def test_same_outputs_with_batching_chunking_preemption_and_prefix_hits(make_llm):
    prompts = prompts_of((5, 17, 40, 3, 30, 9, 12, 1))
    prompts[6] = prompts[2][:36]  # a shared prefix

    def requests():
        params = _params()
        return [EngineRequest(f"r{i}", p, params[i % len(params)]) for i, p in enumerate(prompts)]

    sync, async_, llm = _both(make_llm, requests, **SMALL)
    assert async_ == sync
    assert llm.core.total_preemptions > 0, "the small pool should force preemption"
    assert llm.core.total_prefix_hit_tokens > 0
    stats = llm.core.async_step.stats
    assert stats.synchronous_steps < stats.steps, "most steps should overlap"
    assert any(v[2] == "stop" for v in sync.values()) and any(v[2] == "length" for v in sync.values())


def test_stop_strings_and_the_token_after_a_stop_never_emitted(make_llm):
    prompt = prompts_of([10])[0]
    probe = make_llm(num_kv_blocks=64, block_size=8)
    full = probe.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    stop = full.text[3:5]
    stop_tok = full.token_ids[7]

    def requests():
        return [EngineRequest("s", prompt, SamplingParams(temperature=0, max_tokens=40, stop=[stop], ignore_eos=True)),
                EngineRequest("t", prompt, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop_tok],
                                                          ignore_eos=True)),
                EngineRequest("m", prompt, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))]

    sync, async_, _ = _both(make_llm, requests, num_kv_blocks=64, block_size=8)
    assert async_ == sync
    assert async_[("s", 0)][1] == full.text[: full.text.index(stop)] and async_[("s", 0)][3] == stop
    assert async_[("t", 0)][0] == full.token_ids[: full.token_ids.index(stop_tok) + 1]
    assert async_[("m", 0)][0] == full.token_ids[:9]


def test_aborts_mid_stream_free_everything(make_llm):
    prompts = prompts_of((12, 20, 7, 15))

    def requests():
        return [EngineRequest(f"a{i}", p, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, n=1 + i % 2))
                for i, p in enumerate(prompts)]

    sync, async_, llm = _both(make_llm, requests, abort_after={"a0": 3, "a1": 1, "a3": 10},
                              num_kv_blocks=64, block_size=4)
    for key, (ids, *_rest) in async_.items():  # the aborted ones stopped early, the others agree
        assert ids[: len(sync[key][0])] == sync[key][0] or sync[key][0][: len(ids)] == ids
    assert async_[("a2", 0)] == sync[("a2", 0)]
    assert len(async_[("a2", 0)][0]) == 30 and len(async_[("a0", 0)][0]) < 30
    assert llm.core.pool.num_free == llm.core.pool.num_blocks  # at once, with a step still in flight


def test_structured_outputs_batch_with_async_rows(make_llm):
    from server.engine.structured.backend import GrammarCompiler
    from server.engine.structured.spec import regex_spec

    probe = make_llm(num_kv_blocks=256, block_size=8)
    pattern = r"[a-z]{2,6}( [a-z]{2,6}){2,3}\."
    compiled = GrammarCompiler(probe.tokenizer, probe.core.vocab_size, probe.core.eos_token_ids).compile(
        regex_spec(pattern, "guided_regex"))
    prompts = [probe.tokenizer.encode(f"def f{i}(x): return x + {i}") for i in range(5)]

    def requests():
        return ([EngineRequest(f"u{i}", prompts[i], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
                 for i in range(3)]
                + [EngineRequest(f"c{i}", prompts[3 + i], SamplingParams(temperature=1.0, max_tokens=60, seed=i),
                                 structured=compiled) for i in range(2)])

    sync, async_, llm = _both(make_llm, requests, num_kv_blocks=256, block_size=8, max_num_seqs=16)
    assert async_ == sync
    for i in range(2):
        assert async_[(f"c{i}", 0)][2] == "stop" and re.fullmatch(pattern, async_[(f"c{i}", 0)][1])
    stats = llm.core.async_step.stats
    assert 0 < stats.synchronous_steps < stats.steps  # the constrained rows' steps only


def test_streamed_equals_whole_answers(make_llm):
    llm = make_llm(async_scheduling=True, num_kv_blocks=64, block_size=4)
    prompts = prompts_of((8, 14))
    params = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=20, seed=2, n=2, ignore_eos=True)]
    whole = llm.generate(prompts, params, use_tqdm=False)
    streamed = _run(llm, [EngineRequest(f"x{i}", p, params[i]) for i, p in enumerate(prompts)])
    for i, res in enumerate(whole):
        for c in res.outputs:
            assert streamed[(f"x{i}", c.index)][:3] == (c.token_ids, c.text, c.finish_reason)


def test_hybrid_model_same_outputs(checkpoint):
    """A model with linear-attention layers (a recurrent state slot per sequence): the slots of
    sequences stopped or preempted while a step is in flight are reused correctly."""
    from server.engine import LLM

    path, _ = checkpoint("qwen3_next")
    prompts = prompts_of((9, 21, 4, 14))
    params = [SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
              SamplingParams(temperature=1.0, max_tokens=10, seed=4, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
              SamplingParams(temperature=0.9, max_tokens=12, seed=8, n=2, ignore_eos=True)]
    got = []
    for flag in (False, True):
        llm = LLM(path, dtype="float32", num_kv_blocks=24, block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
                  async_scheduling=flag)
        got.append(_run(llm, [EngineRequest(f"h{i}", p, params[i]) for i, p in enumerate(prompts)]))
        assert llm.core.pool.num_free == llm.core.pool.num_blocks
        slots = llm.core.state_slots
        assert slots.num_free == slots.num_slots, "state slots leaked"
        llm.core.close()
    assert got[0] == got[1]


def test_padded_decode_graph_path(make_llm):
    """Decode steps padded to graph buckets (the CUDA-graph path, run eagerly on the CPU) read the
    pending input ids from the static buffers like the eager path."""
    prompts = prompts_of((6, 11, 3))
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    got = []
    for flag in (False, True):
        llm = make_llm(num_kv_blocks=64, block_size=4, max_num_seqs=4, async_scheduling=flag)
        llm.core.runner.enable_decode_graphs([1, 2, 4], cuda_graphs=False)
        got.append(_run(llm, [EngineRequest(f"g{i}", p, params) for i, p in enumerate(prompts)]))
    assert got[0] == got[1]
