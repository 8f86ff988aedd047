"""Granite MoE and Granite MoE Shared (`GraniteMoeForCausalLM`, `GraniteMoeSharedForCausalLM`):
embedding, residual and attention multipliers, logits divided by `logits_scaling`, a router that
takes a softmax over the top-k logits; experts stacked as `input_linear [E, 2I, H]` (gate rows,
then up) and `output_linear [E, H, I]`; the Shared variant adds an always-on `shared_mlp`."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig, RouterConfig
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, decoder_map

ARCHITECTURES = ("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM")
PUBLISHED = (
    PublishedConfig("Granite MoE (+ Shared)", "granite-3.0-1b-a400m", "GraniteMoeForCausalLM", dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
        intermediate_size=512, num_local_experts=32, num_experts_per_tok=8, embedding_multiplier=12.0,
        attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=6.0, vocab_size=49155,
        max_position_embeddings=4096, tie_word_embeddings=True)),
)
_MULTIPLIERS = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0)
TINY = (
    TinyConfig("granitemoe", "GraniteMoeForCausalLM", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, **_MULTIPLIERS)),
    # multipliers + the always-on shared MLP
    TinyConfig("granitemoeshared", "GraniteMoeSharedForCausalLM", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=48,
        **_MULTIPLIERS), engine="slow"),
)


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
    def moe(i: int, hf: str, ours: str) -> WeightMap:
        layer = f"model.layers.{i}"
        out: WeightMap = {
            f"{hf}.router.layer.weight": (f"{ours}.gate.weight", ()),
            f"{hf}.input_linear.weight": (f"{ours}.w13", ()),
            f"{hf}.output_linear.weight": (f"{ours}.w2", ()),
        }
        if cfg.shared_expert_intermediate_size:
            out[f"{layer}.shared_mlp.input_linear.weight"] = (f"{ours}.shared.w13.weight", ())
            out[f"{layer}.shared_mlp.output_linear.weight"] = (f"{ours}.shared.w2.weight", ())
        return out

    return decoder_map(cfg, moe, block="block_sparse_moe")
