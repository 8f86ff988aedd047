"""Reading a checkpoint's config.json (models/hf_config.py, models/config.py): fields mapped,
unsupported architectures and options named, impossible sizes refused before any allocation."""

from __future__ import annotations

import pytest

from models import UnsupportedModelError, load_model
from models.hf_config import load_config
from tests.models.conftest import edit_config


@pytest.mark.parametrize("changes, named", [
    (dict(num_hidden_layers=0), "num_hidden_layers=0"),
    (dict(num_attention_heads=0), "num_attention_heads=0"),
    (dict(vocab_size=-5), "vocab_size=-5"),
    (dict(num_key_value_heads=3), "does not divide"),
    (dict(num_local_experts=10**9), r"weights need \d+\.\d GiB in float32 .*1000000000 experts.*available"),
    (dict(hidden_size=10**6), r"weights need \d+\.\d GiB in float32"),
])
def test_impossible_configs_are_named_before_any_allocation(mixtral_dir, changes, named):
    edit_config(mixtral_dir, **changes)
    with pytest.raises(UnsupportedModelError, match=named):
        load_model(str(mixtral_dir), dtype="float32", device="cpu", progress=False)


def test_unsupported_rope_named(mixtral_dir):
    edit_config(mixtral_dir, rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError, match="longrope"):
        load_config(str(mixtral_dir))


def test_sliding_window_read_per_layer(mixtral_dir):
    edit_config(mixtral_dir, sliding_window=64)
    assert load_config(str(mixtral_dir)).sliding_windows == (64, 64, 64)
    edit_config(mixtral_dir, sliding_window=4096)  # not narrower than the context: plain attention
    assert load_config(str(mixtral_dir)).sliding_windows == ()


def test_unsupported_options_named(mixtral_dir):
    edit_config(mixtral_dir, hidden_act="gelu")
    with pytest.raises(UnsupportedModelError, match="hidden_act"):
        load_config(str(mixtral_dir))


def test_unsupported_architecture_named(mixtral_dir):
    edit_config(mixtral_dir, architectures=["DbrxForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="DbrxForCausalLM"):
        load_config(str(mixtral_dir))


def test_config_fields(mixtral_dir):
    cfg = load_config(str(mixtral_dir))
    assert (cfg.architecture, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob) == ("MixtralForCausalLM", 8, 2, True)
    assert cfg.head_dim == 16 and cfg.sparse_layers == (True, True, True)
