"""ERNIE 4.5 MoE (`Ernie4_5_MoeForCausalLM`): interleaved rotary, optional biases (`use_bias`),
softmax router whose choice adds `moe_statics.e_score_correction_bias` and whose weights are
renormalised (floor `moe_norm_min`), shared experts, MoE on layers `moe_layer_start_index` ..
`moe_layer_end_index` every `moe_layer_interval`; `mtp` modules are skipped by the loader."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig, RouterConfig, UnsupportedModelError
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, decoder_map, moe_entries

ARCHITECTURES = ("Ernie4_5_MoeForCausalLM",)
PUBLISHED = (
    PublishedConfig("ERNIE 4.5 MoE", "ERNIE-4.5-21B-A3B", "Ernie4_5_MoeForCausalLM", dict(
        hidden_size=2560, num_hidden_layers=28, num_attention_heads=20, num_key_value_heads=4,
        intermediate_size=12288, moe_intermediate_size=1536, moe_num_experts=64, moe_k=6, moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_end_index=27, vocab_size=103424, max_position_embeddings=131072,
        rope_theta=5e5)),
)
TINY = (
    # biases everywhere, a correction bias on a softmax router, shared experts, a dense first layer
    TinyConfig("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
        moe_layer_start_index=1, use_bias=True, bos_token_id=1, eos_token_id=2, pad_token_id=0), engine="slow"),
)


def hf_config_class(arch: str):
    import transformers

    return transformers.Ernie4_5_MoeConfig


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    num_experts, top_k = get("moe_num_experts"), get("moe_k")
    if not isinstance(num_experts, int):
        raise UnsupportedModelError(f"ERNIE moe_num_experts={num_experts!r} (several expert groups) is not supported")
    start, end, interval = get("moe_layer_start_index", 0), get("moe_layer_end_index"), get("moe_layer_interval", 1)
    end = num_layers - 1 if end in (None, -1) else end
    bias = bool(get("use_bias", False))
    return dict(
        rope_style="interleaved", qkv_bias=bias, o_bias=bias, mlp_bias=bias, lm_head_bias=bias,
        num_experts=num_experts, top_k=top_k, moe_intermediate_size=get("moe_intermediate_size"),
        norm_topk_prob=True,
        router=RouterConfig(scoring="softmax", correction_bias=True, renorm_min=float(get("moe_norm_min", 1e-12)),
                            fp32=True),
        shared_expert_intermediate_size=get("moe_intermediate_size") * (get("moe_num_shared_experts") or 0),
        sparse_layers=tuple((i + 1) % interval == 0 and start <= i <= end for i in range(num_layers)),
    )


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    return decoder_map(cfg, lambda i, hf, ours: moe_entries(
        cfg, i, hf, correction=(f"{hf}.moe_statics.e_score_correction_bias", lambda t: t.reshape(-1))))  # [1, E]
