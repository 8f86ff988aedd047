#!/usr/bin/env python
"""Print the README's supported-families table: for one real checkpoint per family, the
attention kind, the routing kind and the KV-cache bytes per token our native engine allocates
(bf16 cache), computed by the same code the engine sizes its cache with
(`MoEModelConfig.kv_bytes_per_token`).

The config values below are copied from each checkpoint's published `config.json` (only the
fields that matter here; transformers' defaults fill the rest). Run:

    .venv/bin/python scripts/model_families.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.config import MoEModelConfig  # noqa: E402
from models.registry import family_module  # noqa: E402

YARN_DS = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
               mscale=1.0, mscale_all_dim=1.0)
CHECKPOINTS: list[tuple[str, str, str, dict]] = [
    ("Mixtral", "Mixtral-8x7B", "MixtralForCausalLM", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=32768, rope_theta=1e6, sliding_window=None)),
    ("Qwen2-MoE", "Qwen1.5-MoE-A2.7B", "Qwen2MoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
        num_experts_per_tok=4, vocab_size=151936, max_position_embeddings=8192)),
    ("Qwen3-MoE", "Qwen3-30B-A3B", "Qwen3MoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6)),
    ("OLMoE", "OLMoE-1B-7B-0924", "OlmoeForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=1024, num_experts=64, num_experts_per_tok=8, vocab_size=50304,
        max_position_embeddings=4096)),
    ("DeepSeek-V2", "DeepSeek-V2-Lite", "DeepseekV2ForCausalLM", dict(
        hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, vocab_size=102400, max_position_embeddings=163840,
        rope_scaling=dict(YARN_DS, mscale=0.707, mscale_all_dim=0.707))),
    ("DeepSeek-V3", "DeepSeek-V3 / R1", "DeepseekV3ForCausalLM", dict(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        norm_topk_prob=True, vocab_size=129280, max_position_embeddings=163840, rope_scaling=YARN_DS)),
    ("DeepSeek-V3", "Kimi K2", "DeepseekV3ForCausalLM", dict(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=64, num_key_value_heads=64,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=384, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=1, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, n_group=1, topk_group=1, routed_scaling_factor=2.827,
        norm_topk_prob=True, vocab_size=163840, max_position_embeddings=131072,
        rope_scaling=dict(YARN_DS, factor=32.0))),
    ("GLM-4.5 MoE", "GLM-4.5", "Glm4MoeForCausalLM", dict(
        hidden_size=5120, num_hidden_layers=92, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
        intermediate_size=12288, moe_intermediate_size=1536, n_routed_experts=160, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=3, n_group=1, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5,
        vocab_size=151552, max_position_embeddings=131072, rope_theta=1e6)),
    ("gpt-oss", "gpt-oss-120b", "GptOssForCausalLM", dict(
        hidden_size=2880, num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
        intermediate_size=2880, num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
        vocab_size=201088, max_position_embeddings=131072, swiglu_limit=7.0,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                          original_max_position_embeddings=4096, truncate=False), rope_theta=150000.0)),
    ("Llama 4", "Llama-4-Scout-17B-16E (text)", "Llama4ForCausalLM", dict(
        hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
        intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=16, num_experts_per_tok=1,
        interleave_moe_layer_step=1, attention_chunk_size=8192, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=8192, attn_scale=0.1, vocab_size=202048, max_position_embeddings=10485760, rope_theta=5e5,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192))),
    ("Granite MoE (+ Shared)", "granite-3.0-1b-a400m", "GraniteMoeForCausalLM", dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
        intermediate_size=512, num_local_experts=32, num_experts_per_tok=8, embedding_multiplier=12.0,
        attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=6.0, vocab_size=49155,
        max_position_embeddings=4096, tie_word_embeddings=True)),
    ("ERNIE 4.5 MoE", "ERNIE-4.5-21B-A3B", "Ernie4_5_MoeForCausalLM", dict(
        hidden_size=2560, num_hidden_layers=28, num_attention_heads=20, num_key_value_heads=4,
        intermediate_size=12288, moe_intermediate_size=1536, moe_num_experts=64, moe_k=6, moe_num_shared_experts=2,
        moe_layer_start_index=1, moe_layer_end_index=27, vocab_size=103424, max_position_embeddings=131072,
        rope_theta=5e5)),
    ("MiniMax-M2", "MiniMax-M2", "MiniMaxM2ForCausalLM", dict(
        hidden_size=3072, num_hidden_layers=62, num_attention_heads=48, num_key_value_heads=8, head_dim=128,
        intermediate_size=1536, num_local_experts=256, num_experts_per_tok=8, rotary_dim=64,
        vocab_size=200064, max_position_embeddings=196608, rope_theta=5e6)),
]


def attention_kind(cfg: MoEModelConfig) -> str:
    if cfg.mla is not None:
        q = "q_lora" if cfg.mla.q_lora_rank else "no q_lora"
        return f"MLA (latent {cfg.mla.kv_lora_rank} + rope {cfg.mla.qk_rope_head_dim}, {q})"
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
        parts = [f"{r.scoring} top-{cfg.top_k}/{cfg.num_experts}"]
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
    if dense:
        parts.append(f"{dense} dense layer{'s' if dense > 1 else ''}")
    if cfg.expert_bias or cfg.swiglu_limit is not None:
        parts.append("biased clamped-SwiGLU experts")
    if cfg.expert_input_scaling:
        parts.append("weight scales expert input")
    return ", ".join(parts)


# every family: fp32 logits / router choices / greedy tokens equal transformers' on tiny random
# configs (tests/models/test_parity.py) and runs through the engine (tests/engine)
QUANT = {"DeepSeek-V3 / R1": "FP8 block", "Kimi K2": "FP8 block", "Qwen3-30B-A3B": "FP8 block releases",
         "gpt-oss-120b": "MXFP4 experts"}


def rows() -> list[tuple[str, ...]]:
    out = []
    for family, checkpoint, arch, fields in CHECKPOINTS:
        hf = family_module(arch).hf_config_class(arch)(**fields)
        cfg = MoEModelConfig.from_hf_config(hf, arch)
        status = "native" + (f"; {QUANT[checkpoint]} dequantized at load" if checkpoint in QUANT else "")
        out.append((family, f"`{arch}`", checkpoint, attention_kind(cfg), routing_kind(cfg),
                    f"{cfg.kv_bytes_per_token(2):,}", status))
    return out


def table() -> str:
    head = ("Family", "Architecture", "Checkpoint (config)", "Attention", "Routing", "KV bytes/token (bf16)",
            "Status")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows()]
    return "\n".join(lines)


def mla_note() -> str:
    """What MLA saves on DeepSeek-V3: the latent cache vs per-head K (nope + rope) and V."""
    arch, fields = next((a, f) for _, c, a, f in CHECKPOINTS if c == "DeepSeek-V3 / R1")
    cfg = MoEModelConfig.from_hf_config(family_module(arch).hf_config_class(arch)(**fields), arch)
    expanded = cfg.num_layers * cfg.num_heads * (cfg.mla.qk_head_dim + cfg.mla.v_head_dim) * 2
    return (f"DeepSeek-V3 caches {cfg.kv_bytes_per_token(2):,} bytes per token (bf16); per-head K and V "
            f"would take {expanded:,} ({expanded / cfg.kv_bytes_per_token(2):.0f}x).")


def report() -> str:
    return table() + "\n\n" + mla_note()


if __name__ == "__main__":
    print(report())
