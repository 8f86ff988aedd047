"""Multi-token-prediction layers (models/mtp.py): loaded from DeepSeek-V3's published tensor names,
their paged forward against a direct formulation on transformers' own DeepSeek-V3 decoder layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from models import load_model
from models.config import UnsupportedModelError
from models.layers.paged import AttentionMetadata
from models.loader import CheckpointError
from tests.models.conftest import edit_weights, make_checkpoint
from tests.models.simple_runner import SimpleRunner

L = 3  # the tiny config's num_hidden_layers: the MTP layer is model.layers.3
PROMPT = [1, 17, 29, 3, 250, 71, 8, 99, 14, 5, 31, 7]


def mtp_checkpoint(path, tmp_path, own_head: bool):
    """A tiny random DeepSeek-V3 checkpoint with one MTP layer in the published layout (with its own
    `embed_tokens` and `shared_head.head` copies when `own_head`)."""
    make_checkpoint("deepseek_v3", path, num_nextn_predict_layers=1)
    extra = tmp_path / "extra"
    make_checkpoint("deepseek_v3", extra, seed=1, num_hidden_layers=L + 1)  # its layer 3: the MTP block
    block = {k: v for k, v in load_file(str(extra / "model.safetensors")).items()
             if k.startswith(f"model.layers.{L}.")}
    g = torch.Generator().manual_seed(2)
    H, V = 64, 320

    def add(tensors):
        tensors.update(block)
        p = f"model.layers.{L}."
        tensors[p + "enorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        tensors[p + "hnorm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        tensors[p + "eh_proj.weight"] = 0.1 * torch.randn(H, 2 * H, generator=g)
        tensors[p + "shared_head.norm.weight"] = 1 + 0.1 * torch.randn(H, generator=g)
        if own_head:
            tensors[p + "embed_tokens.weight"] = 0.1 * torch.randn(V, H, generator=g)
            tensors[p + "shared_head.head.weight"] = 0.1 * torch.randn(V, H, generator=g)

    edit_weights(path, add)
    return load_file(str(path / "model.safetensors"))


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_models(path):
    """transformers' main model and the same checkpoint read with the MTP block as its layer 3."""
    main = transformers.DeepseekV3ForCausalLM.from_pretrained(path, attn_implementation="sdpa",
                                                              dtype=torch.float32).eval()
    with_block = transformers.DeepseekV3ForCausalLM.from_pretrained(
        path, num_hidden_layers=L + 1, attn_implementation="sdpa", dtype=torch.float32).eval()
    return main, with_block


