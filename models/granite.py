"""Granite MoE and Granite MoE Shared (`GraniteMoeForCausalLM`, `GraniteMoeSharedForCausalLM`):
embedding, residual and attention multipliers, logits divided by `logits_scaling`, a router that
takes a softmax over the top-k logits; experts stacked as `input_linear [E, 2I, H]` (gate rows,
then up) and `output_linear [E, H, I]`; the Shared variant adds an always-on `shared_mlp`."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig, RouterConfig
from models.loader import WeightMap, common_entries


def hf_config_class(arch: str):
    import transformers

    return transformers.GraniteMoeSharedConfig if arch == "GraniteMoeSharedForCausalLM" else transformers.GraniteMoeConfig


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    bias = bool(get("attention_bias", False))
    return dict(
        qkv_bias=bias, o_bias=bias, attn_scale=float(get("attention_multiplier", 1.0)),
        embedding_multiplier=float(get("embedding_multiplier", 1.0)),
        residual_multiplier=float(get("residual_multiplier", 1.0)), logits_scaling=float(get("logits_scaling", 1.0)),
        num_experts=get("num_local_experts"), top_k=get("num_experts_per_tok"),
        moe_intermediate_size=get("intermediate_size"), norm_topk_prob=True,
        router=RouterConfig(scoring="softmax_topk"),
        shared_expert_intermediate_size=get("shared_intermediate_size", 0) or 0,
        sparse_layers=(True,) * num_layers,
    )


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    out = common_entries(cfg)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}", f"layers.{i}.moe"
        out[f"{hf}.block_sparse_moe.router.layer.weight"] = (f"{ours}.gate.weight", ())
        out[f"{hf}.block_sparse_moe.input_linear.weight"] = (f"{ours}.w13", ())
        out[f"{hf}.block_sparse_moe.output_linear.weight"] = (f"{ours}.w2", ())
        if cfg.shared_expert_intermediate_size:
            out[f"{hf}.shared_mlp.input_linear.weight"] = (f"{ours}.shared.w13.weight", ())
            out[f"{hf}.shared_mlp.output_linear.weight"] = (f"{ours}.shared.w2.weight", ())
    return out
