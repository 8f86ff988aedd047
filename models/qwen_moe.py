"""Qwen2-MoE (shared expert with a sigmoid gate, q/k/v bias) and Qwen3-MoE (per-head q/k norm),
and OLMoE (q/k norm over the whole projection): one `mlp` naming scheme for all three, with
dense MLP layers where `mlp_only_layers` / `decoder_sparse_step` say so."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig
from models.loader import WeightMap, common_entries, proj_entries


def hf_config_class(arch: str):
    import transformers

    return {"Qwen2MoeForCausalLM": transformers.Qwen2MoeConfig, "Qwen3MoeForCausalLM": transformers.Qwen3MoeConfig,
            "OlmoeForCausalLM": transformers.OlmoeConfig}[arch]


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    num_experts = get("num_experts")
    moe_inter = get("moe_intermediate_size") if arch != "OlmoeForCausalLM" else get("intermediate_size")
    shared = 0
    if arch == "Qwen2MoeForCausalLM":
        qkv_bias, qk_norm = bool(get("qkv_bias", True)), None
        shared = get("shared_expert_intermediate_size") or 0
    elif arch == "Qwen3MoeForCausalLM":
        qkv_bias, qk_norm = bool(get("attention_bias", False)), "head"
    else:  # OLMoE
        qkv_bias, qk_norm = bool(get("attention_bias", False)), "full"
    step = get("decoder_sparse_step", 1) or 1
    dense_only = set(get("mlp_only_layers", []) or [])
    sparse = tuple((i not in dense_only) and bool(num_experts) and (i + 1) % step == 0 for i in range(num_layers))
    return dict(
        num_experts=num_experts, top_k=get("num_experts_per_tok"), moe_intermediate_size=moe_inter,
        norm_topk_prob=bool(get("norm_topk_prob", False)), qkv_bias=qkv_bias, qk_norm=qk_norm,
        o_bias=bool(get("attention_bias", False)) if arch != "Qwen2MoeForCausalLM" else False,
        clip_qkv=get("clip_qkv"), shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0,
        sparse_layers=sparse,
    )


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    out = common_entries(cfg)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.mlp", f"layers.{i}"
        if not cfg.sparse_layers[i]:
            out.update(proj_entries(cfg.dense_intermediate_size, hf, f"{ours}.mlp.w13.weight", f"{ours}.mlp.w2.weight"))
            continue
        out[f"{hf}.gate.weight"] = (f"{ours}.moe.gate.weight", ())
        for e in range(cfg.num_experts):
            out.update(proj_entries(cfg.moe_intermediate_size, f"{hf}.experts.{e}", f"{ours}.moe.w13", f"{ours}.moe.w2",
                                    expert=e))
        if cfg.shared_expert_intermediate_size:
            out.update(proj_entries(cfg.shared_expert_intermediate_size, f"{hf}.shared_expert",
                                    f"{ours}.moe.shared.w13.weight", f"{ours}.moe.shared.w2.weight"))
        if cfg.shared_expert_gate:
            out[f"{hf}.shared_expert_gate.weight"] = (f"{ours}.moe.shared_gate.weight", ())
    return out
