"""Qwen3-Next and Qwen3.5-MoE (text): hybrid models whose layers alternate Gated DeltaNet linear
attention (`models/layers/linear_attention.py`, a fixed-size state per sequence) with gated full
attention (3:1 by default), under Qwen2-MoE-style MoE blocks (a shared expert with a sigmoid gate).

Checkpoint layouts mapped at load onto ours:
- norms store `w` and compute `x * (1 + w)` (input/post-attention/final norms, q/k norms): the
  `1 + w` is folded into our RMSNorm weights; the gated norm inside linear attention stores its
  weight as is;
- full attention's `q_proj` yields, per head, the query then an output gate: split into our
  qkv rows [q | gate | k | v];
- Qwen3-Next's `in_proj_qkvz` / `in_proj_ba` interleave q, k, v, z (and b, a) per key-head group:
  de-interleaved into our `in_proj` rows [q, k, v, z, b, a]; Qwen3.5 stores `in_proj_qkv`,
  `in_proj_z`, `in_proj_b`, `in_proj_a` in that order already;
- `conv1d.weight` [channels, 1, width] loses its middle axis.
"""

from __future__ import annotations

from typing import Any

import torch

from models.config import LinearAttentionConfig, MoEModelConfig, hybrid_layer_kinds
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, common_entries, proj_entries

ARCHITECTURES = ("Qwen3NextForCausalLM", "Qwen3_5MoeForCausalLM")
PUBLISHED = (
    PublishedConfig("Qwen3-Next", "Qwen3-Next-80B-A3B-Instruct", "Qwen3NextForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        intermediate_size=5120, moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=512,
        num_experts_per_tok=10, norm_topk_prob=True, linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4,
        vocab_size=151936, max_position_embeddings=262144), quantized="FP8 block releases"),
    PublishedConfig("Qwen3.5-MoE", "Qwen3.5-35B-A3B (text)", "Qwen3_5MoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=40, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=256, num_experts_per_tok=8,
        linear_num_key_heads=16, linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
        linear_conv_kernel_dim=4, vocab_size=248320, max_position_embeddings=262144)),
)
_LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
               linear_conv_kernel_dim=4, head_dim=16, moe_intermediate_size=48, shared_expert_intermediate_size=80,
               num_experts=8, num_experts_per_tok=2)
TINY = (
    TinyConfig("qwen3_next", "Qwen3NextForCausalLM", dict(
        _LINEAR, intermediate_size=128, norm_topk_prob=True, num_hidden_layers=4,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        mlp_only_layers=[2]), engine="default"),
    TinyConfig("qwen3_next-kgroups", "Qwen3NextForCausalLM", dict(
        _LINEAR, linear_num_key_heads=1, intermediate_size=128, norm_topk_prob=False,
        layer_types=["full_attention", "linear_attention", "linear_attention"])),
    TinyConfig("qwen3_5_moe", "Qwen3_5MoeForCausalLM", dict(
        _LINEAR, layer_types=["linear_attention", "linear_attention", "full_attention"]), engine="default"),
)


def hf_config_class(arch: str):
    import transformers

    return {"Qwen3NextForCausalLM": transformers.Qwen3NextConfig,
            "Qwen3_5MoeForCausalLM": transformers.Qwen3_5MoeTextConfig}[arch]


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
    kinds = hybrid_layer_kinds(hf, num_layers, "linear")
    num_experts = get("num_experts") or 0
    if arch == "Qwen3NextForCausalLM":
        step = get("decoder_sparse_step", 1) or 1
        dense_only = set(get("mlp_only_layers", []) or [])
        norm_topk = bool(get("norm_topk_prob", True))
    else:  # Qwen3.5: every layer MoE, top-k weights renormalised
        step, dense_only, norm_topk = 1, set(), True
    sparse = tuple((i not in dense_only) and bool(num_experts) and (i + 1) % step == 0 for i in range(num_layers))
    shared = get("shared_expert_intermediate_size") or 0
    return dict(
        num_experts=num_experts, top_k=get("num_experts_per_tok"), moe_intermediate_size=get("moe_intermediate_size"),
        norm_topk_prob=norm_topk, qkv_bias=bool(get("attention_bias", False)), o_bias=bool(get("attention_bias", False)),
        qk_norm="head", shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0, sparse_layers=sparse,
        layer_kinds=tuple(kinds), attn_output_gate=True,
        linear_attention=LinearAttentionConfig(
            num_k_heads=get("linear_num_key_heads"), num_v_heads=get("linear_num_value_heads"),
            k_head_dim=get("linear_key_head_dim"), v_head_dim=get("linear_value_head_dim"),
            conv_kernel=get("linear_conv_kernel_dim")),
    )


def _plus_one(t: torch.Tensor) -> torch.Tensor:
    """A `x * (1 + w)` norm's stored `w` -> our `x * w` weight."""
    return t.float().add(1.0).to(t.dtype)


def _query_and_gate(heads: int, head_dim: int):
    """q_proj rows, per head [query | gate] -> [all queries | all gates]."""
    def fn(t: torch.Tensor) -> torch.Tensor:
        shaped = t.reshape(heads, 2, head_dim, *t.shape[1:])
        return torch.cat((shaped[:, 0].reshape(heads * head_dim, *t.shape[1:]),
                          shaped[:, 1].reshape(heads * head_dim, *t.shape[1:])))
    return fn


