"""Llama 4 text (`Llama4ForCausalLM` with `Llama4TextConfig`): MoE on the `moe_layers`
(every `interleave_moe_layer_step`-th), a top-1 sigmoid router whose weight scales the expert's
input, an always-on shared expert; interleaved rotary, NoPE layers (`no_rope_layers`) with
attention temperature tuning, q/k L2 norm on rotary layers, chunked attention
(`attention_chunk_size`) where `layer_types` says `chunked_attention`."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig, RouterConfig
from models.loader import WeightMap, common_entries, proj_entries


def hf_config_class(arch: str):
    import transformers

    return transformers.Llama4TextConfig


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    moe_layers = set(get("moe_layers") or [])
    chunk = get("attention_chunk_size")
    types = get("layer_types") or ["full_attention"] * num_layers
    chunks = tuple(chunk if chunk and t == "chunked_attention" else None for t in types[:num_layers])
    nope = tuple(not bool(r) for r in (get("no_rope_layers") or [1] * num_layers)[:num_layers])
    bias = bool(get("attention_bias", False))
    return dict(
        rope_style="interleaved", qkv_bias=bias, o_bias=bias, qk_norm="l2" if get("use_qk_norm") else None,
        attention_chunks=chunks if any(c is not None for c in chunks) else (),
        nope_layers=nope if any(nope) else (),
        attn_temperature=(float(get("floor_scale")), float(get("attn_scale"))) if get("attn_temperature_tuning") else None,
        num_experts=get("num_local_experts"), top_k=get("num_experts_per_tok"),
        moe_intermediate_size=get("intermediate_size"), dense_intermediate_size=get("intermediate_size_mlp"),
        norm_topk_prob=False, router=RouterConfig(scoring="sigmoid"), expert_input_scaling=True,
        shared_expert_intermediate_size=get("intermediate_size"),
        sparse_layers=tuple(i in moe_layers for i in range(num_layers)),
    )


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    out = common_entries(cfg)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.feed_forward", f"layers.{i}"
        if not cfg.sparse_layers[i]:
            out.update(proj_entries(cfg.dense_intermediate_size, hf, f"{ours}.mlp.w13.weight", f"{ours}.mlp.w2.weight"))
            continue
        out[f"{hf}.router.weight"] = (f"{ours}.moe.gate.weight", ())
        # stacked [E, H, 2I] (gate columns, then up) and [E, I, H]: ours is their transpose
        out[f"{hf}.experts.gate_up_proj"] = (f"{ours}.moe.w13", (), lambda t: t.transpose(1, 2))
        out[f"{hf}.experts.down_proj"] = (f"{ours}.moe.w2", (), lambda t: t.transpose(1, 2))
        out.update(proj_entries(cfg.shared_expert_intermediate_size, f"{hf}.shared_expert",
                                f"{ours}.moe.shared.w13.weight", f"{ours}.moe.shared.w2.weight"))
    return out
