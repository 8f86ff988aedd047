"""Mixtral: `block_sparse_moe` with experts w1 (gate), w3 (up), w2 (down); always renormalised."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, decoder_map, swiglu_entries

ARCHITECTURES = ("MixtralForCausalLM",)
PUBLISHED = (
    PublishedConfig("Mixtral", "Mixtral-8x7B", "MixtralForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=32768, rope_theta=1e6, sliding_window=None)),
)
_TINY = dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)
TINY = (
    TinyConfig("mixtral", "MixtralForCausalLM", _TINY),
    TinyConfig("mixtral-top1", "MixtralForCausalLM", dict(intermediate_size=96, num_local_experts=4,
                                                          num_experts_per_tok=1)),
    TinyConfig("mixtral-sliding", "MixtralForCausalLM", dict(_TINY, sliding_window=8), engine="slow"),
)


def hf_config_class(arch: str):
    import transformers

    return transformers.MixtralConfig


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    inter = hf.intermediate_size
    return dict(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok, moe_intermediate_size=inter,
                norm_topk_prob=True, dense_intermediate_size=inter, sparse_layers=(True,) * num_layers)


def moe_entries(cfg: MoEModelConfig, hf: str, ours: str) -> WeightMap:
    """Mixtral's (and MiniMax-M2's) `gate` and `experts.{e}.w1/w3/w2`."""
    out: WeightMap = {f"{hf}.gate.weight": (f"{ours}.gate.weight", ())}
    for e in range(cfg.num_experts):
        x = f"{hf}.experts.{e}"
        out.update(swiglu_entries(cfg.moe_intermediate_size, f"{x}.w1.weight", f"{x}.w3.weight", f"{x}.w2.weight",
                                  f"{ours}.w13", f"{ours}.w2", expert=e))
    return out


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    return decoder_map(cfg, lambda i, hf, ours: moe_entries(cfg, hf, ours), block="block_sparse_moe")
