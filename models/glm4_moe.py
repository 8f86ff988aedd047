"""GLM-4.5 / 4.6 MoE (`Glm4MoeForCausalLM`): GQA with q/k/v bias, partial rotary
(`partial_rotary_factor`), optional per-head q/k norm; DeepSeek-V3 routing (sigmoid scores,
correction bias, group top-k, `routed_scaling_factor`), shared experts, dense first layers.
Its multi-token-prediction layers are skipped by the loader."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig, RouterConfig
from models.loader import WeightMap, common_entries, mlp_entries


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
    out = common_entries(cfg)
    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}.mlp"
        out.update(mlp_entries(cfg, i, hf, correction=(f"{hf}.gate.e_score_correction_bias", None)))
    return out
