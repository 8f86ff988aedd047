"""Kimi Linear (`KimiLinearForCausalLM`): a hybrid whose layers alternate Kimi Delta Attention
(`models/layers/kda.py`, a fixed-size state per sequence; 3:1 in the published model) with
DeepSeek-style Multi-head Latent Attention without rotary embeddings (NoPE: the decay of the
KDA layers carries position; the cached "rope" part of the key passes unrotated), under
DeepSeek-V3-style MoE blocks (sigmoid scores with a correction bias for the choice, optional
group-limited top-k, renormalised top-k weights times `routed_scaling_factor`, one shared
expert block; the first `first_k_dense_replace` layers dense).

Checkpoint layout (the original release's, which transformers also writes) mapped at load onto ours:
- KDA: `q_proj`, `k_proj`, `v_proj`, `b_proj`, `f_a_proj`, `g_a_proj` into our fused `in_proj`
  rows; `q_conv1d` / `k_conv1d` / `v_conv1d` ([channels, 1, width]) into one depthwise
  convolution over [q | k | v]; `A_log` [1, 1, heads, 1] flattened;
- MLA: the DeepSeek names (`models/deepseek.py`, `mla_entries`);
- MoE: `block_sparse_moe.{gate, experts.{e}.w1/w2/w3, shared_experts}`; dense layers' MLP under
  `mlp` (the original release) or `block_sparse_moe` (what transformers saves).
"""

from __future__ import annotations

from typing import Any

from models.config import (
    KDAConfig,
    MLAConfig,
    MoEModelConfig,
    RouterConfig,
    UnsupportedModelError,
    hybrid_layer_kinds,
)
from models.deepseek import mla_entries
from models.family import PublishedConfig, TinyConfig
from models.weight_map import (
    AliasedWeightMap,
    WeightMap,
    common_entries,
    proj_entries,
    swiglu_entries,
)

