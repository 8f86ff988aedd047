"""Speculative decoding (server/engine/native/spec/): exact greedy outputs with n-gram and draft-model
drafts across batching, preemption, prefix hits, chunked prefill, n > 1, logprobs, stops and structured
outputs; the rejection sampler keeps the target distribution (chi-square, with a wrong rule that the test
does catch); a verify step's logits equal k + 1 plain steps'; KV blocks all come back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from server.config import ConfigError, EngineConfig
from server.engine.native.spec.ngram import ngram_lookup
from server.engine.native.spec.rejection import accept_sampled, race
from server.engine.request import EngineRequest, SamplingParams
from tests.engine.units import prompts_of

NGRAM = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3})
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def loop_prompt(i: int, n: int = 24) -> list[int]:
    """A prompt that repeats a short pattern: n-gram lookup finds drafts in it."""
    pattern = [(11 * i + 5 * j) % 300 + 3 for j in range(3 + i % 4)]
    return (pattern * n)[:n]


def run(llm, requests: list[EngineRequest]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for r in requests:
        llm.core.add_request(r)
    while llm.core.has_unfinished():
        for o in llm.core.step()[0]:
            for c in o.outputs:
                acc = out.setdefault(f"{o.request_id}#{c.index}", {"ids": [], "text": "", "lps": [], "reason": None})
                acc["ids"] += c.token_ids
                acc["text"] += c.text
                acc["lps"] += c.logprobs or []
                acc["reason"] = c.finish_reason or acc["reason"]
    return out


def spec_pool_free(llm) -> None:
    p = llm.core.spec.proposer
    assert p.num_free_blocks() == p.num_blocks(), "draft-model KV blocks leaked"


# -- the flag ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ("[1]", "must be a JSON object"),
    ('{"method": "medusa", "num_speculative_tokens": 2}', "method must be one of"),
    ('{"method": "ngram"}', "num_speculative_tokens is required"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens must be an integer in 1..16"),
    ('{"method": "ngram", "num_speculative_tokens": true}', "num_speculative_tokens must be"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}',
     "prompt_lookup_min (4) must be <= prompt_lookup_max (2)"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "num_lookahead": 2}', "unknown key(s) num_lookahead"),
    ('{"method": "draft_model", "num_speculative_tokens": 2}', 'needs "model"'),
    ('{"method": "ngram", "num_speculative_tokens": 2, "model": "x"}', "ngram takes no model"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}', "disable_by_batch_size"),
])
def test_bad_speculative_configs_are_refused_with_the_reason(text, message):
    with pytest.raises(ConfigError, match=None) as e:
        EngineConfig(speculative_config=text)
    assert message in str(e.value)


def test_speculative_config_defaults_and_off():
    assert EngineConfig().speculative is None and EngineConfig(speculative_config="").speculative is None
    s = EngineConfig(speculative_config='{"method": "ngram", "num_speculative_tokens": 5}').speculative
    assert (s.method, s.num_speculative_tokens, s.prompt_lookup_min, s.prompt_lookup_max) == ("ngram", 5, 1, 4)


@pytest.mark.parametrize("method", ["mtp", "eagle3"])
def test_mtp_and_eagle3_need_a_proposer_at_startup(tiny_mixtral, method):
    from server.engine import LLM

    extra = {"model": tiny_mixtral} if method == "eagle3" else {}
    # both have proposers (spec/mtp.py); a checkpoint without MTP layers, or a directory that is
    # not an EAGLE-3 head, is refused at startup
    why = "MixtralForCausalLM checkpoint has no MTP layers" if method == "mtp" else "not an EAGLE-3 head"
    with pytest.raises(ValueError, match=why):
        LLM(tiny_mixtral, dtype="float32", speculative_config=json.dumps(
            {"method": method, "num_speculative_tokens": 1, **extra}))


def test_ngram_lookup_takes_the_latest_longest_match():
    t = np.array([1, 2, 3, 9, 8, 2, 3, 7, 6, 1, 2, 3])
    assert ngram_lookup(t, 1, 3, 2).tolist() == [9, 8]  # "1 2 3" matched at the start
    assert ngram_lookup(t, 1, 2, 2).tolist() == [7, 6]  # "2 3": the latest occurrence
    assert ngram_lookup(t, 4, 4, 2).tolist() == []  # no 4-gram repeats
    assert ngram_lookup(np.array([5]), 1, 3, 2).tolist() == []


# -- exact greedy outputs -------------------------------------------------------------------------------
def test_ngram_greedy_identical_with_preemption_chunking_prefix_hits_n_and_logprobs(make_llm):
    kw = dict(num_kv_blocks=28, block_size=4, max_num_batched_tokens=16, max_num_seqs=8)
    base, spec = make_llm(**kw), make_llm(speculative_config=NGRAM, **kw)
    prompts = [loop_prompt(i) for i in range(3)] + prompts_of([30])
    prompts += [prompts[1], prompts[3] + prompts[3][:9]]  # prefix hits

    def requests():
        reqs = [EngineRequest(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
                for i, p in enumerate(prompts)]
        reqs.append(EngineRequest("n2", prompts[2], SamplingParams(n=2, temperature=0.0, max_tokens=16,
                                                                   ignore_eos=True)))
        reqs.append(EngineRequest("lp", prompts[3], SamplingParams(temperature=0.0, max_tokens=16, logprobs=2,
                                                                   ignore_eos=True)))
        return reqs

    want, got = run(base, requests()), run(spec, requests())
    assert {k: v["ids"] for k, v in got.items()} == {k: v["ids"] for k, v in want.items()}
    assert [c["reason"] for c in got.values()] == [c["reason"] for c in want.values()]
    for a, b in zip(want["lp#0"]["lps"], got["lp#0"]["lps"], strict=True):  # logprobs of the accepted tokens
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    totals = spec.core.spec.totals
    assert totals["accepted"] > 0 and totals["draft_tokens"] > totals["accepted"], totals
    assert spec.core.total_preemptions > 0 and spec.core.total_prefix_hit_tokens > 0


def test_stops_and_max_tokens_are_never_passed(make_llm):
    kw = dict(num_kv_blocks=128, block_size=4)
    base, spec = make_llm(**kw), make_llm(speculative_config=NGRAM, **kw)
    prompt = loop_prompt(1, 30)
    full = run(base, [EngineRequest("f", prompt, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))])
    text, ids = full["f#0"]["text"], full["f#0"]["ids"]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    reqs = lambda: [EngineRequest("s", prompt, SamplingParams(temperature=0.0, max_tokens=30, stop=[stop],  # noqa: E731
                                                              ignore_eos=True)),
                    EngineRequest("t", prompt, SamplingParams(temperature=0.0, max_tokens=30,
                                                              stop_token_ids=[ids[7]], ignore_eos=True)),
                    EngineRequest("m", prompt, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))]
    want, got = run(base, reqs()), run(spec, reqs())
    assert got == want
    assert stop not in got["s#0"]["text"] and got["s#0"]["reason"] == "stop"
    assert len(got["m#0"]["ids"]) == 5
    assert spec.core.spec.totals["accepted"] > 0


def test_draft_model_greedy_identical_and_its_blocks_come_back(make_llm, tiny_mixtral):
    kw = dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=24, max_num_seqs=6)
    cfg = json.dumps({"method": "draft_model", "model": tiny_mixtral, "num_speculative_tokens": 3})
    base, spec = make_llm(**kw), make_llm(speculative_config=cfg, **kw)
    prompts = prompts_of([5, 17, 30, 9])
    reqs = lambda: [EngineRequest(f"g{i}", p, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))  # noqa: E731
                    for i, p in enumerate(prompts)]
    want, got = run(base, reqs()), run(spec, reqs())
    assert got == want
    totals = spec.core.spec.totals
    # the target is its own draft model: (nearly) every draft is accepted
    assert totals["draft_tokens"] > 0 and totals["accepted"] >= 0.9 * totals["draft_tokens"], totals
    assert spec.core.total_preemptions > 0
    spec_pool_free(spec)
    # aborting a sequence that holds drafts gives back both pools' blocks
    spec.core.add_request(EngineRequest("a", prompts[0], SamplingParams(max_tokens=50, ignore_eos=True)))
    for _ in range(4):
        spec.core.step()
    assert spec.core.requests["a"].seqs[0].spec_tokens
    spec.core.abort("a")
    assert spec.core.pool.num_free == spec.core.pool.num_blocks
    spec_pool_free(spec)


def test_draft_model_kv_is_inside_the_kv_cache_budget(make_llm, tiny_mixtral):
    """--kv-cache-memory holds the target's blocks and the draft model's (as many, plus its pad
    block), split in the ratio of their per-token KV sizes; both reported in model_info.kv_cache."""
    budget = 1 << 20
    kw = dict(block_size=4, kv_cache_memory=budget)
    cfg = json.dumps({"method": "draft_model", "model": tiny_mixtral, "num_speculative_tokens": 2})
    base, spec = make_llm(**kw), make_llm(speculative_config=cfg, **kw)
    kv0, kv = base.model_info.kv_cache, spec.model_info.kv_cache
    assert kv0["draft_bytes"] == 0
    proposer = spec.core.spec.proposer
    held = sum(t.numel() * t.element_size() for pair in proposer.kv_caches for t in pair)
    assert kv["draft_bytes"] == held and proposer.num_blocks() == kv["blocks"] == spec.core.pool.num_blocks
    assert kv["target_bytes"] + kv["draft_bytes"] <= budget
    # the target is its own draft model: the budget halves (less the pad block)
    assert kv["blocks"] in (kv0["blocks"] // 2, kv0["blocks"] // 2 - 1)


def test_disable_by_batch_size(make_llm):
    cfg = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 3})
    spec = make_llm(num_kv_blocks=128, block_size=4, speculative_config=cfg)
    short = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    run(spec, [EngineRequest(f"g{i}", loop_prompt(i), short) for i in range(3)])
    assert spec.core.spec.totals["drafts"] == 0
    run(spec, [EngineRequest(f"h{i}", loop_prompt(i), short) for i in range(2)])
    assert spec.core.spec.totals["drafts"] > 0


def test_structured_outputs_drafts_follow_the_grammar(make_llm):
    from server.engine.structured.backend import GrammarCompiler
    from server.engine.structured.spec import choice_spec, json_schema_spec

    kw = dict(num_kv_blocks=128, block_size=4)
    base, spec = make_llm(**kw), make_llm(speculative_config=NGRAM, **kw)
    comp = GrammarCompiler(base.tokenizer, base.core.vocab_size, base.core.eos_token_ids)
    schema = {"type": "object", "properties": {"a": {"type": "string", "enum": ["xyzxyz", "abab"]},
                                               "b": {"type": "array", "items": {"type": "integer"}, "maxItems": 6}},
              "required": ["a", "b"]}
    js = comp.compile(json_schema_spec(schema, "response_format"))
    ch = comp.compile(choice_spec(["abcabcabc", "abcab"], "structured_outputs.choice"))
    prompt = base.tokenizer.encode('{"a": "xyzxyz", "b": [1, 1, 1, 1]} {"a": "xyzxyz", "b": [1, 1, 1, 1]} ')
    reqs = lambda: [EngineRequest("j", prompt, SamplingParams(temperature=0.0, max_tokens=60), structured=js),  # noqa: E731
                    EngineRequest("c", prompt, SamplingParams(temperature=0.0, max_tokens=20), structured=ch),
                    EngineRequest("u", prompt, GREEDY)]
    want, got = run(base, reqs()), run(spec, reqs())
    assert got == want
    assert json.loads(got["j#0"]["text"])["a"] in ("xyzxyz", "abab")
    assert got["c#0"]["text"] in ("abcabcabc", "abcab")
    assert spec.core.spec.totals["accepted"] > 0


def test_structured_outputs_draft_in_the_reasoning_part_too(make_llm):
    """A structured-output sequence behind a reasoning gate drafts freely until the gate's tokens,
    the grammar masking from the position after them (drafts that carry the gate included): the
    same greedy output as without speculation."""
    import re

    from server.engine.structured.backend import GrammarCompiler
    from server.engine.structured.spec import regex_spec

    kw = dict(num_kv_blocks=128, block_size=4)
    base, spec = make_llm(**kw), make_llm(speculative_config=NGRAM, **kw)
    prompts = [loop_prompt(i, 30) for i in range(3)]
    free = run(base, [EngineRequest(f"f{i}", p, GREEDY) for i, p in enumerate(prompts)])
    comp = GrammarCompiler(base.tokenizer, base.core.vocab_size, base.core.eos_token_ids)
    compiled = comp.compile(regex_spec("[0-9]{4}", "guided_regex"))
    params = SamplingParams(temperature=0.0, max_tokens=24)
    # the gate: two tokens the model produces unconstrained, a few tokens into its output
    gates = [tuple(free[f"f{i}#0"]["ids"][6:7]) for i in range(len(prompts))]
    reqs = lambda: [EngineRequest(f"g{i}", p, params, structured=compiled.with_gate(g))  # noqa: E731
                    for i, (p, g) in enumerate(zip(prompts, gates))]
    walks: list[tuple[bool, int, bool]] = []  # (active at the walk, drafts kept, masked)
    inner = spec.core.spec._grammar_walk

    def walk(state, tokens, output_ids):
        kept, masks = inner(state, tokens, output_ids)
        walks.append((state.active, len(kept), masks is not None))
        return kept, masks

    spec.core.spec._grammar_walk = walk
    want, got = run(base, reqs()), run(spec, reqs())
    assert got == want
    for i, g in enumerate(gates):
        ids = got[f"g{i}#0"]["ids"]
        cut = next(j for j in range(len(g), len(ids) + 1) if tuple(ids[j - len(g): j]) == g)
        assert re.fullmatch("[0-9]{4}", base.tokenizer.decode(ids[cut:]).strip()), (ids, g)
    assert any(not active and kept for active, kept, _ in walks)  # drafts in the reasoning part
    assert spec.core.spec.totals["accepted"] > 0
    # a draft that carries the gate: free before it and at it, the grammar from the next position
    from server.engine.structured.state import GrammarState

    tok = base.tokenizer
    gate, other, digit = tok.encode("Q", add_special_tokens=False), prompts[0][0], tok.encode("7", add_special_tokens=False)
    assert len(gate) == len(digit) == 1 and not re.fullmatch("[0-9]", tok.decode([other]))
    state = GrammarState(compiled.with_gate(tuple(gate)))
    kept, masks = inner(state, [other, gate[0], digit[0], other], [other])
    assert kept == [other, gate[0], digit[0]]  # the non-digit after the gate is cut
    assert masks is not None and masks.shape[0] == 4 and bool((masks[:2] == -1).all())
    fresh = GrammarState(compiled).matcher
    row = torch.empty(1, masks.shape[1], dtype=torch.int32)
    fresh.fill_next_token_bitmask(row, 0)
    assert torch.equal(masks[2], row[0]) and not bool((row == -1).all())
    assert not state.active  # the walk left the sequence's own state as it was


# -- the verify step's logits -------------------------------------------------------------------------------
def test_verify_step_logits_equal_plain_steps(make_llm):
    k = 4
    prompt = prompts_of([13])[0]
    llm = make_llm(num_kv_blocks=64, block_size=4, speculative_config=json.dumps(
        {"method": "ngram", "num_speculative_tokens": k, "disable_by_batch_size": 1}))  # drafts only when set by hand
    model, rows = llm.core.model, []
    compute = model.compute_logits
    model.compute_logits = lambda h: rows.append(compute(h)) or rows[-1]
    try:
        plain = run(llm, [EngineRequest("p", prompt, SamplingParams(temperature=0.0, max_tokens=k + 2,
                                                                    ignore_eos=True))])["p#0"]["ids"]
        plain_rows = torch.cat(rows[1: k + 2])  # the k + 1 decode steps after the prefill
        rows.clear()
        llm.core.add_request(EngineRequest("v", prompt, SamplingParams(temperature=0.0, max_tokens=k + 2,
                                                                       ignore_eos=True)))
        llm.core.step()  # prefill: samples plain[0]
        seq = llm.core.requests["v"].seqs[0]
        seq.spec_tokens = plain[1: k + 1]  # the right drafts, set by hand
        out = llm.core.step()[0]
    finally:
        model.compute_logits = compute
    assert rows[1].shape[0] == k + 1  # one verify step, k + 1 rows
    torch.testing.assert_close(rows[1], plain_rows, rtol=1e-4, atol=1e-4)
    assert out[0].outputs[0].token_ids == plain[1: k + 2]  # k drafts + the bonus token
    while llm.core.has_unfinished():
        llm.core.step()


# -- sampled: the target distribution is kept ---------------------------------------------------------------
def chi2_pvalue(observed: np.ndarray, expected: np.ndarray) -> float:
    """Pearson chi-square test p-value (survival of chi2 with len - 1 degrees of freedom)."""
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def homogeneity_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample chi-square test that counts `a` and `b` [categories] come from one distribution."""
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    table = np.stack([a, b]).astype(float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    df = len(a) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def wrong_rule(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None, gen: torch.Generator) -> int:
    """A deliberately wrong acceptance rule: accept d with min(1, p/q) but, on rejection, resample
    from p itself instead of norm(max(0, p - q)): biased towards the draft distribution."""
    d = drafts[0]
    qd = 1.0 if q is None else float(q[0, d])
    if float(torch.rand((), generator=gen)) < min(1.0, float(p[0, d]) / qd):
        return d
    return race(p[0], gen, gen)


@pytest.mark.parametrize("one_hot", [False, True])
def test_rejection_sampler_keeps_the_target_distribution(one_hot):
    torch.manual_seed(0)
    p = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    n = 2000
    gen = torch.Generator().manual_seed(1)
    right, wrong = np.zeros(5), np.zeros(5)
    for _ in range(n):
        if one_hot:  # n-gram: a fixed draft token, q one-hot at it
            d, qq = 3, None
        else:  # a draft model: d ~ q
            d, qq = int(torch.multinomial(q, 1, generator=gen)), q[None]
        tokens, _ = accept_sampled(torch.stack([p, p]), [d], qq, gen, gen)
        right[tokens[0]] += 1
        wrong[wrong_rule(p[None], [d], qq, gen)] += 1
    assert chi2_pvalue(right, n * p.numpy()) > 0.01
    assert chi2_pvalue(wrong, n * p.numpy()) < 0.01  # the test can tell a wrong rule


def test_sampled_speculation_matches_plain_sampling_end_to_end(make_llm):
    """The same prompt sampled with many seeds with and without n-gram drafts: the token
    frequencies at fixed positions agree (two-sample chi-square)."""
    kw = dict(num_kv_blocks=512, block_size=8, max_num_seqs=64)
    base = make_llm(**kw)
    spec = make_llm(speculative_config=json.dumps({"method": "ngram", "num_speculative_tokens": 3}), **kw)
    prompt = loop_prompt(0, 20)

    def sample(llm, seeds) -> np.ndarray:
        outs = run(llm, [EngineRequest(f"s{i}", prompt, SamplingParams(temperature=1.5, top_k=4, max_tokens=4,
                                                                      seed=i, ignore_eos=True)) for i in seeds])
        return np.array([o["ids"] for o in outs.values()])  # [n, 4]

    plain, drafted = sample(base, range(200)), sample(spec, range(200))
    totals = spec.core.spec.totals
    assert totals["accepted"] > 0 and totals["draft_tokens"] > totals["accepted"], totals
    vocab = base.core.vocab_size
    for pos in (1, 2, 3):
        a = np.bincount(plain[:, pos], minlength=vocab)
        b = np.bincount(drafted[:, pos], minlength=vocab)
        assert homogeneity_pvalue(a, b) > 0.01, pos
    # seeded requests are reproducible with speculation, whatever runs beside them
    assert (sample(spec, [5, 7])[:, :] == drafted[[5, 7]]).all()


# -- the hook model-based proposers (MTP, EAGLE-3) plug into ----------------------------------------------
def test_hidden_state_proposers_get_the_rows_of_the_kept_tokens(make_llm, monkeypatch):
    from server.engine.native.spec import engine as spec_engine
    from server.engine.native.spec.ngram import NgramProposer

    seen = []

    class HiddenNgram(NgramProposer):  # drafts as n-gram; records what a model-based proposer would read
        wants_hidden_states = True
        aux_hidden_layers = (0, 1)

        def propose(self, requests, target):
            seen.append(target)
            return super().propose(requests, target)

    monkeypatch.setitem(spec_engine.PROPOSERS, "ngram", lambda c, m, a: HiddenNgram(3, 1, 3))
    llm = make_llm(num_kv_blocks=64, block_size=4, speculative_config=NGRAM)
    model = llm.core.model
    out = run(llm, [EngineRequest("h", loop_prompt(2), SamplingParams(temperature=0.0, max_tokens=20,
                                                                      ignore_eos=True))])["h#0"]["ids"]
    tokens, n_prompt = loop_prompt(2) + out, len(loop_prompt(2))
    assert llm.core.spec.totals["accepted"] > 0
    checked = 0
    for target in seen:
        assert target is not None and len(target.aux) == 2
        assert all(a.shape == target.hidden.shape for a in target.aux)
        for seq_id, (first, count) in target.rows.items():
            pos = target.positions[seq_id]
            # row first + i holds position pos + i, whose next token is tokens[pos + i + 1]; the
            # model chose the tokens after the prompt (greedy)
            skip = max(0, n_prompt - 1 - pos)
            if skip >= count:
                continue
            logits = model.compute_logits(target.hidden[first + skip: first + count])
            assert logits.argmax(-1).tolist() == tokens[pos + skip + 1: pos + count + 1]
            # aux: the residual stream entering layers 0 and 1; layer 0's input is the token's embedding
            embedded = model.embed(torch.tensor(tokens[pos: pos + count]))
            assert torch.equal(target.aux[0][first: first + count], embedded)
            assert not torch.equal(target.aux[1][first: first + count], embedded)
            checked += count - skip
    assert checked > len(seen)  # verify steps kept more than one token per step
