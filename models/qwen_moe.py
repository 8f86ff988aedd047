"""Qwen2-MoE (shared expert with a sigmoid gate, q/k/v bias) and Qwen3-MoE (per-head q/k norm),
and OLMoE (q/k norm over the whole projection): one `mlp` naming scheme for all three, with
dense MLP layers where `mlp_only_layers` / `decoder_sparse_step` say so."""

from __future__ import annotations

from models.config import MoEModelConfig
from models.loader import WeightMap, common_entries, swiglu_entries


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    out = common_entries(cfg)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.mlp", f"layers.{i}"
        if not cfg.sparse_layers[i]:
            out.update(swiglu_entries(cfg.dense_intermediate_size, f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight",
                                      f"{hf}.down_proj.weight", f"{ours}.mlp.w13.weight", f"{ours}.mlp.w2.weight"))
            continue
        out[f"{hf}.gate.weight"] = (f"{ours}.moe.gate.weight", ())
        for e in range(cfg.num_experts):
            x = f"{hf}.experts.{e}"
            out.update(swiglu_entries(cfg.moe_intermediate_size, f"{x}.gate_proj.weight", f"{x}.up_proj.weight",
                                      f"{x}.down_proj.weight", f"{ours}.moe.w13", f"{ours}.moe.w2", expert=e))
        if cfg.shared_expert_intermediate_size:
            s = f"{hf}.shared_expert"
            out.update(swiglu_entries(cfg.shared_expert_intermediate_size, f"{s}.gate_proj.weight",
                                      f"{s}.up_proj.weight", f"{s}.down_proj.weight",
                                      f"{ours}.moe.shared.w13.weight", f"{ours}.moe.shared.w2.weight"))
        if cfg.shared_expert_gate:
            out[f"{hf}.shared_expert_gate.weight"] = (f"{ours}.moe.shared_gate.weight", ())
    return out
