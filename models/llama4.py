"""Llama 4 text (`Llama4ForCausalLM` with `Llama4TextConfig`): MoE on the `moe_layers`
(every `interleave_moe_layer_step`-th), a top-1 sigmoid router whose weight scales the expert's
input, an always-on shared expert; interleaved rotary, NoPE layers (`no_rope_layers`) with
attention temperature tuning, q/k L2 norm on rotary layers, chunked attention
(`attention_chunk_size`) where `layer_types` says `chunked_attention`."""

from __future__ import annotations

from typing import Any

from models.config import MoEModelConfig, RouterConfig
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, decoder_map, proj_entries

ARCHITECTURES = ("Llama4ForCausalLM",)
PUBLISHED = (
    PublishedConfig("Llama 4", "Llama-4-Scout-17B-16E (text)", "Llama4ForCausalLM", dict(
        hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=16, num_experts_per_tok=1,
        interleave_moe_layer_step=1, attention_chunk_size=8192, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=8192, attn_scale=0.1, vocab_size=202048, max_position_embeddings=10485760, rope_theta=5e5,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192))),
)
TINY = (
    # MoE on odd layers, NoPE odd layers with temperature tuning, chunked attention (8) elsewhere
    TinyConfig("llama4", "Llama4ForCausalLM", dict(
        num_hidden_layers=4, intermediate_size=32, intermediate_size_mlp=48, num_local_experts=4,
        num_experts_per_tok=1, head_dim=16, interleave_moe_layer_step=2, no_rope_layer_interval=2,
        attention_chunk_size=8, floor_scale=4, attn_scale=0.1), engine="default"),
)


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
    def moe(i: int, hf: str, ours: str) -> WeightMap:
        # stacked [E, H, 2I] (gate columns, then up) and [E, I, H]: ours is their transpose
        return {
            f"{hf}.router.weight": (f"{ours}.gate.weight", ()),
            f"{hf}.experts.gate_up_proj": (f"{ours}.w13", (), lambda t: t.transpose(1, 2)),
            f"{hf}.experts.down_proj": (f"{ours}.w2", (), lambda t: t.transpose(1, 2)),
            **proj_entries(cfg.shared_expert_intermediate_size, f"{hf}.shared_expert", f"{ours}.shared.w13.weight",
                           f"{ours}.shared.w2.weight"),
        }

    return decoder_map(cfg, moe, block="feed_forward")
