"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): the indexer's choice matters in the tiny
parity configs (so tests/models/test_parity.py checks the sparse path, not dense attention), and
the index keys live in the paged cache beside MLA's latents."""

from __future__ import annotations

import torch

from models import load_model
from tests.models.simple_runner import prefill_logits
from tests.models.test_parity import PROMPTS


def test_the_indexer_choice_changes_the_logits(family_checkpoint):
    for family in ("deepseek_v32", "glm_moe_dsa"):
        path, _ = family_checkpoint(family)
        model = load_model(path, dtype="float32", device="cpu", progress=False)
        sparse = prefill_logits(model, PROMPTS)
        indexers = [layer.attn.indexer for layer in model.layers if hasattr(layer.attn, "indexer")]
        assert indexers and all(ix.topk < len(PROMPTS[-1]) for ix in indexers)
        for ix in indexers:
            ix.topk = 10**6  # every token chosen: dense MLA
        dense = prefill_logits(model, PROMPTS)
        # up to topk tokens a query attends to all of its context either way; past it they differ
        short = [i for i, p in enumerate(PROMPTS) if len(p) <= 8]
        for i in short:
            assert torch.equal(sparse[i], dense[i])
        assert (sparse[-1][8:] - dense[-1][8:]).abs().max() > 1e-3, family
        if family == "glm_moe_dsa":  # the middle layer ("S") reuses the first layer's choice
            assert not hasattr(model.layers[1].attn, "indexer") and hasattr(model.layers[2].attn, "indexer")


def test_index_keys_are_cached_per_token(family_checkpoint):
    path, _ = family_checkpoint("deepseek_v32")
    model = load_model(path, dtype="float32", device="cpu", progress=False)
    cfg = model.config
    # latent 32 + rotary key 8 + index key 16 per token and layer
    assert cfg.kv_bytes_per_token(4) == cfg.num_layers * (32 + 8 + 16) * 4
    lat, pe = model.allocate_kv_cache(2, 4)[0]
    assert tuple(lat.shape) == (2, 4, 1, 32) and tuple(pe.shape) == (2, 4, 1, 8 + 16)
