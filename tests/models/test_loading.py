"""Config and checkpoint errors name what is wrong; routing is observable on request."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import UnsupportedModelError, load_model
from models.hf_config import load_config
from tests.models.simple_runner import prefill_logits
from models.layers.moe import RoutingCapture
from models.loader import CheckpointError
from tests.models.conftest import make_checkpoint


@pytest.fixture()
def mixtral_dir(tmp_path):
    make_checkpoint("mixtral", tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_weights(path, fn):
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_config_fields(mixtral_dir):
    cfg = load_config(str(mixtral_dir))
    assert (cfg.architecture, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob) == ("MixtralForCausalLM", 8, 2, True)
    assert cfg.head_dim == 16 and cfg.sparse_layers == (True, True, True)


def test_unsupported_architecture_named(mixtral_dir):
    _edit_config(mixtral_dir, architectures=["DbrxForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="DbrxForCausalLM"):
        load_config(str(mixtral_dir))


def test_unsupported_options_named(mixtral_dir):
    _edit_config(mixtral_dir, hidden_act="gelu")
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        load_config(str(mixtral_dir))


def test_sliding_window_read_per_layer(mixtral_dir):
    _edit_config(mixtral_dir, sliding_window=64)
    assert load_config(str(mixtral_dir)).sliding_windows == (64, 64, 64)
    _edit_config(mixtral_dir, sliding_window=4096)  # not narrower than the context: plain attention
    assert load_config(str(mixtral_dir)).sliding_windows == ()


def test_unsupported_rope_named(mixtral_dir):
    _edit_config(mixtral_dir, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="longrope"):
        load_config(str(mixtral_dir))


def test_missing_tensor_named(mixtral_dir):
    _edit_weights(mixtral_dir, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.1\.block_sparse_moe\.experts\.3\.w2"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


def test_unexpected_tensor_named(mixtral_dir):
    _edit_weights(mixtral_dir, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model\.layers\.0\.extra\.weight"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


def test_shape_mismatch_named(mixtral_dir):
    def shrink(t):
        t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][:-1]
    _edit_weights(mixtral_dir, shrink)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight: checkpoint \(31, 64\)"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


def test_no_weights(tmp_path, mixtral_dir):
    os.remove(mixtral_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="no safetensors"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


def test_routing_capture_only_when_asked(mixtral_dir):
    model = load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)
    prompts = [[1, 2, 3, 4, 5]]
    capture = RoutingCapture(with_weights=True)
    with_capture = prefill_logits(model, prompts, capture)[0]
    without = prefill_logits(model, prompts)[0]
    assert torch.equal(with_capture, without)
    ids = capture.stacked_ids()
    assert ids.shape == (5, 3, 2)  # [tokens, moe layers, top_k]
    assert int(ids.min()) >= 0 and int(ids.max()) < 8
    for layer, w in capture.weights.items():
        assert torch.allclose(w.sum(-1), torch.ones(5), atol=1e-6)  # Mixtral renormalises


# -- hostile or broken checkpoints (issue 25, item 10) ----------------------------------------
def _shard(path, names):
    """Split model.safetensors in two shards with an index whose weight map names `names`."""
    tensors = load_file(str(path / "model.safetensors"))
    os.remove(path / "model.safetensors")
    keys = sorted(tensors)
    half = len(keys) // 2
    save_file({k: tensors[k] for k in keys[:half]}, str(path / "a.safetensors"), metadata={"format": "pt"})
    second = path / names[1] if not os.path.isabs(names[1]) else names[1]
    save_file({k: tensors[k] for k in keys[half:]}, str(second), metadata={"format": "pt"})
    weight_map = {k: names[0] for k in keys[:half]} | {k: names[1] for k in keys[half:]}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("escape", ["../outside.safetensors", "{abs}"])
def test_index_shards_outside_the_model_directory_are_refused(tmp_path, escape):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    make_checkpoint("mixtral", model_dir)
    name = str(tmp_path / "elsewhere.safetensors") if escape == "{abs}" else escape
    _shard(model_dir, ["a.safetensors", name])
    with pytest.raises(CheckpointError, match="outside the model directory"):
        load_model(str(model_dir), dtype="float32", device="cpu", progress=False)


def test_shards_linked_from_elsewhere_load(tmp_path, mixtral_dir):
    """The Hugging Face cache links a snapshot's files to shared blobs: a symlink the directory
    holds is followed (only the index's names must stay inside)."""
    base = prefill_logits(load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False), [[1, 2, 3]])
    blob = tmp_path / "blobs"
    blob.mkdir()
    os.replace(mixtral_dir / "model.safetensors", blob / "abc123")
    os.symlink(blob / "abc123", mixtral_dir / "model.safetensors")
    model = load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)
    assert torch.equal(prefill_logits(model, [[1, 2, 3]])[0], base[0])


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float64])
def test_weights_in_dtypes_they_cannot_have_are_refused(mixtral_dir, dtype):
    """Not cast silently (int8 experts would then compute garbage): named, with the hint."""
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    _edit_weights(mixtral_dir, lambda t: t.__setitem__(name, t[name].to(dtype)))
    with pytest.raises(CheckpointError, match=rf"dtype these weights cannot have.*quantization_config.*{name}"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(mixtral_dir, bad):
    name = "model.layers.0.self_attn.q_proj.weight"

    def poison(t):
        t[name] = t[name].clone()
        t[name][3, 5] = bad
    _edit_weights(mixtral_dir, poison)
    with pytest.raises(CheckpointError, match=rf"NaN or infinity \(1\): {name}"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


@pytest.mark.parametrize("changes, named", [
    (dict(num_hidden_layers=0), "num_hidden_layers=0"),
    (dict(num_attention_heads=0), "num_attention_heads=0"),
    (dict(vocab_size=-5), "vocab_size=-5"),
    (dict(num_key_value_heads=3), "does not divide"),
    (dict(num_local_experts=10**9), r"weights need \d+\.\d GiB in float32 .*1000000000 experts.*available"),
    (dict(hidden_size=10**6), r"weights need \d+\.\d GiB in float32"),
])
def test_impossible_configs_are_named_before_any_allocation(mixtral_dir, changes, named):
    _edit_config(mixtral_dir, **changes)
    with pytest.raises(UnsupportedModelError, match=named):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)
