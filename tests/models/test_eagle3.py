"""EAGLE-3 heads (models/eagle3.py): a random head in the published layout loads and drafts as a
direct dense formulation of the published tensors does, fed the target's aux hidden states
(MoEForCausalLM.aux_hidden_layers: the residual stream entering each layer, as transformers'
`hidden_states[i]`)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models import load_model
from models.eagle3 import load_eagle3
from models.loader import CheckpointError
from tests.models.conftest import make_checkpoint
from tests.models.simple_runner import SimpleRunner
from tests.models.test_mtp import one_seq_meta, rms

H, V, DV, HEADS, KV, HD, INTER = 64, 320, 100, 4, 2, 16, 96
IDS = [1, 17, 29, 3, 250, 71, 8, 99, 14, 5]


def eagle3_dir(path, prefix: str = "midlayer.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    r = lambda *s: 0.1 * torch.randn(*s, generator=g)  # noqa: E731
    keep = torch.randperm(V, generator=g)[:DV].sort().values
    t = {"fc.weight": r(H, 3 * H), "norm.weight": 1 + r(H), "lm_head.weight": r(DV, H),
         "d2t": keep - torch.arange(DV), "t2d": torch.zeros(V, dtype=torch.bool).index_fill(0, keep, True)}
    layer = {"input_layernorm.weight": 1 + r(H), "hidden_norm.weight": 1 + r(H),
             "post_attention_layernorm.weight": 1 + r(H), "self_attn.q_proj.weight": r(HEADS * HD, 2 * H),
             "self_attn.k_proj.weight": r(KV * HD, 2 * H), "self_attn.v_proj.weight": r(KV * HD, 2 * H),
             "self_attn.o_proj.weight": r(H, HEADS * HD), "mlp.gate_proj.weight": r(INTER, H),
             "mlp.up_proj.weight": r(INTER, H), "mlp.down_proj.weight": r(H, INTER)}
    t.update({prefix + k: v for k, v in layer.items()})
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLMEagle3"], model_type="llama", hidden_size=H, num_attention_heads=HEADS,
        num_key_value_heads=KV, head_dim=HD, intermediate_size=INTER, rms_norm_eps=1e-6, rope_theta=10000.0,
        vocab_size=V, draft_vocab_size=DV, num_hidden_layers=1, max_position_embeddings=512)))
    return {k.replace("model.layers.0.", "midlayer."): v for k, v in t.items()}


def rope(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2).float() / d)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_logits(t, embed, aux_cat, ids):
    """Dense, whole-sequence EAGLE-3 step written from the published tensors: [n, V] over the target
    vocabulary (-inf outside the draft vocabulary)."""
    m = "midlayer."
    hid = aux_cat @ t["fc.weight"].T
    emb = F.embedding(ids, embed)
    x = torch.cat([rms(emb, t[m + "input_layernorm.weight"]), rms(hid, t[m + "hidden_norm.weight"])], -1)
    n = x.shape[0]
    pos = torch.arange(n)
    q = rope((x @ t[m + "self_attn.q_proj.weight"].T).view(n, HEADS, HD), pos)
    k = rope((x @ t[m + "self_attn.k_proj.weight"].T).view(n, KV, HD), pos).repeat_interleave(HEADS // KV, 1)
    v = (x @ t[m + "self_attn.v_proj.weight"].T).view(n, KV, HD).repeat_interleave(HEADS // KV, 1)
    a = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    h = hid + a.transpose(0, 1).reshape(n, -1) @ t[m + "self_attn.o_proj.weight"].T
    z = rms(h, t[m + "post_attention_layernorm.weight"])
    h = h + (F.silu(z @ t[m + "mlp.gate_proj.weight"].T) * (z @ t[m + "mlp.up_proj.weight"].T)) @ t[
        m + "mlp.down_proj.weight"].T
    draft = rms(h, t["norm.weight"]) @ t["lm_head.weight"].T
    out = torch.full((n, V), float("-inf"))
    out[:, torch.arange(DV) + t["d2t"]] = draft
    return out


@pytest.mark.parametrize("prefix", ["midlayer.", "model.layers.0."])
def test_eagle3_head_loads_and_drafts(tmp_path, prefix):
    ref_model = make_checkpoint("mixtral", tmp_path / "target")
    tensors = eagle3_dir(tmp_path / "eagle3", prefix)
    target = load_model(str(tmp_path / "target"), dtype="float32", device="cpu", progress=False)
    head = load_eagle3(str(tmp_path / "eagle3"), target.config.num_layers, H, V)
    aux_layers = head.config.aux_layers(target.config.num_layers)
    assert aux_layers == (2, 1, 0)  # (2, L // 2, L - 3) for L = 3
    target.aux_hidden_layers = aux_layers
    with torch.inference_mode():
        runner = SimpleRunner(target, 32, 1)
        runner.step([0], [IDS], [0])
        aux = torch.cat(target.aux_hidden, -1)  # [n, 3H]
    # the captured states are transformers' hidden_states[i] (the input of layer i)
    with torch.no_grad():
        hf = ref_model(input_ids=torch.tensor([IDS]), output_hidden_states=True).hidden_states
    for j, i in enumerate(sorted(aux_layers)):  # kept in layer order, as vLLM concatenates them
        assert torch.allclose(aux[:, j * H: (j + 1) * H], hf[i][0], atol=1e-5)

    n = len(IDS) - 1
    expect = reference_logits(tensors, target.embed.weight.detach(), aux[:n], torch.tensor(IDS[1:]))
    with torch.inference_mode():
        cache = head.allocate_kv_cache(runner.tables.numel(), runner.block_size)
        pos = torch.arange(n)
        normed, pre = head(torch.tensor(IDS[1:]), pos, aux[:n], one_seq_meta(runner, 0, n), cache, target.embed)
        logits = head.compute_logits(normed)
        # a chained step: the draft fed back with the head's own pre-norm state, at the next position
        d1 = int(logits[-1].argmax())
        normed2, _ = head(torch.tensor([d1]), torch.tensor([n]), pre[-1:], one_seq_meta(runner, n, 1), cache,
                          target.embed)
        d2 = int(head.compute_logits(normed2)[0].argmax())
    assert torch.allclose(logits, expect, atol=1e-4)
    allowed = set((torch.arange(DV) + tensors["d2t"]).tolist())
    assert d1 in allowed and d2 in allowed and not torch.isfinite(logits[0, [i for i in range(V)
                                                                              if i not in allowed]]).any()


def test_eagle3_refuses_mismatched_heads(tmp_path):
    eagle3_dir(tmp_path)
    with pytest.raises(Exception, match="vocabulary 320 differs"):
        load_eagle3(str(tmp_path), 3, H, 999)
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "model.safetensors"))
    del t["midlayer.hidden_norm.weight"]
    save_file(t, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors.*midlayer.hidden_norm.weight"):
        load_eagle3(str(tmp_path), 3, H, V)
