"""DeepSeek-V2 / V2-Lite and DeepSeek-V3 / R1 (and Kimi K2, a V3 architecture).

Multi-head Latent Attention (with or without `q_lora_rank`), interleaved rotary on the
decoupled `qk_rope_head_dim` part (V3: `rope_interleave`), YaRN with the softmax scale
multiplied by mscale(factor, mscale_all_dim)^2; dense first layers (`first_k_dense_replace`),
shared experts, routed experts with `routed_scaling_factor`:
- V2: softmax scores, greedy or group-limited greedy top-k (a group scored by its best expert);
- V3: sigmoid scores with `e_score_correction_bias` for the choice, `noaux_tc` group top-k (a
  group scored by its best two experts), `norm_topk_prob`.
Multi-token-prediction layers (`model.layers.{num_hidden_layers}`) are skipped by the loader.
"""

from __future__ import annotations

import math
from typing import Any

from models.config import MLAConfig, MoEModelConfig, RouterConfig, UnsupportedModelError
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, decoder_map, moe_entries

ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
_YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
             mscale_all_dim=1.0)
PUBLISHED = (
    PublishedConfig("DeepSeek-V2", "DeepSeek-V2-Lite", "DeepseekV2ForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, vocab_size=102400, max_position_embeddings=163840,
        rope_scaling=dict(_YARN, mscale=0.707, mscale_all_dim=0.707))),
    PublishedConfig("DeepSeek-V3", "DeepSeek-V3 / R1", "DeepseekV3ForCausalLM", dict(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, vocab_size=129280, max_position_embeddings=163840, rope_scaling=_YARN),
        quantized="FP8 block"),
    PublishedConfig("DeepSeek-V3", "Kimi K2", "DeepseekV3ForCausalLM", dict(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=64, num_key_value_heads=64,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=384, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=1, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_group=1, topk_group=1, routed_scaling_factor=2.827,
        norm_topk_prob=True, vocab_size=163840, max_position_embeddings=131072,
        rope_scaling=dict(_YARN, factor=32.0)), quantized="FP8 block"),
)
_MLA = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, moe_intermediate_size=32,
            intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
            n_shared_experts=1, num_key_value_heads=4)
TINY = (
    # MLA without q_lora, group-limited greedy softmax routing, routed scaling, a dense first layer
    TinyConfig("deepseek_v2", "DeepseekV2ForCausalLM", dict(
        _MLA, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5, norm_topk_prob=False), engine="slow"),
    # MLA with q_lora, sigmoid + correction bias, noaux_tc group top-k, YaRN with mscale
    TinyConfig("deepseek_v3", "DeepseekV3ForCausalLM", dict(
        _MLA, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)), engine="default"),
)


def hf_config_class(arch: str):
    import transformers

    return transformers.DeepseekV3Config if arch == "DeepseekV3ForCausalLM" else transformers.DeepseekV2Config


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(hf: Any, qk_head_dim: int) -> float:
    scale = qk_head_dim**-0.5
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    if params.get("rope_type", params.get("type", "default")) != "default" and params.get("mscale_all_dim"):
        m = yarn_mscale(params["factor"], params["mscale_all_dim"])
        scale *= m * m
    return scale


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    v3 = arch == "DeepseekV3ForCausalLM"
    mla = MLAConfig(q_lora_rank=get("q_lora_rank"), kv_lora_rank=get("kv_lora_rank"),
                    qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
                    v_head_dim=get("v_head_dim"))
    scoring = get("scoring_func", "sigmoid" if v3 else "softmax")
    method = get("topk_method", "noaux_tc" if v3 else "greedy") or "greedy"
    expected = ("sigmoid", ("noaux_tc",)) if v3 else ("softmax", ("greedy", "group_limited_greedy"))
    if scoring != expected[0] or method not in expected[1]:
        raise UnsupportedModelError(f"{arch} with scoring_func={scoring!r}, topk_method={method!r} is not supported")
    n_group, topk_group = get("n_group") or 1, get("topk_group") or 1
    if v3:
        router = RouterConfig(scoring="sigmoid", correction_bias=True, n_group=n_group, topk_group=topk_group,
                              group_score="top2_sum", scaling_factor=float(get("routed_scaling_factor", 1.0)),
                              renorm_min=1e-20, fp32=True)
        renormalize = bool(get("norm_topk_prob", True))
        rope_style = "interleaved" if get("rope_interleave", True) else "neox"
    else:
        if get("norm_topk_prob"):  # the reference ignores it; the original code renormalises instead of scaling
            raise UnsupportedModelError("DeepSeek-V2 with norm_topk_prob=true is not supported")
        grouped = method == "group_limited_greedy"
        router = RouterConfig(scoring="softmax", n_group=n_group if grouped else 1,
                              topk_group=topk_group if grouped else 1, group_score="max",
                              scaling_factor=float(get("routed_scaling_factor", 1.0)), fp32=True)
        renormalize, rope_style = False, "interleaved"
    first_dense = get("first_k_dense_replace") or 0
    attention_bias = bool(get("attention_bias", False))
    return dict(
        num_kv_heads=get("num_attention_heads"), head_dim=mla.qk_head_dim, rotary_dim=None, mla=mla,
        attn_scale=mla_softmax_scale(hf, mla.qk_head_dim), rope_style=rope_style,
        qkv_bias=attention_bias, o_bias=attention_bias, mlp_bias=bool(get("mlp_bias", False)),
        num_experts=get("n_routed_experts"), top_k=get("num_experts_per_tok"),
        moe_intermediate_size=get("moe_intermediate_size"), norm_topk_prob=renormalize, router=router,
        shared_expert_intermediate_size=get("moe_intermediate_size") * (get("n_shared_experts") or 0),
        sparse_layers=tuple(i >= first_dense for i in range(num_layers)),
    )


def mla_entries(cfg: MoEModelConfig, layer: int) -> WeightMap:
    hf, ours = f"model.layers.{layer}.self_attn", f"layers.{layer}.attn"
    plain = ["kv_b_proj"] + (["q_proj"] if cfg.mla.q_lora_rank is None else ["q_b_proj"])
    biased = [("kv_a_proj_with_mqa", "kv_a_proj")] + ([("q_a_proj", "q_a_proj")] if cfg.mla.q_lora_rank else [])
    out: WeightMap = {f"{hf}.{n}.weight": (f"{ours}.{n}.weight", ()) for n in plain}
    for theirs, mine in biased:
        out[f"{hf}.{theirs}.weight"] = (f"{ours}.{mine}.weight", ())
        if cfg.qkv_bias:
            out[f"{hf}.{theirs}.bias"] = (f"{ours}.{mine}.bias", ())
    out[f"{hf}.kv_a_layernorm.weight"] = (f"{ours}.kv_a_norm.weight", ())
    if cfg.mla.q_lora_rank:
        out[f"{hf}.q_a_layernorm.weight"] = (f"{ours}.q_a_norm.weight", ())
    out[f"{hf}.o_proj.weight"] = (f"{ours}.o_proj.weight", ())
    if cfg.o_bias:
        out[f"{hf}.o_proj.bias"] = (f"{ours}.o_proj.bias", ())
    return out


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    v3 = cfg.router.correction_bias
    return decoder_map(cfg, lambda i, hf, ours: moe_entries(
        cfg, i, hf, correction=(f"{hf}.gate.e_score_correction_bias", None) if v3 else None),
        attention=lambda i: mla_entries(cfg, i))
