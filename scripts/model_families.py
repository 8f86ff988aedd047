#!/usr/bin/env python
"""Print the README's supported-families table from the family registry (`models/registry.py`):
for one real checkpoint per family (each family module's `PUBLISHED` configs, copied from the
checkpoints' `config.json`), the attention kind, the routing kind, the KV-cache bytes per
token our native engine allocates (bf16 cache) and, for hybrid models, the recurrent-state bytes
per sequence, computed by the same code the engine sizes its cache with
(`MoEModelConfig.kv_bytes_per_token`, `MoEModelConfig.state_bytes_per_sequence`). Run:

    .venv/bin/python scripts/model_families.py
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.config import MoEModelConfig  # noqa: E402
from models.family import PublishedConfig  # noqa: E402
from models.hf_config import from_hf_config  # noqa: E402
from models.registry import FAMILIES, family_for  # noqa: E402


def published() -> list[PublishedConfig]:
    return [p for fam in FAMILIES for p in fam.PUBLISHED]


def config_of(p: PublishedConfig) -> MoEModelConfig:
    return from_hf_config(family_for(p.architecture).hf_config_class(p.architecture)(**p.fields), p.architecture)


def attention_kind(cfg: MoEModelConfig) -> str:
    if cfg.hybrid and cfg.mamba is not None:
        m, n = cfg.mamba, cfg.num_layers
        mamba = sum(k == "mamba" for k in cfg.layer_kinds)
        attn = [i for i in range(n) if cfg.layer_kind(i) == "attention"]
        full = replace(cfg, layer_kinds=(), mamba=None, nope_layers=())
        rope = "NoPE" if not any(cfg.uses_rope(i) for i in attn) else "rotary"
        return (f"hybrid: Mamba2 on {mamba}/{n} layers ({m.num_heads} heads x {m.head_dim}, state {m.state_size}, "
                f"{m.n_groups} group{'s' if m.n_groups > 1 else ''}), {attention_kind(full)} ({rope}) on {len(attn)}")
    if cfg.hybrid and "kda" in cfg.layer_kinds:
        kda, n = cfg.kda, cfg.num_layers
        stateful = sum(k == "kda" for k in cfg.layer_kinds)
        full = replace(cfg, layer_kinds=(), kda=None)
        return (f"hybrid: Kimi Delta Attention on {stateful}/{n} layers ({kda.num_heads} heads x {kda.head_dim}), "
                f"{attention_kind(full)} on {n - stateful}")
    if cfg.hybrid:
        la, n = cfg.linear_attention, cfg.num_layers
        linear = sum(k == "linear" for k in cfg.layer_kinds)
        full = replace(cfg, layer_kinds=(), linear_attention=None)
        return (f"hybrid: Gated DeltaNet on {linear}/{n} layers ({la.num_k_heads}/{la.num_v_heads} heads x "
                f"{la.k_head_dim}/{la.v_head_dim}), gated {attention_kind(full)} on {n - linear}")
    if cfg.mla is not None:
        q = "q_lora" if cfg.mla.q_lora_rank else "no q_lora"
        if cfg.nope_layers and all(cfg.nope_layers):  # the "rope" key part is cached but never rotated
            mla = f"MLA (latent {cfg.mla.kv_lora_rank} + key part {cfg.mla.qk_rope_head_dim}, {q}), NoPE"
        else:
            mla = f"MLA (latent {cfg.mla.kv_lora_rank} + rope {cfg.mla.qk_rope_head_dim}, {q})"
        if cfg.dsa is not None:
            d = cfg.dsa
            shared = f", {sum(d.shared)} layers reuse the choice" if any(d.shared) else ""
            mla += (f", sparse: top-{d.topk} tokens by an indexer ({d.n_heads} heads x {d.head_dim}, index key "
                     f"cached){shared}")
        return mla
    parts = [f"GQA {cfg.num_heads}/{cfg.num_kv_heads}x{cfg.head_dim}"]
    n = cfg.num_layers
    windows = [w for w in cfg.sliding_windows if w]
    if windows:
        parts.append(f"sliding {windows[0]} on {len(windows)}/{n} layers")
    chunks = [c for c in cfg.attention_chunks if c]
    if chunks:
        parts.append(f"chunked {chunks[0]} on {len(chunks)}/{n}")
    if cfg.nope_layers:
        parts.append(f"NoPE {sum(cfg.nope_layers)}/{n}")
    if cfg.attention_sinks:
        parts.append("sinks")
    if cfg.rotary_dim:
        parts.append(f"rotary {cfg.rotary_dim}/{cfg.head_dim}")
    return ", ".join(parts)


def routing_kind(cfg: MoEModelConfig) -> str:
    r = cfg.router
    if r.scoring == "softmax_topk":
        parts = [f"top-{cfg.top_k}/{cfg.num_experts}, softmax over the top-k" + (" (router bias)" if r.bias else "")]
    else:
        parts = [f"{r.scoring} top-{cfg.top_k}/{cfg.num_experts}"
                 + (f" + {cfg.zero_experts} zero-computation" if cfg.zero_experts else "")]
    if r.correction_bias:
        parts.append("bias-corrected choice")
    if r.n_group > 1:
        parts.append(f"groups {r.topk_group}/{r.n_group}")
    if cfg.norm_topk_prob and r.scoring != "softmax_topk":
        parts.append("renormalised")
    if r.scaling_factor != 1.0:
        parts.append(f"x{r.scaling_factor:g}")
    if cfg.shared_expert_intermediate_size:
        parts.append("shared expert")
    dense = cfg.num_layers - cfg.num_moe_layers
    if cfg.moe_shortcut:
        parts.append(f"shortcut MoE over {cfg.num_moe_layers} pairs of attention + dense MLP sublayers")
    elif dense:
        parts.append(f"{dense} dense layer{'s' if dense > 1 else ''}")
    if cfg.expert_bias or cfg.swiglu_limit is not None:
        parts.append("biased clamped-SwiGLU experts")
    if cfg.expert_input_scaling:
        parts.append("weight scales expert input")
    return ", ".join(parts)


def rows() -> list[tuple[str, ...]]:
    out = []
    for p in published():
        cfg = config_of(p)
        status = "native" + (f"; {p.quantized} kept quantized" if p.quantized else "")
        out.append((p.family, f"`{p.architecture}`", p.checkpoint, attention_kind(cfg), routing_kind(cfg),
                    f"{cfg.kv_bytes_per_token(2):,}", f"{cfg.state_bytes_per_sequence(2):,}" if cfg.hybrid else "-",
                    status))
    return out


def table() -> str:
    head = ("Family", "Architecture", "Checkpoint (config)", "Attention", "Routing", "KV bytes/token (bf16)",
            "State bytes/sequence (bf16)", "Status")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows()]
    return "\n".join(lines)


def mla_note() -> str:
    """What MLA saves on DeepSeek-V3: the latent cache vs per-head K (nope + rope) and V."""
    cfg = config_of(next(p for p in published() if p.checkpoint == "DeepSeek-V3 / R1"))
    expanded = cfg.num_layers * cfg.num_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim) * 2
    return (f"DeepSeek-V3 caches {cfg.kv_bytes_per_token(2):,} bytes per token (bf16); per-head K and V "
            f"would take {expanded:,} ({expanded / cfg.kv_bytes_per_token(2):.0f}x).")


def report() -> str:
    return table() + "\n\n" + mla_note()


if __name__ == "__main__":
    print(report())
