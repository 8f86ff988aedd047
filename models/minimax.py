"""MiniMax-M2 (`MiniMaxM2ForCausalLM`): GQA with q/k RMSNorm over the whole projection, partial
rotary (`rotary_dim`), sigmoid router with a correction bias and renormalised weights; Mixtral's
`block_sparse_moe.experts.{e}.w1/w3/w2` names."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig, RouterConfig
from models.loader import WeightMap, common_entries, swiglu_entries


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
    out = common_entries(cfg)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.block_sparse_moe", f"layers.{i}.moe"
        out[f"{hf}.gate.weight"] = (f"{ours}.gate.weight", ())
        out[f"{hf}.e_score_correction_bias"] = (f"{ours}.gate.e_score_correction_bias", ())
        for e in range(cfg.num_experts):
            x = f"{hf}.experts.{e}"
            out.update(swiglu_entries(cfg.moe_intermediate_size, f"{x}.w1.weight", f"{x}.w3.weight",
                                      f"{x}.w2.weight", f"{ours}.w13", f"{ours}.w2", expert=e))
    return out
