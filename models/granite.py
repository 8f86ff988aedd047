"""Granite MoE, Granite MoE Shared and Granite 4.0-H (`GraniteMoeForCausalLM`,
`GraniteMoeSharedForCausalLM`, `GraniteMoeHybridForCausalLM`): embedding, residual and attention
multipliers, logits divided by `logits_scaling`, a router that takes a softmax over the top-k
logits; experts stacked as `input_linear [E, 2I, H]` (gate rows, then up) and
`output_linear [E, H, I]`; the Shared variant adds an always-on `shared_mlp`.

Granite 4.0-H (hybrid) keeps the Shared variant's MoE blocks and puts Mamba2 layers
(`models/layers/mamba2.py`, a fixed-size state per sequence) in place of attention on most
layers (`layer_types`: "mamba" / "attention"); its attention layers use no rotary embedding
unless `position_embedding_type` is "rope" (the published checkpoints: "nope")."""

from __future__ import annotations

from typing import Any

from models.config import Mamba2Config, MoEModelConfig, RouterConfig, UnsupportedModelError
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, attention_entries, decoder_map

ARCHITECTURES = ("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM", "GraniteMoeHybridForCausalLM")
# Granite-4.0-H-Tiny's config.json: 4 attention layers (5, 15, 25, 35) among 36 Mamba2 layers
_H_TINY_LAYERS = ["mamba"] * 5 + ["attention"] + (["mamba"] * 9 + ["attention"]) * 3 + ["mamba"] * 4
PUBLISHED = (
    PublishedConfig("Granite MoE (+ Shared)", "granite-3.0-1b-a400m", "GraniteMoeForCausalLM", dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
        intermediate_size=512, num_local_experts=32, num_experts_per_tok=8, embedding_multiplier=12.0,
        attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=6.0, vocab_size=49155,
        max_position_embeddings=4096, tie_word_embeddings=True)),
    PublishedConfig("Granite 4.0-H", "granite-4.0-h-tiny", "GraniteMoeHybridForCausalLM", dict(
        hidden_size=1536, num_hidden_layers=40, num_attention_heads=12, num_key_value_heads=4, intermediate_size=512,
        shared_intermediate_size=1024, num_local_experts=64, num_experts_per_tok=6, vocab_size=100352,
        tie_word_embeddings=True, mamba_n_heads=48, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1,
        mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=256, position_embedding_type="nope",
        max_position_embeddings=131072, layer_types=_H_TINY_LAYERS)),
)
_MULTIPLIERS = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0)
TINY = (
    TinyConfig("granitemoe", "GraniteMoeForCausalLM", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, **_MULTIPLIERS)),
    # multipliers + the always-on shared MLP
    TinyConfig("granitemoeshared", "GraniteMoeSharedForCausalLM", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=48,
        **_MULTIPLIERS), engine="slow"),
    # Granite 4.0-H: Mamba2 layers (2 B/C groups, 8-token scan chunks so prompts span several)
    # beside NoPE attention, MoE + shared MLP on every layer
    TinyConfig("granitemoehybrid", "GraniteMoeHybridForCausalLM", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=48,
        num_hidden_layers=4, layer_types=["mamba", "attention", "mamba", "mamba"], mamba_n_heads=8,
        mamba_d_state=16, mamba_n_groups=2, mamba_d_conv=4, mamba_chunk_size=8, position_embedding_type="nope",
        **_MULTIPLIERS), engine="default"),
    # rotary attention, in/out projection biases, one group
    TinyConfig("granitemoehybrid-rope", "GraniteMoeHybridForCausalLM", dict(
        intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, shared_intermediate_size=48,
        layer_types=["attention", "mamba", "mamba"], mamba_n_heads=4, mamba_d_state=8, mamba_chunk_size=16,
        mamba_proj_bias=True, position_embedding_type="rope", **_MULTIPLIERS)),
)


def hf_config_class(arch: str):
    import transformers

    return {"GraniteMoeForCausalLM": transformers.GraniteMoeConfig,
            "GraniteMoeSharedForCausalLM": transformers.GraniteMoeSharedConfig,
            "GraniteMoeHybridForCausalLM": transformers.GraniteMoeHybridConfig}[arch]


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    bias = bool(get("attention_bias", False))
    hybrid = _hybrid_fields(hf, num_layers) if arch == "GraniteMoeHybridForCausalLM" else {}
    return hybrid | dict(
        qkv_bias=bias, o_bias=bias, attn_scale=float(get("attention_multiplier", 1.0)),
        embedding_multiplier=float(get("embedding_multiplier", 1.0)),
        residual_multiplier=float(get("residual_multiplier", 1.0)), logits_scaling=float(get("logits_scaling", 1.0)),
        num_experts=get("num_local_experts"), top_k=get("num_experts_per_tok"),
        moe_intermediate_size=get("intermediate_size"), norm_topk_prob=True,
        router=RouterConfig(scoring="softmax_topk"),
        shared_expert_intermediate_size=get("shared_intermediate_size", 0) or 0,
        sparse_layers=(True,) * num_layers,
    )


