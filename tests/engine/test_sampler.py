"""The native engine's sampler: processing order, filters, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.native import logprobs as logprobs_mod
from server.engine.native import sampler as sampler_mod
from server.engine.native.logprobs import compute_logprobs
from server.engine.native.sampler import Sampler, SamplerOutput, SamplingRow
from server.engine.native.warp import warp_logits
from server.engine.request import SamplingParams


def row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos: tuple[int, ...] = (),
    index: int = 0,
) -> SamplingRow:
    params = params or SamplingParams()
    gen = Sampler.make_generator(params.seed, index, "cpu") if params.seed is not None else None
    return SamplingRow(params, gen, list(prompt or []), list(output or []), eos)


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# -- greedy -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 100, generator=g).to(dtype)
    out = Sampler(100)(logits, [row(greedy()) for _ in range(16)])
    assert isinstance(out, SamplerOutput)
    assert out.token_ids == logits.float().argmax(-1).tolist()
    assert out.logprobs == [None] * 16


def test_greedy_rows_among_random_and_processed_rows_are_argmax():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g)
    rows = [row(greedy()), row(), row(greedy(logit_bias={0: 0.5})), row(SamplingParams(top_k=3)), row(greedy()), row()]
    orig = logits.clone()
    out = Sampler(50)(logits, rows)
    ref = logits.argmax(-1)
    for i in (0, 4):
        assert out.token_ids[i] == ref[i]
    biased = logits[2].clone()
    biased[0] += 0.5
    assert out.token_ids[2] == biased.argmax()
    assert torch.equal(logits, orig)  # input never modified


def test_padded_vocab_columns_are_never_sampled():
    logits = torch.zeros(4, 12)
    logits[:, 10:] = 50.0  # padding columns beyond the real vocabulary
    out = Sampler(10)(logits, [row(greedy()), row(), row(SamplingParams(top_p=0.5)), row(greedy(logprobs=3))])
    assert all(t < 10 for t in out.token_ids)
    assert all(t < 10 for t, _ in out.logprobs[3].top)


# -- temperature sampling distribution ----------------------------------------------------------
def test_temperature_sampling_matches_softmax_unseeded():
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2])
    temp, n = 0.7, 4000
    rows = [row(SamplingParams(temperature=temp)) for _ in range(n)]
    out = Sampler(8, seed=123)(base.expand(n, 8), rows)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=8).float()
    # df = 7: the 99.9% quantile of chi-square is 24.3; the seed is fixed, so never flaky
    assert chi_square(counts, torch.softmax(base / temp, -1)) < 24.3


def test_temperature_sampling_matches_softmax_seeded():
    base = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0])
    temp, n = 1.3, 2000
    rows = [row(SamplingParams(temperature=temp, seed=1000), index=i) for i in range(n)]
    out = Sampler(5)(base.expand(n, 5), rows)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=5).float()
    assert chi_square(counts, torch.softmax(base / temp, -1)) < 18.5  # df = 4, 99.9%


# -- filters ------------------------------------------------------------------------------------
def _sample_many(params: SamplingParams, logits: torch.Tensor, n: int = 1000) -> set[int]:
    out = Sampler(logits.shape[-1], seed=7)(logits.expand(n, -1), [row(params) for _ in range(n)])
    return set(out.token_ids)


def test_top_k_never_emits_excluded_tokens():
    logits = torch.randn(200, generator=torch.Generator().manual_seed(3))
    allowed = set(logits.topk(5).indices.tolist())
    seen = _sample_many(SamplingParams(top_k=5, temperature=2.0), logits)
    assert seen == allowed  # all 5 reachable, nothing else
    assert _sample_many(SamplingParams(top_k=1), logits) == {int(logits.argmax())}
    # top_k beyond the vocabulary, and -1, mean "off"
    assert len(_sample_many(SamplingParams(top_k=10_000, temperature=2.0), logits[:6])) == 6
    assert len(_sample_many(SamplingParams(top_k=-1, temperature=2.0), logits[:6])) == 6


PROBS = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])


def test_top_p_never_emits_excluded_tokens():
    logits = PROBS.log()[[3, 1, 4, 0, 2]]  # shuffled: ids 3 (0.5) and 1 (0.3) form the 0.75 nucleus
    assert _sample_many(SamplingParams(top_p=0.75), logits) == {1, 3}
    assert _sample_many(SamplingParams(top_p=0.01), logits) == {3}  # at least one token kept
    assert _sample_many(SamplingParams(top_p=0.9), logits) == {1, 3, 4}  # 0.5 + 0.3 + 0.1
    assert _sample_many(SamplingParams(top_p=0.97), logits) == {0, 1, 2, 3, 4}
    # top_k and top_p together: both apply
    assert _sample_many(SamplingParams(top_p=0.97, top_k=2), logits) == {1, 3}


def test_min_p_never_emits_excluded_tokens():
    logits = PROBS.log()
    assert _sample_many(SamplingParams(min_p=0.25), logits) == {0, 1}  # threshold 0.125
    assert _sample_many(SamplingParams(min_p=0.15), logits) == {0, 1, 2}  # threshold 0.075
    assert _sample_many(SamplingParams(min_p=1.0), logits) == {0}


def test_warp_logits_masks_exactly():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 64, generator=g)
    params = [SamplingParams(top_k=7), SamplingParams(top_p=0.3), SamplingParams(min_p=0.2), SamplingParams(temperature=0.5)]
    y = warp_logits(logits, params)
    # top_k: exactly the 7 largest survive, unscaled (temperature 1)
    assert set(torch.isfinite(y[0]).nonzero().flatten().tolist()) == set(logits[0].topk(7).indices.tolist())
    assert torch.equal(y[0][torch.isfinite(y[0])], logits[0][torch.isfinite(y[0])])
    # top_p: the smallest prefix of the descending order reaching 0.3
    p = logits[1].softmax(-1)
    order = p.argsort(descending=True)
    cum = p[order].cumsum(0)
    n_keep = int((cum < 0.3).sum()) + 1
    assert set(torch.isfinite(y[1]).nonzero().flatten().tolist()) == set(order[:n_keep].tolist())
    # min_p
    p = logits[2].softmax(-1)
    assert torch.equal(torch.isfinite(y[2]), p >= 0.2 * p.max())
    # temperature only
    torch.testing.assert_close(y[3], logits[3] / 0.5)


# -- penalties, logit_bias, min_tokens ----------------------------------------------------------
def reference_penalties(logits, prompt, output, rep, freq, pres):
    out = logits.tolist()
    seen = set(prompt) | set(output)
    for t in range(len(out)):
        if t in seen:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
        c = output.count(t)
        out[t] -= freq * c + pres * (c > 0)
    return torch.tensor(out)


def test_penalties_match_reference():
    vocab = 8
    logits = torch.tensor([[1.5, -0.5, 2.0, 0.0, -1.25, 0.75, 3.0, -2.0]]).repeat(5, 1)
    cases = [
        dict(repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.25),
        dict(repetition_penalty=0.8),
        dict(frequency_penalty=-1.0),
        dict(presence_penalty=2.0),
        dict(),  # no penalty: unchanged
    ]
    prompt, output = [1, 2, 7], [2, 3, 3, 5, 3]
    rows = [row(greedy(**c), prompt=prompt, output=output) for c in cases]
    x = Sampler(vocab).process_logits(logits, rows)
    for i, c in enumerate(cases):
        ref = reference_penalties(
            logits[i], prompt, output,
            c.get("repetition_penalty", 1.0), c.get("frequency_penalty", 0.0), c.get("presence_penalty", 0.0),
        )
        torch.testing.assert_close(x[i], ref, rtol=0, atol=1e-6)
    # nothing generated yet: frequency/presence are no-ops; repetition still sees the prompt
    x = Sampler(vocab).process_logits(
        logits[:2], [row(greedy(frequency_penalty=1.0, presence_penalty=1.0), prompt=prompt),
                     row(greedy(repetition_penalty=2.0), prompt=prompt)]
    )
    assert torch.equal(x[0], logits[0])
    torch.testing.assert_close(x[1], reference_penalties(logits[1], prompt, [], 2.0, 0.0, 0.0), rtol=0, atol=1e-6)


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    s = Sampler(3)
    assert s(logits, [row(greedy(), prompt=[0])]).token_ids == [0]
    assert s(logits, [row(greedy(repetition_penalty=1.2), prompt=[0])]).token_ids == [1]
    # frequency/presence count only output tokens, not the prompt
    assert s(logits, [row(greedy(presence_penalty=1.0), prompt=[0])]).token_ids == [0]
    assert s(logits, [row(greedy(presence_penalty=1.0), output=[0])]).token_ids == [1]


def test_logit_bias_forces_and_bans_tokens():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(300, 40, generator=g)
    out = Sampler(40)(logits, [row(SamplingParams(logit_bias={17: 100})) for _ in range(300)])
    assert set(out.token_ids) == {17}
    best = logits.argmax(-1)
    rows = [row(greedy(logit_bias={int(b): -100})) for b in best]
    out = Sampler(40)(logits, rows)
    assert all(t != int(b) for t, b in zip(out.token_ids, best))


def test_min_tokens_blocks_eos_and_stop_token_ids():
    logits = torch.tensor([[10.0, 9.0, 0.0, 1.0, 0.5]])  # 0: EOS, 1: a stop token id
    s = Sampler(5)
    p = greedy(min_tokens=3, stop_token_ids=[1], logit_bias={0: 100})
    assert s(logits, [row(p, output=[4, 4], eos=(0,))]).token_ids == [3]
    assert s(logits, [row(p, output=[4, 4, 4], eos=(0,))]).token_ids == [0]  # min reached
    # random sampling too, for many rows at once
    pr = SamplingParams(min_tokens=2, stop_token_ids=[1])
    out = s(logits.expand(500, 5), [row(pr, output=[4], eos=(0,)) for _ in range(500)])
    assert not {0, 1} & set(out.token_ids)
    # EOS ids not given (the caller handles ignore_eos): only the stop ids are blocked
    assert s(logits, [row(greedy(min_tokens=3, stop_token_ids=[1]), output=[])]).token_ids == [0]


# -- seeds --------------------------------------------------------------------------------------
def _run_batches(layouts, steps, vocab=500):
    """Run `steps` steps for each layout; return the tokens of the named (seeded) rows."""
    g = torch.Generator().manual_seed(11)
    step_logits = {name: [torch.randn(vocab, generator=g) * 3 for _ in range(steps)] for name in "AB"}
    noise_gen = torch.Generator().manual_seed(12)
    results = []
    for layout in layouts:
        sampler = Sampler(vocab, seed=len(results) + 100)
        named = {
            "A": row(SamplingParams(seed=42, temperature=0.9, top_p=0.9, presence_penalty=0.5, logprobs=2), prompt=[1, 2]),
            "B": row(SamplingParams(seed=-7, temperature=1.2, top_k=50, min_p=0.01), index=1),
        }
        tokens = {"A": [], "B": []}
        for step in range(steps):
            rows, logits = [], []
            for name in layout:
                if name in named:
                    rows.append(named[name])
                    logits.append(step_logits[name][step])
                else:  # other traffic: unseeded / greedy / penalised / other seeds
                    kinds = [SamplingParams(), greedy(), SamplingParams(frequency_penalty=1.0, top_k=5), SamplingParams(seed=42)]
                    p = kinds[int(torch.randint(4, (1,), generator=noise_gen))]
                    rows.append(row(p, output=[3, 4]))
                    logits.append(torch.randn(vocab, generator=noise_gen))
            out = sampler(torch.stack(logits), rows)
            for name in "AB":
                if name in layout:
                    t = out.token_ids[layout.index(name)]
                    tokens[name].append(t)
                    named[name].output_token_ids.append(t)
        results.append(tokens)
    return results


def test_seeded_rows_independent_of_batch_and_position():
    layouts = [["A", "B"], ["x", "A", "x", "B"], ["B", "x", "x", "x", "x", "A"], ["x", "x", "B", "A", "x"]]
    results = _run_batches(layouts, steps=6)
    for r in results[1:]:
        assert r == results[0]
    assert len(set(results[0]["A"])) > 1 and len(set(results[0]["B"])) > 1  # really random
    alone = _run_batches([["A"], ["B"]], steps=6)
    assert alone[0]["A"] == results[0]["A"] and alone[1]["B"] == results[0]["B"]


def test_same_seed_sequences_differ_and_repeat():
    vocab, steps = 1000, 20
    logits = torch.zeros(1, vocab)

    def run(index):
        r = row(SamplingParams(seed=5), index=index)
        return [Sampler(vocab)(logits, [r]).token_ids[0] for _ in range(steps)]

    assert run(0) != run(1)  # n > 1 sequences of one request differ
    assert run(0) == run(0)  # and each is reproducible
    g1 = Sampler.make_generator(2**63 - 1, 3, "cpu")  # seed + index past int64 wraps modulo 2**64
    assert g1.initial_seed() == 2**63 + 2
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=Sampler.make_generator(2**63 + 2, 0, "cpu")))
    g2 = Sampler.make_generator(2**64 - 1, 1, "cpu")
    assert g2.initial_seed() == 0


def test_unseeded_sampler_seed_reproducible():
    logits = torch.zeros(8, 300)
    rows = [row() for _ in range(8)]
    assert Sampler(300, seed=1)(logits, rows).token_ids == Sampler(300, seed=1)(logits, rows).token_ids


# -- logprobs -----------------------------------------------------------------------------------
def test_logprobs_are_raw_and_sorted():
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(4, 64, generator=g).to(torch.bfloat16)
    rows = [
        row(SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.5, top_k=3), prompt=[1, 2, 3]),
        row(greedy(logprobs=0, logit_bias={9: 50})),
        row(SamplingParams()),
        row(greedy(logprobs=20)),
    ]
    out = Sampler(64)(logits, rows)
    ref = torch.log_softmax(logits.float(), -1)  # raw logprobs: before any processing
    assert out.logprobs[2] is None
    for i, k in ((0, 5), (1, 0), (3, 20)):
        lp = out.logprobs[i]
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-5)
        assert len(lp.top) == k
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True)
        assert vals == pytest.approx(ref[i].topk(k).values.tolist(), abs=1e-5)
        for t, v in lp.top:
            assert v == pytest.approx(ref[i, t].item(), abs=1e-5)
    assert out.token_ids[1] == 9


def test_compute_logprobs(monkeypatch):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(7, 30, generator=g)
    ids = torch.randint(30, (7,), generator=g)
    ref = torch.log_softmax(logits, -1)
    res = compute_logprobs(logits, ids, 4)
    assert len(res) == 7
    for i, lp in enumerate(res):
        assert lp.token_id == ids[i].item()
        assert lp.logprob == pytest.approx(ref[i, ids[i]].item(), abs=1e-6)
        assert [t for t, _ in lp.top] == ref[i].topk(4).indices.tolist()
        assert math.isclose(sum(math.exp(v) for v in ref[i].tolist()), 1.0, rel_tol=1e-5)
    assert all(lp.top == [] for lp in compute_logprobs(logits, ids, 0))
    assert len(compute_logprobs(logits, ids, 100)[0].top) == 30  # k clamped to the vocab
    assert compute_logprobs(logits[:0], ids[:0], 3) == []
    monkeypatch.setattr(logprobs_mod, "CHUNK_ELEMS", 60)  # 2 rows per chunk
    assert compute_logprobs(logits, ids, 4) == res


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
