"""CUDA parity in bf16 (pytest -m cuda, on a machine with an NVIDIA GPU)."""

from __future__ import annotations

import copy

import pytest
import torch

from models import load_model
from models.generate import greedy_generate, prefill_logits
from tests.models.conftest import FAMILIES
from tests.models.test_parity import PROMPTS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_cuda_matches_transformers(family, family_checkpoint):
    path, ref = family_checkpoint(family)
    ref = copy.deepcopy(ref).to("cuda", torch.bfloat16)  # the session fixture stays float32 on the CPU
    model = load_model(path, dtype="bfloat16", device="cuda", progress=False)
    ours = prefill_logits(model, PROMPTS)
    agree = 0.0
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            r = ref(torch.tensor([p], device="cuda")).logits[0].float()
        diff = (ours[i].float() - r).abs().max().item()
        assert diff <= 0.1, f"{family} prompt {i}: bf16 max abs logit diff {diff}"
        agree += (ours[i].argmax(-1) == r.argmax(-1)).float().mean().item()
    assert agree / len(PROMPTS) >= 0.9
    # greedy tokens: bf16 rounding can flip near-ties, so compare the first 8 tokens
    ref.generation_config.eos_token_id = None
    out = greedy_generate(model, PROMPTS[1:2], 8)[0]
    with torch.no_grad():
        r = ref.generate(torch.tensor([PROMPTS[1]], device="cuda"), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out == r[0, len(PROMPTS[1]):].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp32_cuda_matches_transformers(family, family_checkpoint):
    """Every path on the GPU (MLA absorbed decode, window / chunk / sink attention, router and
    expert variants) in float32 against transformers on the CPU."""
    path, ref = family_checkpoint(family)
    model = load_model(path, dtype="float32", device="cuda", progress=False)
    ours = prefill_logits(model, PROMPTS)
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            r = ref(torch.tensor([p])).logits[0]
        diff = (ours[i].cpu() - r).abs().max().item()
        assert diff <= 1e-3, f"{family} prompt {i}: fp32 CUDA max abs logit diff {diff}"
    ref.generation_config.eos_token_id = None
    out = greedy_generate(model, PROMPTS[1:2], 16)[0]
    with torch.no_grad():
        r = ref.generate(torch.tensor([PROMPTS[1]]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert out == r[0, len(PROMPTS[1]):].tolist()
