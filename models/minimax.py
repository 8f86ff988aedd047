"""MiniMax-M2 (`MiniMaxM2ForCausalLM`): GQA with q/k RMSNorm over the whole projection, partial
rotary (`rotary_dim`), sigmoid router with a correction bias and renormalised weights; Mixtral's
`block_sparse_moe.experts.{e}.w1/w3/w2` names."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig, RouterConfig
from models.family import PublishedConfig, TinyConfig
from models.mixtral import moe_entries as mixtral_moe_entries
from models.weight_map import WeightMap, decoder_map

ARCHITECTURES = ("MiniMaxM2ForCausalLM",)
PUBLISHED = (
    PublishedConfig("MiniMax-M2", "MiniMax-M2", "MiniMaxM2ForCausalLM", dict(
        hidden_size=3072, num_hidden_layers=62, num_attention_heads=48, num_key_value_heads=8, head_dim=128,
        intermediate_size=1536, num_local_experts=256, num_experts_per_tok=8, rotary_dim=64,
        vocab_size=200064, max_position_embeddings=196608, rope_theta=5e6)),
)
TINY = (
    # partial rotary + q/k norm over the whole projection, correction bias
    TinyConfig("minimax_m2", "MiniMaxM2ForCausalLM", dict(intermediate_size=32, num_local_experts=8,
               num_experts_per_tok=2, head_dim=16, rotary_dim=8, bos_token_id=1, eos_token_id=2), engine="slow"),
)


def hf_config_class(arch: str):
    import transformers

    return transformers.MiniMaxM2Config


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    inter = hf.intermediate_size
    return dict(
        qk_norm="full", num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
        moe_intermediate_size=inter, dense_intermediate_size=inter, norm_topk_prob=True,
        router=RouterConfig(scoring="sigmoid", correction_bias=True, fp32=True),
        sparse_layers=(True,) * num_layers,
    )


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    def moe(i: int, hf: str, ours: str) -> WeightMap:
        return {**mixtral_moe_entries(cfg, hf, ours),
                f"{hf}.e_score_correction_bias": (f"{ours}.gate.e_score_correction_bias", ())}

    return decoder_map(cfg, moe, block="block_sparse_moe")