def _deinterleave(la: LinearAttentionConfig, parts: list[int]):
    """Rows grouped per key head, each group [part 0 | part 1 | ...] -> [all of part 0 | all of part 1 | ...]."""
    def fn(t: torch.Tensor) -> torch.Tensor:
        groups = t.reshape(la.num_k_heads, sum(parts), *t.shape[1:])
        return torch.cat([p.reshape(-1, *t.shape[1:]) for p in groups.split(parts, dim=1)])
    return fn


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    la = cfg.linear_attention
    out = common_entries(cfg, attention=False)
    for name, entry in list(out.items()):
        if name.endswith("norm.weight"):  # input, post-attention and final norms
            out[name] = entry[:2] + (_plus_one,)
    q, kv = cfg.q_size, cfg.kv_size
    group = la.num_v_heads // la.num_k_heads
    qkvz = [la.k_head_dim, la.k_head_dim, group * la.v_head_dim, group * la.v_head_dim]
    mixed = la.conv_dim + la.value_dim  # our in_proj rows: [q, k, v, z | b, a]
    for i in range(cfg.num_layers):
        ours = f"layers.{i}.attn"
        if cfg.layer_kind(i) == "attention":
            hf = f"model.layers.{i}.self_attn"
            out[f"{hf}.q_proj.weight"] = (f"{ours}.qkv.weight", (slice(0, 2 * q),), _query_and_gate(cfg.num_heads,
                                                                                                      cfg.head_dim))
            out[f"{hf}.k_proj.weight"] = (f"{ours}.qkv.weight", (slice(2 * q, 2 * q + kv),))
            out[f"{hf}.v_proj.weight"] = (f"{ours}.qkv.weight", (slice(2 * q + kv, 2 * q + 2 * kv),))
            if cfg.qkv_bias:
                out[f"{hf}.q_proj.bias"] = (f"{ours}.qkv.bias", (slice(0, 2 * q),),
                                            _query_and_gate(cfg.num_heads, cfg.head_dim))
                out[f"{hf}.k_proj.bias"] = (f"{ours}.qkv.bias", (slice(2 * q, 2 * q + kv),))
                out[f"{hf}.v_proj.bias"] = (f"{ours}.qkv.bias", (slice(2 * q + kv, 2 * q + 2 * kv),))
            out[f"{hf}.o_proj.weight"] = (f"{ours}.o_proj.weight", ())
            if cfg.o_bias:
                out[f"{hf}.o_proj.bias"] = (f"{ours}.o_proj.bias", ())
            out[f"{hf}.q_norm.weight"] = (f"{ours}.q_norm.weight", (), _plus_one)
            out[f"{hf}.k_norm.weight"] = (f"{ours}.k_norm.weight", (), _plus_one)
        else:
            hf = f"model.layers.{i}.linear_attn"
            if cfg.architecture == "Qwen3NextForCausalLM":
                out[f"{hf}.in_proj_qkvz.weight"] = (f"{ours}.in_proj.weight", (slice(0, mixed),),
                                                    _deinterleave(la, qkvz))
                out[f"{hf}.in_proj_ba.weight"] = (f"{ours}.in_proj.weight", (slice(mixed, None),),
                                                  _deinterleave(la, [group, group]))
            else:
                rows = {"qkv": la.conv_dim, "z": la.value_dim, "b": la.num_v_heads, "a": la.num_v_heads}
                start = 0
                for part, n in rows.items():
                    out[f"{hf}.in_proj_{part}.weight"] = (f"{ours}.in_proj.weight", (slice(start, start + n),))
                    start += n
            out[f"{hf}.conv1d.weight"] = (f"{ours}.conv_weight", (), lambda t: t.squeeze(1))
            out[f"{hf}.dt_bias"] = (f"{ours}.dt_bias", ())
            out[f"{hf}.A_log"] = (f"{ours}.A_log", ())
            out[f"{hf}.norm.weight"] = (f"{ours}.norm_weight", ())
            out[f"{hf}.out_proj.weight"] = (f"{ours}.out_proj.weight", ())
        hf, ours = f"model.layers.{i}.mlp", f"layers.{i}"
        if not cfg.sparse_layers[i]:
            out.update(proj_entries(cfg.dense_intermediate_size, hf, f"{ours}.mlp.w13.weight", f"{ours}.mlp.w2.weight"))
            continue
        out[f"{hf}.gate.weight"] = (f"{ours}.moe.gate.weight", ())
        for e in range(cfg.num_experts):
            out.update(proj_entries(cfg.moe_intermediate_size, f"{hf}.experts.{e}", f"{ours}.moe.w13",
                                    f"{ours}.moe.w2", expert=e))
        if cfg.shared_expert_intermediate_size:
            out.update(proj_entries(cfg.shared_expert_intermediate_size, f"{hf}.shared_expert",
                                    f"{ours}.moe.shared.w13.weight", f"{ours}.moe.shared.w2.weight"))
            out[f"{hf}.shared_expert_gate.weight"] = (f"{ours}.moe.shared_gate.weight", ())
    return out
