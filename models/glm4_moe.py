"""GLM-4.5 / 4.6 MoE (`Glm4MoeForCausalLM`): GQA with q/k/v bias, partial rotary
(`partial_rotary_factor`), optional per-head q/k norm; DeepSeek-V3 routing (sigmoid scores,
correction bias, group top-k, `routed_scaling_factor`), shared experts, dense first layers.
Its multi-token-prediction layers are skipped by the loader."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig, RouterConfig
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, decoder_map, moe_entries

ARCHITECTURES = ("Glm4MoeForCausalLM",)
PUBLISHED = (
    PublishedConfig("GLM-4.5 MoE", "GLM-4.5", "Glm4MoeForCausalLM", dict(
        hidden_size=5120, num_hidden_layers=92, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
        intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3, n_group=1, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5,
        vocab_size=151552, max_position_embeddings=131072, rope_theta=1e6)),
)
TINY = (
    # partial rotary, per-head q/k norm, q/k/v bias, group top-k with a correction bias, dense first layer
    TinyConfig("glm4_moe", "Glm4MoeForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=1, n_shared_experts=1, head_dim=16, use_qk_norm=True, attention_bias=True, n_group=2,
        topk_group=1, routed_scaling_factor=1.5), engine="slow"),
)


def hf_config_class(arch: str):
    import transformers

    return transformers.Glm4MoeConfig


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    router = RouterConfig(scoring="sigmoid", correction_bias=True, n_group=get("n_group") or 1,
                          topk_group=get("topk_group") or 1, group_score="top2_sum",
                          scaling_factor=float(get("routed_scaling_factor", 1.0)), renorm_min=1e-20, fp32=True)
    first_dense = get("first_k_dense_replace") or 0
    return dict(
        qkv_bias=bool(get("attention_bias", False)), qk_norm="head" if get("use_qk_norm") else None,
        num_experts=get("n_routed_experts"), top_k=get("num_experts_per_tok"),
        moe_intermediate_size=get("moe_intermediate_size"), norm_topk_prob=bool(get("norm_topk_prob", True)),
        router=router, shared_expert_intermediate_size=get("moe_intermediate_size") * (get("n_shared_experts") or 0),
        sparse_layers=tuple(i >= first_dense for i in range(num_layers)),
    )


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    return decoder_map(cfg, lambda i, hf, ours: moe_entries(
        cfg, i, hf, correction=(f"{hf}.gate.e_score_correction_bias", None)))
