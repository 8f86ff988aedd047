"""Greedy parity: the vLLM engine (through our server) and our native engine (offline, in this
process) produce the same 32 tokens for the same prompts, with close logprobs (both float32)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm

PROMPTS = ["The list data type", "def ", "Return a new", "Explain json.dumps.", "import os\n"]
NUM_TOKENS = 32
LOGPROB_ATOL = 2e-2  # float32 on both sides; different kernels and summation orders


@pytest.fixture(scope="module")
def native(vllm_model):
    from server.engine.llm import LLM

    return LLM(vllm_model, dtype="float32", device="cpu", max_model_len=512, seed=0)


def test_greedy_tokens_match_native(vllm_server, client, model_name, native):
    from server.api.tokens import TokenText
    from server.engine.request import SamplingParams

    tok = native.tokenizer
    token_text = TokenText(tok)
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    sp = SamplingParams(temperature=0.0, max_tokens=NUM_TOKENS, ignore_eos=True, logprobs=1)
    expected = native.generate(prompt_ids, sp, use_tqdm=False)

    mismatches = []
    for ids, exp in zip(prompt_ids, expected):
        r = client.completions.create(model=model_name, prompt=ids, max_tokens=NUM_TOKENS, temperature=0, logprobs=1,
                                      extra_body={"ignore_eos": True})
        lp = r.choices[0].logprobs
        native_ids = exp.outputs[0].token_ids
        assert len(native_ids) == NUM_TOKENS and len(lp.tokens) == NUM_TOKENS
        want = [token_text.text(t) for t in native_ids]
        if lp.tokens != want:
            k = next(i for i, (a, b) in enumerate(zip(lp.tokens, want)) if a != b)
            mismatches.append(f"prompt {ids}: first difference at token {k}: vllm {lp.tokens[k]!r} "
                              f"(top {lp.top_logprobs[k]}) vs native {want[k]!r} "
                              f"(logprob {exp.outputs[0].logprobs[k].logprob:.5f}, "
                              f"top {exp.outputs[0].logprobs[k].top})")
            continue
        assert r.choices[0].text == exp.outputs[0].text
        native_lps = [x.logprob for x in exp.outputs[0].logprobs]
        assert lp.token_logprobs == pytest.approx(native_lps, abs=LOGPROB_ATOL)
    assert not mismatches, "\n".join(mismatches)
