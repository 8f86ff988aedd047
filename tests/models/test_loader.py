"""Checkpoint loading (models/loader.py): missing, unexpected, mis-shaped, mis-typed, non-finite
and out-of-directory tensors are named and refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import load_model
from tests.models.simple_runner import prefill_logits
from models.loader import CheckpointError
from tests.models.conftest import edit_weights, make_checkpoint


def test_missing_tensor_named(mixtral_dir):
    edit_weights(mixtral_dir, lambda t: t.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.1\.block_sparse_moe\.experts\.3\.w2"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


def test_unexpected_tensor_named(mixtral_dir):
    edit_weights(mixtral_dir, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model\.layers\.0\.extra\.weight"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


def test_shape_mismatch_named(mixtral_dir):
    def shrink(t):
        t["model.layers.2.self_attn.k_proj.weight"] = t["model.layers.2.self_attn.k_proj.weight"][:-1]
    edit_weights(mixtral_dir, shrink)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.k_proj\.weight: checkpoint \(31, 64\)"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


def test_no_weights(tmp_path, mixtral_dir):
    os.remove(mixtral_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="no safetensors"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


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
    edit_weights(mixtral_dir, lambda t: t.__setitem__(name, t[name].to(dtype)))
    with pytest.raises(CheckpointError, match=rf"dtype these weights cannot have.*quantization_config.*{name}"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(mixtral_dir, bad):
    name = "model.layers.0.self_attn.q_proj.weight"

    def poison(t):
        t[name] = t[name].clone()
        t[name][3, 5] = bad
    edit_weights(mixtral_dir, poison)
    with pytest.raises(CheckpointError, match=rf"NaN or infinity \(1\): {name}"):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


