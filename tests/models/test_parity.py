"""Our native model vs transformers on the same weights: logits, router choices, greedy text."""

from __future__ import annotations

import os

import pytest
import torch

from models import load_model
from models.generate import greedy_generate, prefill_logits
from models.layers.moe import RoutingCapture
from tests.models.conftest import FAMILIES, make_checkpoint

PROMPTS = [[7], [1, 17, 29, 3, 250, 71, 8, 99, 14, 5, 31], [1, 4, 4, 4], list(range(2, 40))]


def hf_padded_logits(ref, prompts):
    """transformers forward on a right-padded batch with an attention mask."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
        mask[i, : len(p)] = 1
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, output_router_logits=True)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_and_router_match_transformers(family, family_checkpoint):
    path, ref = family_checkpoint(family)
    if family == "qwen3_moe":
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json")), "expected a sharded checkpoint"
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    capture = RoutingCapture()
    ours = prefill_logits(model, PROMPTS, capture)
    out = hf_padded_logits(ref, PROMPTS)
    for i, p in enumerate(PROMPTS):
        diff = (ours[i] - out.logits[i, : len(p)]).abs().max().item()
        assert diff <= 1e-4, f"{family} prompt {i}: max abs logit diff {diff}"

    # router top-k ids: transformers returns router logits per MoE layer, [batch * seq, E]
    cfg = model.config
    moe_layers = [i for i, s in enumerate(cfg.sparse_layers) if s]
    ref_router = [r for r in out.router_logits if r is not None]
    assert len(ref_router) == len(moe_layers) == len(capture.expert_ids)
    longest = max(len(p) for p in PROMPTS)
    for layer, rl in zip(moe_layers, ref_router):
        rl = rl.view(len(PROMPTS), longest, -1)
        ref_ids = torch.cat([rl[i, : len(p)] for i, p in enumerate(PROMPTS)]).topk(cfg.top_k, -1).indices
        ours_ids = capture.expert_ids[layer]
        assert torch.equal(ref_ids.sort(-1).values, ours_ids.sort(-1).values), f"{family} layer {layer} router ids"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_continuation_matches_transformers(family, family_checkpoint):
    path, ref = family_checkpoint(family)
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    prompts = PROMPTS[1:]
    ours = greedy_generate(model, prompts, 32)
    ref.generation_config.eos_token_id = None  # no early stop: compare all 32 tokens
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            r = ref.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert o == r[0, len(p):].tolist(), f"{family}: greedy continuation differs"


def test_bf16_checkpoint_loads_in_float32(tmp_path):
    ref = make_checkpoint("mixtral", tmp_path, dtype=torch.bfloat16, seed=3)
    model = load_model(str(tmp_path), dtype="float32", device="cpu", progress=False)
    assert model.embed.weight.dtype == torch.float32
    ref = ref.float()
    ours = prefill_logits(model, PROMPTS[1:3])
    for i, p in enumerate(PROMPTS[1:3]):
        with torch.no_grad():
            r = ref(torch.tensor([p])).logits[0]
        assert (ours[i] - r).abs().max().item() <= 1e-4


def test_bf16_compute_close_to_float32(family_checkpoint):
    path, _ = family_checkpoint("mixtral")
    m32 = load_model(path, dtype="float32", device="cpu", progress=False)
    m16 = load_model(path, dtype="bfloat16", device="cpu", progress=False)
    assert m16.embed.weight.dtype == torch.bfloat16
    a, b = prefill_logits(m32, PROMPTS[1:2])[0], prefill_logits(m16, PROMPTS[1:2])[0]
    assert (a - b).abs().max().item() < 0.1
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() > 0.8
