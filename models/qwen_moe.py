"""Qwen2-MoE (shared expert with a sigmoid gate, q/k/v bias) and Qwen3-MoE (per-head q/k norm),
and OLMoE (q/k norm over the whole projection): one `mlp` naming scheme for all three, with
dense MLP layers where `mlp_only_layers` / `decoder_sparse_step` say so."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, decoder_map, proj_entries

ARCHITECTURES = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM")
PUBLISHED = (
    PublishedConfig("Qwen2-MoE", "Qwen1.5-MoE-A2.7B", "Qwen2MoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
        num_experts_per_tok=4, vocab_size=151936, max_position_embeddings=8192)),
    PublishedConfig("Qwen3-MoE", "Qwen3-30B-A3B", "Qwen3MoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6),
        quantized="FP8 block releases"),
    PublishedConfig("OLMoE", "OLMoE-1B-7B-0924", "OlmoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=1024, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
        max_position_embeddings=4096)),
)
_QWEN3 = dict(intermediate_size=128, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
TINY = (
    TinyConfig("qwen2_moe", "Qwen2MoeForCausalLM", dict(
        intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])),
    TinyConfig("qwen3_moe", "Qwen3MoeForCausalLM", dict(_QWEN3, head_dim=32, decoder_sparse_step=1,
                                                        mlp_only_layers=[0])),
    TinyConfig("qwen3_moe-sliding", "Qwen3MoeForCausalLM", dict(_QWEN3, use_sliding_window=True, sliding_window=8)),
    TinyConfig("olmoe", "OlmoeForCausalLM", dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                                 norm_topk_prob=False, clip_qkv=8.0)),
)


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
    def moe(i: int, hf: str, ours: str) -> WeightMap:
        out: WeightMap = {f"{hf}.gate.weight": (f"{ours}.gate.weight", ())}
        for e in range(cfg.num_experts):
            out.update(proj_entries(cfg.moe_intermediate_size, f"{hf}.experts.{e}", f"{ours}.w13", f"{ours}.w2",
                                    expert=e))
        if cfg.shared_expert_intermediate_size:
            out.update(proj_entries(cfg.shared_expert_intermediate_size, f"{hf}.shared_expert",
                                    f"{ours}.shared.w13.weight", f"{ours}.shared.w2.weight"))
        if cfg.shared_expert_gate:
            out[f"{hf}.shared_expert_gate.weight"] = (f"{ours}.shared_gate.weight", ())
        return out

    return decoder_map(cfg, moe)
