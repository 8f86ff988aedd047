"""Mixtral: `block_sparse_moe` with experts w1 (gate), w3 (up), w2 (down); always renormalised."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig
from models.loader import WeightMap, common_entries, swiglu_entries


def hf_config_class(arch: str):
    import transformers

    return transformers.MixtralConfig


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    inter = hf.intermediate_size
    return dict(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok, moe_intermediate_size=inter,
                norm_topk_prob=True, dense_intermediate_size=inter, sparse_layers=(True,) * num_layers)


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    out = common_entries(cfg)
    inter = cfg.moe_intermediate_size
    for i in range(cfg.num_layers):
        hf = f"model.layers.{i}.block_sparse_moe"
        out[f"{hf}.gate.weight"] = (f"layers.{i}.moe.gate.weight", ())
        for e in range(cfg.num_experts):
            x = f"{hf}.experts.{e}"
            out.update(swiglu_entries(inter, f"{x}.w1.weight", f"{x}.w3.weight", f"{x}.w2.weight",
                                      f"layers.{i}.moe.w13", f"layers.{i}.moe.w2", expert=e))
    return out