@torch.no_grad()
def reference_mtp_logits(models, tensors, ids: list[int], own_head: bool) -> torch.Tensor:
    """MTP logits at positions 0..len(ids)-2 (drafting ids[t+2]), written out directly: transformers'
    main model for the hidden states, its decoder layer class (loaded as layer 3) for the block."""
    main, with_block = models
    p = f"model.layers.{L}."
    x = torch.tensor([ids])
    hidden = main.model(input_ids=x).last_hidden_state[:, :-1]  # h_t after the final norm
    embed = tensors[p + "embed_tokens.weight"] if own_head else main.model.embed_tokens.weight
    emb = F.embedding(x[:, 1:], embed)
    emb[:, 0] = 0  # position 0
    h = torch.cat([rms(emb, tensors[p + "enorm.weight"]), rms(hidden, tensors[p + "hnorm.weight"])], -1)
    h = h @ tensors[p + "eh_proj.weight"].T
    pos = torch.arange(h.shape[1])[None]
    cos_sin = with_block.model.rotary_emb(h, pos)
    h = with_block.model.layers[L](h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
    h = rms(h, tensors[p + "shared_head.norm.weight"])
    head = tensors[p + "shared_head.head.weight"] if own_head else main.lm_head.weight
    return (h @ head.T)[0]


def one_seq_meta(runner: SimpleRunner, start: int, n: int) -> AttentionMetadata:
    """Sequence 0 of `runner`, tokens at positions start..start+n-1."""
    bs = runner.block_size
    slots = [int(runner.tables[0, q // bs]) * bs + q % bs for q in range(start, start + n)]
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return AttentionMetadata(num_decodes=1 if n == 1 else 0, query_start_loc=[0, n], seq_lens=[start + n],
                             slot_mapping=t(slots), block_tables=runner.tables[:1],
                             decode_seq_lens=t([start + n]) if n == 1 else t([]), state_slots=t([0]))


@pytest.mark.parametrize("own_head", [False, True], ids=["shared-head", "own-head"])
def test_mtp_layer_matches_reference(tmp_path, own_head):
    path = tmp_path / "ckpt"
    tensors = mtp_checkpoint(path, tmp_path, own_head)
    model = load_model(str(path), dtype="float32", device="cpu", progress=False, mtp=True)
    mtp = model.mtp
    assert mtp.num_layers == 1 and (mtp.layers[0].head is not None) == own_head
    ids = PROMPT
    ref = reference_mtp_logits(reference_models(str(path)), tensors, ids, own_head)

    with torch.inference_mode():
        runner = SimpleRunner(model, 32, 1)
        caches = mtp.allocate_kv_cache(runner.tables.numel(), runner.block_size)
        hidden = runner.step([0], [ids], [0])  # the target's prefill: h_0..h_{n-1}
        n = len(ids)
        # MTP prefill over positions 0..n-3 (tokens 1..n-2), then one decode step at n-2 (token n-1)
        pos = torch.arange(n - 2)
        out = mtp(torch.tensor(ids[1:n - 1]), pos, hidden[: n - 2], one_seq_meta(runner, 0, n - 2), caches)
        logits = mtp.compute_logits(out)
        step = mtp(torch.tensor(ids[n - 1:]), torch.tensor([n - 2]), hidden[n - 2: n - 1],
                   one_seq_meta(runner, n - 2, 1), caches)
        logits = torch.cat([logits, mtp.compute_logits(step)])
    assert logits.shape == ref.shape == (n - 1, 320)
    diff = (logits - ref).abs().max().item()
    assert diff < 1e-4, f"max abs logit diff {diff}"


def test_mtp_tensors_skipped_without_mtp_and_required_with_it(tmp_path):
    path = tmp_path / "ckpt"
    mtp_checkpoint(path, tmp_path, own_head=False)
    model = load_model(str(path), dtype="float32", device="cpu", progress=False)
    assert not hasattr(model, "mtp")
    # a published name missing: the loader names it
    edit_weights(path, lambda t: t.pop(f"model.layers.{L}.eh_proj.weight"))
    with pytest.raises(CheckpointError, match=rf"missing tensors.*model\.layers\.{L}\.eh_proj\.weight"):
        load_model(str(path), dtype="float32", device="cpu", progress=False, mtp=True)


def test_mtp_refused_without_mtp_layers(tmp_path):
    make_checkpoint("deepseek_v3", tmp_path, num_nextn_predict_layers=0)
    with pytest.raises(UnsupportedModelError, match="no MTP layers"):
        load_model(str(tmp_path), dtype="float32", device="cpu", progress=False, mtp=True)


def test_bundled_tiny_deepseek_mtp(tmp_path):
    """The bundled checkpoint: without MTP, logits equal transformers' DeepseekV3ForCausalLM; with
    MTP, the layer loads from its published names and predicts as the direct formulation does."""
    from models.checkpoints.train_tiny_mtp import OUT_DIR

    path = str(OUT_DIR)
    ids = [0, 464, 1242, 2001, 1112, 13, 1130, 389]
    plain = load_model(path, dtype="float32", device="cpu", progress=False)
    assert not hasattr(plain, "mtp")
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0]
        got = plain.compute_logits(SimpleRunner(plain, 16, 1).step([0], [ids], [0]))
    assert (got - want).abs().max().item() < 1e-4

    model = load_model(path, dtype="float32", device="cpu", progress=False, mtp=True)
    assert model.mtp.num_layers == 1 and model.mtp.layers[0].head is None  # the main LM head is shared
    tensors = {k: v.float() for k, v in load_file(f"{path}/model.safetensors").items()}
    expect = reference_mtp_logits((ref, reference_models(path)[1]), tensors, ids, own_head=False)
    with torch.inference_mode():
        runner = SimpleRunner(model, 16, 1)
        hidden = runner.step([0], [ids], [0])
        caches = model.mtp.allocate_kv_cache(runner.tables.numel(), runner.block_size)
        n = len(ids) - 1
        out = model.mtp(torch.tensor(ids[1:]), torch.arange(n), hidden[:n], one_seq_meta(runner, 0, n), caches)
        logits = model.mtp.compute_logits(out)
    assert (logits - expect).abs().max().item() < 1e-3
    assert torch.equal(logits.argmax(-1), expect.argmax(-1))
