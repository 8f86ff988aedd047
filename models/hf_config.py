"""A checkpoint's `config.json` -> `MoEModelConfig`.

`load_config(path)` reads `config.json`, fills defaults from the architecture's `transformers`
config class (so a checkpoint that omits a field gets the value `transformers` would use) and
refuses architectures or options we do not implement, naming them. The fields every family
shares are read here; the family's module (`models/<family>.py`, `config_fields`, found through
`models/registry.py`) maps its own options onto the same dataclass.
"""

from __future__ import annotations

import json
import os
from typing import Any

from models.config import (
    SUPPORTED_ROPE_TYPES,
    MoEModelConfig,
    UnsupportedModelError,
    layer_windows,
    partial_rotary_dim,
    rope_settings,
    rope_type_of,
)
from models.quant import parse_quantization
from models.registry import SUPPORTED_ARCHITECTURES, family_for


def load_config(path: str) -> MoEModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {path!r}")
    with open(cfg_path) as f:
        raw = json.load(f)
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or raw.get('model_type')!r} in {cfg_path}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope_type_of(rope)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    quant = parse_quantization(raw.get("quantization_config"))  # refuses unsupported methods by name
    hf = _hf_config(path, cfg_path, arch, raw)
    cfg = from_hf_config(hf, arch, raw)
    cfg.extra["quant"] = quant
    return cfg


def from_hf_config(hf: Any, arch: str, raw: dict[str, Any] | None = None) -> MoEModelConfig:
    """A `transformers` config object of architecture `arch` -> our config."""
    raw = raw if raw is not None else hf.to_dict()
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731

    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only silu)")
    num_heads = get("num_attention_heads")
    num_layers = get("num_hidden_layers")
    for name in ("num_attention_heads", "num_hidden_layers", "hidden_size"):
        value = get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UnsupportedModelError(f"{name}={value!r} in the config: must be a positive integer")
    rope_theta, rope_scaling = rope_settings(hf)
    eos = get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    common: dict[str, Any] = dict(
        architecture=arch,
        vocab_size=get("vocab_size"),
        hidden_size=get("hidden_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=get("num_key_value_heads") or num_heads,
        head_dim=get("head_dim") or get("hidden_size") // num_heads,
        rms_norm_eps=get("rms_norm_eps", 1e-6),
        max_position_embeddings=get("max_position_embeddings", 4096),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        qkv_bias=False,
        o_bias=False,
        qk_norm=None,
        clip_qkv=None,
        norm_topk_prob=False,
        shared_expert_intermediate_size=0,
        shared_expert_gate=False,
        dense_intermediate_size=get("intermediate_size"),
        sliding_windows=layer_windows(hf, num_layers),
        rotary_dim=partial_rotary_dim(hf, get("head_dim") or get("hidden_size") // num_heads),
        bos_token_id=get("bos_token_id"),
        eos_token_ids=eos_ids,
        torch_dtype=str(dtype).replace("torch.", ""),
        extra={"hf_config": hf},
    )
    fields = family_for(arch).config_fields(hf, arch, num_layers)
    return MoEModelConfig(**{**common, **fields})


def _hf_config(path: str, cfg_path: str, arch: str, raw: dict[str, Any]) -> Any:
    """The transformers config (its defaults fill what config.json omits). A checkpoint whose
    `model_type` transformers does not know (remote-code variants such as Kimi K2, a DeepSeek-V3
    architecture) is read with its architecture's own config class."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except Exception as exc:  # unknown model_type or invalid fields: say which checkpoint
        cfg_cls = family_for(arch).hf_config_class(arch)
        fields = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map", "transformers_version")}
        try:
            return cfg_cls(**fields)
        except Exception:  # noqa: BLE001 - report the original error
            raise UnsupportedModelError(f"cannot read {cfg_path}: {exc}") from exc
