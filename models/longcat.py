"""LongCat-Flash (`LongcatFlashForCausalLM`): each of its `num_layers` decoder layers is two of
our layers (`num_hidden_layers` = 2 x `num_layers`), each MLA attention (always with q_lora) and
a dense SwiGLU MLP (`ffn_hidden_size`); the first one's MoE block is shortcut-connected
(`moe_shortcut`, `models/layers/shortcut.py`): it reads the first post-attention norm and adds
in after the second MLP.

Routing: softmax over `n_routed_experts` + `zero_expert_num` experts, the choice
bias-corrected, no renormalisation, times `routed_scaling_factor`. The `zero_expert_num`
zero-computation experts (router ids `n_routed_experts` and up) return their input times their
weight (`zero_experts`, `models/layers/moe.py`); the routing telemetry counts them as their own
kind (zero-expert assignments), not as experts.

MLA scales q by sqrt(hidden / q_lora_rank) and the normalised KV latent by
sqrt(hidden / kv_lora_rank); both are folded into the q_a / kv_a norm weights at load (a scaled
RMSNorm weight is the same function), so the cache holds the scaled latent as the reference's.
"""

from __future__ import annotations

import math
from typing import Any

from models.config import MLAConfig, MoEModelConfig, RouterConfig, UnsupportedModelError
from models.deepseek import mla_entries, mla_softmax_scale
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, proj_entries

ARCHITECTURES = ("LongcatFlashForCausalLM",)
PUBLISHED = (
    PublishedConfig("LongCat-Flash", "LongCat-Flash-Chat", "LongcatFlashForCausalLM", dict(
        hidden_size=6144, num_layers=28, num_attention_heads=64, num_key_value_heads=64, ffn_hidden_size=12288,
        expert_ffn_hidden_size=2048, n_routed_experts=512, zero_expert_num=256, moe_topk=12,
        routed_scaling_factor=6.0, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        head_dim=64, v_head_dim=128, vocab_size=131072, max_position_embeddings=131072, rope_theta=1e7)),
)
TINY = (
    # two MLA sublayers per layer, the shortcut MoE, zero-computation experts (half the router's
    # choices), bias-corrected softmax routing scaled by routed_scaling_factor
    TinyConfig("longcat_flash", "LongcatFlashForCausalLM", dict(
        num_layers=2, num_hidden_layers=4, ffn_hidden_size=96, expert_ffn_hidden_size=32, n_routed_experts=8,
        zero_expert_num=4, moe_topk=3, routed_scaling_factor=2.0, q_lora_rank=24, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8, v_head_dim=16, num_key_value_heads=4),
        engine="default"),
)


def hf_config_class(arch: str):
    import transformers

    return transformers.LongcatFlashConfig


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    if not get("q_lora_rank"):
        raise UnsupportedModelError("LongCat-Flash without q_lora_rank is not supported")
    mla = MLAConfig(q_lora_rank=get("q_lora_rank"), kv_lora_rank=get("kv_lora_rank"),
                    qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
                    v_head_dim=get("v_head_dim"))
    if get("qk_head_dim", mla.qk_head_dim) != mla.qk_head_dim:
        raise UnsupportedModelError(f"LongCat-Flash qk_head_dim={get('qk_head_dim')} is not "
                                    f"qk_nope_head_dim + qk_rope_head_dim = {mla.qk_head_dim}")
    if get("head_dim") not in (None, mla.qk_rope_head_dim):  # the reference's rotary width
        raise UnsupportedModelError(f"LongCat-Flash head_dim={get('head_dim')} differs from "
                                    f"qk_rope_head_dim={mla.qk_rope_head_dim}")
    zero_type = get("zero_expert_type", "identity")
    if zero_type != "identity":
        raise UnsupportedModelError(f"LongCat-Flash zero_expert_type={zero_type!r} is not supported")
    router = RouterConfig(scoring="softmax", correction_bias=True, bias=bool(get("router_bias", False)),
                          scaling_factor=float(get("routed_scaling_factor", 1.0)), fp32=True)
    attention_bias = bool(get("attention_bias", False))
    return dict(
        num_kv_heads=get("num_attention_heads"), head_dim=mla.qk_head_dim, rotary_dim=None, mla=mla,
        attn_scale=mla_softmax_scale(hf, mla.qk_head_dim), rope_style="interleaved",
        qkv_bias=attention_bias, o_bias=attention_bias,
        num_experts=get("n_routed_experts"), zero_experts=get("zero_expert_num") or 0, top_k=get("moe_topk"),
        moe_intermediate_size=get("expert_ffn_hidden_size"), norm_topk_prob=False, router=router,
        dense_intermediate_size=get("ffn_hidden_size"), moe_shortcut=True,
        sparse_layers=tuple(i % 2 == 0 for i in range(num_layers)),
    )


def _scaled(factor: float):
    return lambda t: t * factor


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    out: WeightMap = {"model.embed_tokens.weight": ("embed.weight", ()), "model.norm.weight": ("norm.weight", ())}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", ())
    q_scale = math.sqrt(cfg.hidden_size / cfg.mla.q_lora_rank)
    kv_scale = math.sqrt(cfg.hidden_size / cfg.mla.kv_lora_rank)
    for i in range(cfg.num_layers):
        j, s = divmod(i, 2)  # sublayer s of their layer j
        hf = f"model.layers.{j}"
        out[f"{hf}.input_layernorm.{s}.weight"] = (f"layers.{i}.input_norm.weight", ())
        out[f"{hf}.post_attention_layernorm.{s}.weight"] = (f"layers.{i}.post_attn_norm.weight", ())
        for name, entry in mla_entries(cfg, i).items():  # named model.layers.{i}.self_attn.* there
            theirs = name.replace(f"model.layers.{i}.self_attn.", f"{hf}.self_attn.{s}.", 1)
            if theirs.endswith("q_a_layernorm.weight"):
                entry = entry + (_scaled(q_scale),)
            elif theirs.endswith("kv_a_layernorm.weight"):
                entry = entry + (_scaled(kv_scale),)
            out[theirs] = entry
        out.update(proj_entries(cfg.dense_intermediate_size, f"{hf}.mlps.{s}", f"layers.{i}.mlp.w13.weight",
                                f"layers.{i}.mlp.w2.weight"))
        if cfg.sparse_layers[i]:
            ours = f"layers.{i}.moe"
            out[f"{hf}.mlp.router.classifier.weight"] = (f"{ours}.gate.weight", ())
            if cfg.router.bias:
                out[f"{hf}.mlp.router.classifier.bias"] = (f"{ours}.gate.bias", ())
            out[f"{hf}.mlp.router.e_score_correction_bias"] = (f"{ours}.gate.e_score_correction_bias", ())
            for e in range(cfg.num_experts):
                out.update(proj_entries(cfg.moe_intermediate_size, f"{hf}.mlp.experts.{e}", f"{ours}.w13",
                                        f"{ours}.w2", expert=e))
    return out
