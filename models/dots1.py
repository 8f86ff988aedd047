"""dots.llm1 (`Dots1ForCausalLM`): GQA with a per-head q/k norm (before rotary, as Qwen3),
sliding windows on the layers `layer_types` marks; DeepSeek-V3 routing (sigmoid scores, correction
bias, group top-k scored by each group's best two, renormalised, `routed_scaling_factor`),
shared experts, dense first layers (`first_k_dense_replace`)."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig, RouterConfig
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, decoder_map, moe_entries

ARCHITECTURES = ("Dots1ForCausalLM",)
PUBLISHED = (
    PublishedConfig("dots.llm1", "dots.llm1.inst", "Dots1ForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=128, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        n_group=None, topk_group=None, attention_bias=False, tie_word_embeddings=False, rms_norm_eps=1e-5,
        vocab_size=152064, max_position_embeddings=32768, rope_theta=1e7)),
)
TINY = (
    # per-head q/k norm, sliding window on the last layer, group top-k with a correction bias,
    # routed scaling, shared expert, a dense first layer
    TinyConfig("dots1", "Dots1ForCausalLM", dict(
        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=1, n_shared_experts=1, head_dim=16, n_group=2, topk_group=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, sliding_window=8, max_window_layers=2), engine="slow"),
)


def hf_config_class(arch: str):
    import transformers

    return transformers.Dots1Config


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    router = RouterConfig(scoring="sigmoid", correction_bias=True, n_group=get("n_group") or 1,
                          topk_group=get("topk_group") or 1, group_score="top2_sum",
                          scaling_factor=float(get("routed_scaling_factor", 1.0)), renorm_min=1e-20, fp32=True)
    first_dense = get("first_k_dense_replace") or 0
    bias = bool(get("attention_bias", False))
    return dict(
        qkv_bias=bias, o_bias=bias, qk_norm="head",
        num_experts=get("n_routed_experts"), top_k=get("num_experts_per_tok"),
        moe_intermediate_size=get("moe_intermediate_size"), norm_topk_prob=bool(get("norm_topk_prob", False)),
        router=router, shared_expert_intermediate_size=get("moe_intermediate_size") * (get("n_shared_experts") or 0),
        sparse_layers=tuple(i >= first_dense for i in range(num_layers)),
    )


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    return decoder_map(cfg, lambda i, hf, ours: moe_entries(
        cfg, i, hf, correction=(f"{hf}.gate.e_score_correction_bias", None)))
