"""Checkpoint name -> our parameter: the mapping tables the families build (`models/<family>.py`)
and the loader (`models/loader.py`) applies.

An entry maps one checkpoint tensor to (our parameter name, the index into that parameter it
fills, `()` for all of it[, a transform]): our q/k/v and gate/up projections are fused and our
experts stacked, so most entries fill a slice. `decoder_map` is the skeleton every family shares
(embeddings, norms, attention, LM head; per layer the dense MLP or the family's MoE entries); the
helpers below it name the common pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.config import MoEModelConfig

Transform = Callable[[torch.Tensor], torch.Tensor]
# checkpoint name -> (our parameter name, index into that parameter; () for all of it[, transform])
WeightMap = dict[str, tuple]


class AliasedWeightMap(dict):
    """A WeightMap whose checkpoint names may also appear under another name (releases that
    differ in naming, e.g. Kimi Linear's dense MLP): `aliases` maps the other name to the one
    in the table; the loader reads either, and reports the table's name when both are absent."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.aliases: dict[str, str] = {}


def decoder_map(cfg: MoEModelConfig, moe: Callable[[int, str, str], WeightMap], *, block: str = "mlp",
                attention: Callable[[int], WeightMap] | None = None) -> WeightMap:
    """The whole table: `common_entries`, then per layer its attention (`attention(i)`, default
    `attention_entries` under `self_attn`) and, under `model.layers.{i}.{block}`, either the dense
    SwiGLU MLP (`{gate,up,down}_proj`) or `moe(i, checkpoint prefix, our prefix layers.{i}.moe)`."""
    out = common_entries(cfg, attention=attention is None)
    for i in range(cfg.num_layers):
        if attention is not None:
            out.update(attention(i))
        hf = f"model.layers.{i}.{block}"
        if cfg.sparse_layers[i]:
            out.update(moe(i, hf, f"layers.{i}.moe"))
        else:
            out.update(proj_entries(cfg.dense_intermediate_size, hf, f"layers.{i}.mlp.w13.weight",
                                    f"layers.{i}.mlp.w2.weight", bias=cfg.mlp_bias))
    return out


def attention_entries(cfg: MoEModelConfig, layer: int, hf_prefix: str, ours: str) -> WeightMap:
    """q/k/v (fused into our qkv), o_proj, and q/k norms of one layer."""
    q, kv = cfg.q_size, cfg.kv_size
    out: WeightMap = {}
    parts = {"q": slice(0, q), "k": slice(q, q + kv), "v": slice(q + kv, q + 2 * kv)}
    kinds = ["weight"] + (["bias"] if cfg.qkv_bias else [])
    for name, sl in parts.items():
        for kind in kinds:
            out[f"{hf_prefix}.{name}_proj.{kind}"] = (f"{ours}.qkv.{kind}", (sl,))
    out[f"{hf_prefix}.o_proj.weight"] = (f"{ours}.o_proj.weight", ())
    if cfg.o_bias:
        out[f"{hf_prefix}.o_proj.bias"] = (f"{ours}.o_proj.bias", ())
    if cfg.qk_norm in ("head", "full"):
        out[f"{hf_prefix}.q_norm.weight"] = (f"{ours}.q_norm.weight", ())
        out[f"{hf_prefix}.k_norm.weight"] = (f"{ours}.k_norm.weight", ())
    if cfg.attention_sinks:
        out[f"{hf_prefix}.sinks"] = (f"{ours}.sinks", ())
    return out


def swiglu_entries(inter: int, hf_gate: str, hf_up: str, hf_down: str, w13: str, w2: str, expert=None,
                   bias: bool = False) -> WeightMap:
    """gate/up -> halves of our fused w13, down -> w2 (optionally one expert of a stack); with
    `bias`, the matching `.bias` tensors of nn.Linear-style names too."""
    e = () if expert is None else (expert,)
    out = {
        hf_gate: (w13, e + (slice(0, inter),)),
        hf_up: (w13, e + (slice(inter, 2 * inter),)),
        hf_down: (w2, e),
    }
    if bias:
        for hf, (ours, index) in list(out.items()):
            out[hf.removesuffix(".weight") + ".bias"] = (ours.removesuffix(".weight") + ".bias", index)
    return out


def proj_entries(inter: int, hf: str, w13: str, w2: str, expert=None, bias: bool = False) -> WeightMap:
    """HF's SwiGLU naming, `{hf}.{gate,up,down}_proj.weight`, onto our fused w13 and w2."""
    return swiglu_entries(inter, f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight", f"{hf}.down_proj.weight",
                          w13, w2, expert, bias)


def moe_entries(cfg: MoEModelConfig, layer: int, hf: str, correction: tuple | None = None) -> WeightMap:
    """The MoE naming DeepSeek, GLM-4.5 and ERNIE share: `gate` (router),
    `experts.{e}.{gate,up,down}_proj` and `shared_experts`, plus the router's correction bias
    (`correction`: (checkpoint name, transform or None))."""
    ours = f"layers.{layer}"
    out: WeightMap = {f"{hf}.gate.weight": (f"{ours}.moe.gate.weight", ())}
    if correction is not None:
        name, fn = correction
        out[name] = (f"{ours}.moe.gate.e_score_correction_bias", ()) + ((fn,) if fn else ())
    for e in range(cfg.num_experts):
        out.update(proj_entries(cfg.moe_intermediate_size, f"{hf}.experts.{e}", f"{ours}.moe.w13",
                                f"{ours}.moe.w2", expert=e))
    if cfg.shared_expert_intermediate_size:
        out.update(proj_entries(cfg.shared_expert_intermediate_size, f"{hf}.shared_experts",
                                f"{ours}.moe.shared.w13.weight", f"{ours}.moe.shared.w2.weight", bias=cfg.mlp_bias))
    return out


def common_entries(cfg: MoEModelConfig, attention: bool = True) -> WeightMap:
    out: WeightMap = {
        "model.embed_tokens.weight": ("embed.weight", ()),
        "model.norm.weight": ("norm.weight", ()),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ("lm_head.weight", ())
    if cfg.lm_head_bias:
        out["lm_head.bias"] = ("lm_head.bias", ())
    for i in range(cfg.num_layers):
        out[f"model.layers.{i}.input_layernorm.weight"] = (f"layers.{i}.input_norm.weight", ())
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = (f"layers.{i}.post_attn_norm.weight", ())
        if attention:
            out.update(attention_entries(cfg, i, f"model.layers.{i}.self_attn", f"layers.{i}.attn"))
    return out
