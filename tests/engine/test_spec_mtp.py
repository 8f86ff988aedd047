"""The `mtp` proposer (server/engine/native/spec/mtp.py) in the engine: greedy outputs identical
with and without speculation (chained k = 2, chunked prefill and prefix-cache hits), the
first draft of every step equal to the MTP layer's own prediction on the final sequence (a direct
formulation on transformers' layers), and the bundled tiny-deepseek-mtp accepting drafts for real."""

from __future__ import annotations

import json
import os

import pytest
import torch

from models.checkpoints.train_tiny_mtp import OUT_DIR as BUNDLED
from server.engine.llm import LLM
from server.engine.request import SamplingParams
from tests.conftest import save_test_tokenizer
from tests.models.test_mtp import mtp_checkpoint, reference_mtp_logits, reference_models

PROMPTS = [[5, 6, 7], list(range(2, 40))]


@pytest.fixture(scope="module")
def random_mtp(tmp_path_factory):
    path = tmp_path_factory.mktemp("mtp-engine") / "ckpt"
    tensors = mtp_checkpoint(path, path.parent, own_head=False)
    save_test_tokenizer(path)
    return str(path), tensors


def spec(k: int) -> str:
    return json.dumps({"method": "mtp", "num_speculative_tokens": k})


def generate(llm: LLM, prompts, n: int = 10):
    sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    return [r.outputs[0].token_ids for r in llm.generate(prompts, sp, use_tqdm=False)]


def check_pool(llm: LLM) -> None:
    core = llm.core
    assert not core.has_unfinished() and core.pool.num_free == core.pool.num_blocks


def test_mtp_drafts_are_the_mtp_layers_predictions_and_greedy_is_unchanged(random_mtp):
    """Chained k = 2 with chunked prompts (24-token steps), blocks of 8 and, the second time round,
    prefix-cache hits: greedy output unchanged, and every first draft is the MTP layer's argmax at
    the sequence's last position given the target's hidden states of the whole final sequence."""
    path, tensors = random_mtp
    kw = dict(dtype="float32", max_num_batched_tokens=24, block_size=8)
    base = generate(LLM(path, **kw), PROMPTS)
    llm = LLM(path, speculative_config=spec(2), **kw)
    seen: list[tuple[list[int], int]] = []  # (tokens so far, first draft)
    proposer = llm.core.spec.proposer
    inner = proposer.propose

    def record(requests, target):
        drafts = inner(requests, target)
        seen.extend((list(r.seq.token_ids), d.tokens[0]) for r, d in zip(requests, drafts) if d.tokens)
        return drafts

    proposer.propose = record
    out = generate(llm, PROMPTS)
    again = generate(llm, PROMPTS)  # the prompts' full blocks are prefix-cache hits now
    assert out == again == base
    assert llm.core.total_prefix_hit_tokens > 0
    assert llm.core.spec.totals["draft_tokens"] > llm.core.spec.totals["drafts"]  # chained: 2 drafts a step
    check_pool(llm)
    finals = {tuple(p): p + o for p, o in zip(PROMPTS, out)}
    models = reference_models(path)
    refs = {k: reference_mtp_logits(models, tensors, v, own_head=False).argmax(-1) for k, v in finals.items()}
    checked = 0
    for tokens, draft in seen:
        prompt = next(p for p in PROMPTS if len(tokens) >= len(p) and finals[tuple(p)][: len(tokens)] == tokens)
        assert draft == int(refs[tuple(prompt)][len(tokens) - 2]), f"draft after {len(tokens)} tokens"
        checked += 1
    assert checked >= 2 * len(PROMPTS) * 3


@pytest.mark.skipif(not os.path.isfile(BUNDLED / "model.safetensors"), reason="bundled checkpoint not built")
def test_bundled_tiny_deepseek_mtp_accepts_drafts():
    path = str(BUNDLED)
    prompts = ["The list data type"]
    base = generate(LLM(path, dtype="float32"), prompts, 12)
    llm = LLM(path, dtype="float32", speculative_config=spec(2))
    assert generate(llm, prompts, 12) == base
    t = llm.core.spec.totals
    assert t["accepted"] / t["draft_tokens"] > 0.15, t  # a trained MTP head; chance is ~1 / 4096
    check_pool(llm)


def test_eagle3_head_drafts_in_the_engine(checkpoint, tmp_path):
    """`eagle3`: a random EAGLE-3 head in the published layout over a tiny Mixtral (3 layers: aux
    states of layers 0, 1, 2) drafts from its draft vocabulary, chained; greedy output unchanged."""
    from tests.models.test_eagle3 import eagle3_dir

    path, _ = checkpoint("mixtral")
    tensors = eagle3_dir(tmp_path / "eagle3")
    kw = dict(dtype="float32", block_size=8)
    base = generate(LLM(path, **kw), PROMPTS)
    cfg = json.dumps({"method": "eagle3", "model": str(tmp_path / "eagle3"), "num_speculative_tokens": 2})
    llm = LLM(path, speculative_config=cfg, **kw)
    proposer = llm.core.spec.proposer
    drafted: list[int] = []
    inner = proposer.propose
    proposer.propose = lambda requests, target: [drafted.extend(d.tokens) or d for d in inner(requests, target)]
    assert generate(llm, PROMPTS) == base
    assert proposer.aux_hidden_layers == llm.core.model.aux_hidden_layers == (0, 1, 2)
    allowed = set((torch.arange(100) + tensors["d2t"]).tolist())
    assert len(drafted) >= len(PROMPTS) * 2 * 5 and set(drafted) <= allowed
    check_pool(llm)


def kv_bytes(caches) -> int:
    return sum(t.numel() * t.element_size() for pair in caches for t in pair)


def test_mtp_kv_is_inside_the_kv_cache_budget(random_mtp):
    """--kv-cache-memory holds the target's blocks and the MTP layer's (one per target block, plus
    the chained drafts' scratch blocks): fewer target blocks than without MTP, both reported."""
    path, _ = random_mtp
    budget = 1 << 20
    kw = dict(dtype="float32", block_size=8, kv_cache_memory=budget, max_num_seqs=4)
    plain, llm = LLM(path, **kw), LLM(path, speculative_config=spec(3), **kw)
    kv, kv0 = llm.model_info.kv_cache, plain.model_info.kv_cache
    assert kv0["draft_bytes"] == 0 and kv0["target_bytes"] <= budget
    per_block = kv0["target_bytes"] // kv0["blocks"]
    assert kv["blocks"] == llm.core.pool.num_blocks < kv0["blocks"]
    assert kv["target_bytes"] == kv["blocks"] * per_block
    assert kv["draft_bytes"] == kv_bytes(llm.core.spec.proposer.kv_caches) > 0
    assert kv["target_bytes"] + kv["draft_bytes"] <= budget
    # the split follows the per-token KV sizes (the MTP layer: one layer's worth of the target's)
    layers = llm.core.model.config.num_layers
    assert kv["draft_bytes"] > kv["target_bytes"] / layers
    assert generate(llm, PROMPTS) == generate(plain, PROMPTS)
