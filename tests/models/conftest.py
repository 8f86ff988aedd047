"""Random-weight tiny checkpoints of every supported family, made with transformers.

The configs come from the family registry (`models/registry.py`: each family module's `TINY`):
each switches on the variants its family brings (MLA with and without q_lora, group-limited
routing, sinks with a sliding window, NoPE / chunked layers, partial rotary, multipliers, ...),
on top of the shared tiny sizes below. Biases and router correction biases, which transformers
initialises to zero, are randomised so that the tests see them.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from models.registry import TINY_CONFIGS, family_for

TINY = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.08)
FAMILIES = TINY_CONFIGS  # test id -> models.family.TinyConfig


def hf_classes(family: str):
    """(transformers config class, model class) of a tiny config."""
    arch = FAMILIES[family].architecture
    return family_for(arch).hf_config_class(arch), getattr(transformers, arch)


@torch.no_grad()
def randomize_biases(model: torch.nn.Module, std: float = 0.1) -> None:
    """Biases and router correction biases start at zero in transformers: give them values."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("bias", "_bias")) and t.is_floating_point():
            t.normal_(0.0, std)


def make_checkpoint(family: str, path, dtype=torch.float32, shard: bool = False, seed: int = 0, **overrides):
    cfg_cls, model_cls = hf_classes(family)
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**TINY, **FAMILIES[family].fields, **overrides})
    model = model_cls(cfg).eval()
    randomize_biases(model)
    model = model.to(dtype)
    kwargs = {"max_shard_size": "100KB"} if shard else {}
    model.save_pretrained(str(path), **kwargs)
    return model


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """family -> (path, transformers reference model in float32)."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            ref = make_checkpoint(family, path, shard=(family == "qwen3_moe"))
            cache[family] = (str(path), ref)
        return cache[family]

    return get


@pytest.fixture()
def mixtral_dir(tmp_path):
    make_checkpoint("mixtral", tmp_path)
    return tmp_path


def edit_config(path, **changes) -> None:
    """Change fields of a checkpoint's config.json."""
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, fn) -> None:
    """fn(tensors) edits model.safetensors' name -> tensor dict in place."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})