ARCHITECTURES = ("KimiLinearForCausalLM",)
# moonshotai/Kimi-Linear-48B-A3B-Instruct's config.json, as pinned by public code that reads it
_KDA_LAYERS = [1, 2, 3, 5, 6, 7, 9, 10, 11, 13, 14, 15, 17, 18, 19, 21, 22, 23, 25, 26]
PUBLISHED = (
    PublishedConfig("Kimi Linear", "Kimi-Linear-48B-A3B", "KimiLinearForCausalLM", dict(
        vocab_size=163840, hidden_size=2304, intermediate_size=9216, num_hidden_layers=27, num_attention_heads=32,
        num_key_value_heads=32, rms_norm_eps=1e-5, tie_word_embeddings=False, first_k_dense_replace=1,
        moe_intermediate_size=1024, num_experts=256, num_experts_per_token=8, num_shared_experts=1,
        moe_renormalize=True, routed_scaling_factor=2.446, num_expert_group=1, topk_group=1, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, model_max_length=1048576,
        bos_token_id=163584, eos_token_id=163586, pad_token_id=163839,
        linear_attn_config=dict(full_attn_layers=[4, 8, 12, 16, 20, 24, 27], kda_layers=_KDA_LAYERS, head_dim=128,
                                num_heads=32, short_conv_kernel_size=4))),
)
_SMALL = dict(num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
              moe_intermediate_size=32, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2,
              n_shared_experts=1, linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY = (
    # KDA beside NoPE MLA without q_lora, a dense first layer, grouped sigmoid routing with scaling
    TinyConfig("kimi_linear", "KimiLinearForCausalLM", dict(
        _SMALL, q_lora_rank=None, n_group=4, topk_group=2, routed_scaling_factor=2.446, num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"]), engine="default"),
    # MLA with q_lora first, no renormalisation, all layers MoE
    TinyConfig("kimi_linear-qlora", "KimiLinearForCausalLM", dict(
        _SMALL, q_lora_rank=24, norm_topk_prob=False, routed_scaling_factor=1.5,
        layer_types=["full_attention", "linear_attention", "linear_attention"],
        mlp_layer_types=["sparse", "sparse", "sparse"])),
)


def hf_config_class(arch: str):
    import transformers

    return transformers.KimiLinearConfig


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    kinds = hybrid_layer_kinds(hf, num_layers, "kda")
    # options of later Kimi releases that transformers' KimiLinear does not implement either
    linear_cfg = get("linear_attn_config") or {}
    refused = {"mla_use_nope": get("mla_use_nope", True) is False,
               "mla_use_output_gate": bool(get("mla_use_output_gate", False)),
               "moe_router_activation_func": get("moe_router_activation_func", "sigmoid") not in (None, "sigmoid"),
               "linear_attn_config.gate_lower_bound": linear_cfg.get("gate_lower_bound") is not None,
               "linear_attn_config.use_full_rank_gate": bool(linear_cfg.get("use_full_rank_gate", False))}
    for name, bad in refused.items():
        if bad:
            raise UnsupportedModelError(f"Kimi Linear with {name} set as in this config is not supported")
    mlp_types = list(get("mlp_layer_types") or [])
    if len(mlp_types) != num_layers or set(mlp_types) - {"dense", "sparse"}:
        raise UnsupportedModelError(f"mlp_layer_types={mlp_types!r}: one of dense / sparse per layer")
    mla = MLAConfig(q_lora_rank=get("q_lora_rank"), kv_lora_rank=get("kv_lora_rank"),
                    qk_nope_head_dim=get("qk_nope_head_dim"), qk_rope_head_dim=get("qk_rope_head_dim"),
                    v_head_dim=get("v_head_dim"))
    heads = get("num_attention_heads")
    if (get("num_key_value_heads") or heads) != heads:
        raise UnsupportedModelError(f"Kimi Linear with num_key_value_heads={get('num_key_value_heads')} != "
                                    f"num_attention_heads={heads} is not supported")
    router = RouterConfig(scoring="sigmoid", correction_bias=True, n_group=get("n_group") or 1,
                          topk_group=get("topk_group") or 1, group_score="top2_sum",
                          scaling_factor=float(get("routed_scaling_factor", 1.0)), renorm_min=1e-20, fp32=True)
    bias = bool(get("attention_bias", False))
    return dict(
        num_kv_heads=heads, head_dim=mla.qk_head_dim, rotary_dim=None, mla=mla, attn_scale=mla.qk_head_dim**-0.5,
        nope_layers=(True,) * num_layers, qkv_bias=bias, o_bias=bias,
        num_experts=get("num_local_experts"), top_k=get("num_experts_per_tok"),
        moe_intermediate_size=get("moe_intermediate_size"), norm_topk_prob=bool(get("norm_topk_prob", True)),
        router=router, shared_expert_intermediate_size=get("moe_intermediate_size") * (get("n_shared_experts") or 0),
        sparse_layers=tuple(t == "sparse" for t in mlp_types), layer_kinds=tuple(kinds),
        kda=KDAConfig(num_heads=get("linear_num_heads"), head_dim=get("linear_head_dim"),
                      conv_kernel=get("linear_conv_kernel_dim")),
    )


def _flat(t):
    return t.reshape(-1)


def _squeeze(t):
    return t.squeeze(1)


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    kda = cfg.kda
    out = AliasedWeightMap(common_entries(cfg, attention=False))
    H, d, kd = kda.num_heads, kda.head_dim, kda.key_dim
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.self_attn", f"layers.{i}.attn"
        if cfg.layer_kind(i) == "attention":
            out.update(mla_entries(cfg, i))
        else:
            start = 0
            for part, n in (("q_proj", kd), ("k_proj", kd), ("v_proj", kd), ("b_proj", H), ("f_a_proj", d),
                            ("g_a_proj", d)):
                out[f"{hf}.{part}.weight"] = (f"{ours}.in_proj.weight", (slice(start, start + n),))
                start += n
            for j, part in enumerate(("q", "k", "v")):
                out[f"{hf}.{part}_conv1d.weight"] = (f"{ours}.conv_weight", (slice(j * kd, (j + 1) * kd),), _squeeze)
            out[f"{hf}.f_b_proj.weight"] = (f"{ours}.f_b_proj.weight", ())
            out[f"{hf}.g_b_proj.weight"] = (f"{ours}.g_b_proj.weight", ())
            out[f"{hf}.dt_bias"] = (f"{ours}.dt.bias", ())
            out[f"{hf}.A_log"] = (f"{ours}.A_log", (), _flat)
            out[f"{hf}.o_norm.weight"] = (f"{ours}.norm_weight", ())
            out[f"{hf}.o_proj.weight"] = (f"{ours}.o_proj.weight", ())
        hf, ours = f"model.layers.{i}.block_sparse_moe", f"layers.{i}"
        if not cfg.sparse_layers[i]:
            dense = proj_entries(cfg.dense_intermediate_size, hf, f"{ours}.mlp.w13.weight", f"{ours}.mlp.w2.weight")
            out.update(dense)
            for name in dense:  # the original release names a dense layer's MLP `mlp`
                out.aliases[name.replace(".block_sparse_moe.", ".mlp.")] = name
            continue
        out[f"{hf}.gate.weight"] = (f"{ours}.moe.gate.weight", ())
        out[f"{hf}.gate.e_score_correction_bias"] = (f"{ours}.moe.gate.e_score_correction_bias", ())
        for e in range(cfg.num_experts):
            x = f"{hf}.experts.{e}"
            out.update(swiglu_entries(cfg.moe_intermediate_size, f"{x}.w1.weight", f"{x}.w3.weight", f"{x}.w2.weight",
                                      f"{ours}.moe.w13", f"{ours}.moe.w2", expert=e))
        if cfg.shared_expert_intermediate_size:
            out.update(proj_entries(cfg.shared_expert_intermediate_size, f"{hf}.shared_experts",
                                    f"{ours}.moe.shared.w13.weight", f"{ours}.moe.shared.w2.weight"))
    return out
