"""DeepSeek-V3.2 and GLM-5: DeepSeek-V3's MLA and MoE with DeepSeek Sparse Attention (a lightning
indexer per layer picks each query's top-k cached tokens; `models/layers/mla.py`). GLM-5 rotates
the indexer's q/k in interleaved pairs (V3.2: halves) and may let layers reuse the previous
indexer layer's choice ("shared" `indexer_types`, no indexer weights of their own)."""

from __future__ import annotations

from typing import Any

from models import deepseek
from models.config import DSAConfig, MoEModelConfig, UnsupportedModelError
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap

ARCHITECTURES = ("DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM")
PUBLISHED = (
    # deepseek-ai/DeepSeek-V3.2-Exp config.json (transformers' DeepseekV32Config defaults are its values)
    PublishedConfig("DeepSeek-V3.2", "DeepSeek-V3.2-Exp", "DeepseekV32ForCausalLM", dict(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, vocab_size=129280, max_position_embeddings=163840, index_n_heads=64,
        index_head_dim=128, index_topk=2048, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=40, original_max_position_embeddings=4096, beta_fast=32,
            beta_slow=1, mscale=1.0, mscale_all_dim=1.0)), quantized="FP8 block"),
    # zai-org/GLM-5 (transformers' GlmMoeDsaConfig defaults, documented as that checkpoint's)
    PublishedConfig("GLM-5", "GLM-5", "GlmMoeDsaForCausalLM", dict(
        hidden_size=6144, num_hidden_layers=78, num_attention_heads=64, num_key_value_heads=64,
        intermediate_size=12288, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=2048, kv_lora_rank=512, qk_nope_head_dim=192,
        qk_rope_head_dim=64, v_head_dim=256, n_group=1, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, vocab_size=154880, max_position_embeddings=202752, index_n_heads=32,
        index_head_dim=128, index_topk=2048), quantized="FP8 block releases"),
)
# index_topk 8 with prompts of up to 40 tokens: the sparsity is exercised (queries past the 8th
# token attend to 8 of their tokens), and earlier ones attend to all of theirs
_DSA = dict(deepseek._MLA, q_lora_rank=24, index_topk=8, index_head_dim=16, index_n_heads=8)
TINY = (
    TinyConfig("deepseek_v32", "DeepseekV32ForCausalLM", dict(_DSA, n_group=4, topk_group=2,
                                                              routed_scaling_factor=2.5), engine="default"),
    TinyConfig("glm_moe_dsa", "GlmMoeDsaForCausalLM", dict(_DSA, index_topk_pattern="FSF"), engine="slow"),
)


def hf_config_class(arch: str):
    import transformers

    return {"DeepseekV32ForCausalLM": transformers.DeepseekV32Config,
            "GlmMoeDsaForCausalLM": transformers.GlmMoeDsaConfig}[arch]


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    fields = deepseek.config_fields(hf, "DeepseekV3ForCausalLM", num_layers)
    mlp = get("mlp_layer_types")
    if mlp:
        if len(mlp) != num_layers or set(mlp) - {"dense", "sparse"}:
            raise UnsupportedModelError(f"mlp_layer_types={mlp!r}: expected {num_layers} of dense / sparse")
        fields["sparse_layers"] = tuple(t == "sparse" for t in mlp)
    kinds = get("layer_types") or []
    if set(kinds) - {"indexed_attention"}:
        raise UnsupportedModelError(f"layer_types {sorted(set(kinds) - {'indexed_attention'})} are not supported")
    shared = ()
    if arch == "GlmMoeDsaForCausalLM":
        types = get("indexer_types") or ["full"] * num_layers
        if len(types) != num_layers or set(types) - {"full", "shared"}:
            raise UnsupportedModelError(f"indexer_types={types!r}: expected {num_layers} of full / shared")
        shared = tuple(t == "shared" for t in types)
    fields["dsa"] = DSAConfig(n_heads=get("index_n_heads"), head_dim=get("index_head_dim"), topk=get("index_topk"),
                              rope_style="interleaved" if arch == "GlmMoeDsaForCausalLM" else "neox", shared=shared)
    return fields


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    out = deepseek.weight_map(cfg)
    for i in range(cfg.num_layers):
        if not cfg.dsa.has_indexer(i):
            continue
        hf, ours = f"model.layers.{i}.self_attn.indexer", f"layers.{i}.attn.indexer"
        for name in ("wq_b.weight", "wk.weight", "k_norm.weight", "k_norm.bias", "weights_proj.weight"):
            out[f"{hf}.{name}"] = (f"{ours}.{name}", ())
    return out
