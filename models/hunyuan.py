"""Hunyuan-A13B (`HunYuanMoEV1ForCausalLM`): GQA with a per-head q/k norm applied after rotary,
NTK-alpha rotary (`rope_scaling` type "dynamic" with a fixed `alpha`: a larger base), softmax
top-k routing from a float32 router (`gate.wg`), renormalised; every layer's MoE block adds one
shared MLP (`shared_mlp`), and its experts and shared MLP are `intermediate_size` wide (as in
transformers, which reads neither `moe_intermediate_size` nor `num_shared_expert`; configs where
those say otherwise are refused)."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig, RouterConfig, UnsupportedModelError
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, decoder_map, proj_entries

ARCHITECTURES = ("HunYuanMoEV1ForCausalLM",)
PUBLISHED = (
    PublishedConfig("HunYuan-MoE", "Hunyuan-A13B", "HunYuanMoEV1ForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, moe_intermediate_size=[3072] * 32, num_experts=64, moe_topk=[8] * 32,
        num_shared_expert=[1] * 32, use_mixed_mlp_moe=True, use_qk_norm=True, use_cla=False, attention_bias=False,
        rope_scaling=dict(type="dynamic", alpha=1000.0, factor=1.0), rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, vocab_size=128167)),
)
TINY = (
    # q/k norm after rotary, NTK-alpha rotary, float32 softmax router, renormalised, a shared MLP
    TinyConfig("hunyuan_moe", "HunYuanMoEV1ForCausalLM", dict(
        intermediate_size=32, num_experts=8, moe_topk=2, head_dim=16,
        rope_scaling=dict(type="dynamic", alpha=1000.0, factor=1.0), rope_theta=10000.0), engine="slow"),
)


def hf_config_class(arch: str):
    import transformers

    return transformers.HunYuanMoEV1Config


def _per_layer(name: str, value: Any, num_layers: int) -> Any:
    """HunYuan writes some options once per layer: one value for all of them, or refused."""
    if isinstance(value, (list, tuple)):
        values = set(value[:num_layers])
        if len(values) != 1:
            raise UnsupportedModelError(f"HunYuan {name}={list(value)} differs between layers: not supported")
        return values.pop()
    return value


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    inter = get("intermediate_size")
    moe_inter = _per_layer("moe_intermediate_size", get("moe_intermediate_size", inter), num_layers)
    shared = _per_layer("num_shared_expert", get("num_shared_expert", 1), num_layers)
    if moe_inter != inter or shared != 1:
        raise UnsupportedModelError(f"HunYuan with moe_intermediate_size={moe_inter}, num_shared_expert={shared} "
                                    f"(the reference uses intermediate_size={inter} and one shared MLP)")
    for name, expected in (("use_mixed_mlp_moe", True), ("use_qk_norm", True), ("use_cla", False)):
        if bool(get(name, expected)) != expected:
            raise UnsupportedModelError(f"HunYuan with {name}={get(name)!r} is not supported")
    bias = bool(get("attention_bias", False))
    return dict(
        qkv_bias=bias, o_bias=bias, qk_norm="head", qk_norm_after_rope=True,
        num_experts=_per_layer("num_experts", get("num_experts"), num_layers),
        top_k=_per_layer("moe_topk", get("moe_topk"), num_layers), moe_intermediate_size=inter,
        norm_topk_prob=True, router=RouterConfig(scoring="softmax", fp32=True),
        shared_expert_intermediate_size=inter, sparse_layers=(True,) * num_layers,
    )


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    def moe(i: int, hf: str, ours: str) -> WeightMap:
        out: WeightMap = {f"{hf}.gate.wg.weight": (f"{ours}.gate.weight", ())}
        for e in range(cfg.num_experts):
            out.update(proj_entries(cfg.moe_intermediate_size, f"{hf}.experts.{e}", f"{ours}.w13", f"{ours}.w2",
                                    expert=e))
        out.update(proj_entries(cfg.shared_expert_intermediate_size, f"{hf}.shared_mlp", f"{ours}.shared.w13.weight",
                                f"{ours}.shared.w2.weight"))
        return out

    table = decoder_map(cfg, moe)
    for i in range(cfg.num_layers):  # its q/k norms are named query_layernorm / key_layernorm
        for theirs, mine in (("query_layernorm", "q_norm"), ("key_layernorm", "k_norm")):
            attn = f"model.layers.{i}.self_attn"
            table[f"{attn}.{theirs}.weight"] = table.pop(f"{attn}.{mine}.weight")
    return table