def _hybrid_fields(hf: Any, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    kinds = []
    for i, t in enumerate(get("layer_types") or []):  # transformers reads "mamba" / "attention" as these
        if t not in ("linear_attention", "full_attention"):
            raise UnsupportedModelError(f"layer_types[{i}]={t!r} is not supported (mamba, attention)")
        kinds.append("mamba" if t == "linear_attention" else "attention")
    if len(kinds) != num_layers:
        raise UnsupportedModelError(f"layer_types has {len(kinds)} entries for {num_layers} layers")
    if not get("num_local_experts"):
        raise UnsupportedModelError("Granite 4.0-H without experts (num_local_experts=0, a dense model) is not "
                                    "supported: this server serves MoE models")
    rope = get("position_embedding_type") == "rope"
    limit = get("time_step_limit") or (0.0, float("inf"))
    hidden, heads = get("hidden_size"), get("mamba_n_heads")
    head_dim = get("mamba_d_head")
    if head_dim == "auto" or head_dim is None:
        head_dim = get("mamba_expand", 2) * hidden // heads
    return dict(
        layer_kinds=tuple(kinds), nope_layers=() if rope else (True,) * num_layers,
        mamba=Mamba2Config(
            num_heads=heads, head_dim=head_dim, state_size=get("mamba_d_state"), n_groups=get("mamba_n_groups"),
            conv_kernel=get("mamba_d_conv"), chunk_size=get("mamba_chunk_size"),
            conv_bias=bool(get("mamba_conv_bias", True)), proj_bias=bool(get("mamba_proj_bias", False)),
            time_step_limit=(float(limit[0]), float(limit[1]))),
    )


def _mamba_entries(cfg: MoEModelConfig, i: int) -> WeightMap:
    hf, ours = f"model.layers.{i}.mamba", f"layers.{i}.attn"
    out: WeightMap = {
        f"{hf}.in_proj.weight": (f"{ours}.in_proj.weight", ()),
        f"{hf}.conv1d.weight": (f"{ours}.conv_weight", (), lambda t: t.squeeze(1)),
        f"{hf}.dt_bias": (f"{ours}.dt_bias", ()),
        f"{hf}.A_log": (f"{ours}.A_log", ()),
        f"{hf}.D": (f"{ours}.D", ()),
        f"{hf}.norm.weight": (f"{ours}.norm_weight", ()),
        f"{hf}.out_proj.weight": (f"{ours}.out_proj.weight", ()),
    }
    if cfg.mamba.conv_bias:
        out[f"{hf}.conv1d.bias"] = (f"{ours}.conv_bias", ())
    if cfg.mamba.proj_bias:
        out[f"{hf}.in_proj.bias"] = (f"{ours}.in_proj.bias", ())
        out[f"{hf}.out_proj.bias"] = (f"{ours}.out_proj.bias", ())
    return out


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    def moe(i: int, hf: str, ours: str) -> WeightMap:
        layer = f"model.layers.{i}"
        out: WeightMap = {
            f"{hf}.router.layer.weight": (f"{ours}.gate.weight", ()),
            f"{hf}.input_linear.weight": (f"{ours}.w13", ()),
            f"{hf}.output_linear.weight": (f"{ours}.w2", ()),
        }
        if cfg.shared_expert_intermediate_size:
            out[f"{layer}.shared_mlp.input_linear.weight"] = (f"{ours}.shared.w13.weight", ())
            out[f"{layer}.shared_mlp.output_linear.weight"] = (f"{ours}.shared.w2.weight", ())
        return out

    if not cfg.hybrid:
        return decoder_map(cfg, moe, block="block_sparse_moe")

    def mixer(i: int) -> WeightMap:
        if cfg.layer_kind(i) == "mamba":
            return _mamba_entries(cfg, i)
        return attention_entries(cfg, i, f"model.layers.{i}.self_attn", f"layers.{i}.attn")

    return decoder_map(cfg, moe, block="block_sparse_moe", attention=mixer)
