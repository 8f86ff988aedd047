"""Random-weight tiny checkpoints of every supported family, made with transformers.

Each family's tiny config switches on the variants that family brings (MLA with and without
q_lora, group-limited routing, sinks with a sliding window, NoPE / chunked layers, partial
rotary, multipliers, ...). Biases and router correction biases, which transformers initialises
to zero, are randomised so that the tests see them.
"""

from __future__ import annotations

import pytest
import torch
import transformers

TINY = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.08)
MLA = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, moe_intermediate_size=32,
           intermediate_size=96, n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
           n_shared_experts=1, num_key_value_heads=4)

FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)),
    "mixtral-top1": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                     dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=1)),
    "mixtral-sliding": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                        dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2, sliding_window=8)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(intermediate_size=128, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True, head_dim=32, decoder_sparse_step=1, mlp_only_layers=[0])),
    "qwen3_moe-sliding": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                          dict(intermediate_size=128, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                               norm_topk_prob=True, use_sliding_window=True, sliding_window=8)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=8.0)),
    # MLA without q_lora, group-limited greedy softmax routing, routed scaling, a dense first layer
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                    dict(MLA, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                         routed_scaling_factor=1.5, norm_topk_prob=False)),
    # MLA with q_lora, sigmoid + correction bias, noaux_tc group top-k, YaRN with mscale
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    dict(MLA, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                              original_max_position_embeddings=128, beta_fast=32.0, beta_slow=1.0,
                                              mscale=1.0, mscale_all_dim=1.0))),
    "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM,
                 dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                      first_k_dense_replace=1, n_shared_experts=1, head_dim=16, use_qk_norm=True,
                      attention_bias=True, n_group=2, topk_group=1, routed_scaling_factor=1.5)),
    # sinks, sliding window 8 on even layers, YaRN, router bias, expert biases, clamped SwiGLU
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM,
                dict(intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8,
                     swiglu_limit=0.5, rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0,
                                                            original_max_position_embeddings=16, beta_fast=32.0,
                                                            beta_slow=1.0, truncate=False))),
    # MoE on odd layers, NoPE odd layers with temperature tuning, chunked attention (8) elsewhere
    "llama4": (transformers.Llama4TextConfig, transformers.Llama4ForCausalLM,
               dict(num_hidden_layers=4, intermediate_size=32, intermediate_size_mlp=48, num_local_experts=4,
                    num_experts_per_tok=1, head_dim=16, interleave_moe_layer_step=2, no_rope_layer_interval=2,
                    attention_chunk_size=8, floor_scale=4, attn_scale=0.1)),
    "granitemoe": (transformers.GraniteMoeConfig, transformers.GraniteMoeForCausalLM,
                   dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, embedding_multiplier=2.0,
                        residual_multiplier=0.5, attention_multiplier=0.2, logits_scaling=2.0)),
    "granitemoeshared": (transformers.GraniteMoeSharedConfig, transformers.GraniteMoeSharedForCausalLM,
                         dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2,
                              shared_intermediate_size=48, embedding_multiplier=2.0, residual_multiplier=0.5,
                              attention_multiplier=0.2, logits_scaling=2.0)),
    "ernie4_5_moe": (transformers.Ernie4_5_MoeConfig, transformers.Ernie4_5_MoeForCausalLM,
                     dict(intermediate_size=96, moe_intermediate_size=32, moe_num_experts=8, moe_k=2,
                          moe_num_shared_experts=1, moe_layer_start_index=1, use_bias=True, bos_token_id=1,
                          eos_token_id=2, pad_token_id=0)),
    "minimax_m2": (transformers.MiniMaxM2Config, transformers.MiniMaxM2ForCausalLM,
                   dict(intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
                        rotary_dim=8, bos_token_id=1, eos_token_id=2)),
}


@torch.no_grad()
def randomize_biases(model: torch.nn.Module, std: float = 0.1) -> None:
    """Biases and router correction biases start at zero in transformers: give them values."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.endswith(("bias", "_bias")) and t.is_floating_point():
            t.normal_(0.0, std)


def make_checkpoint(family: str, path, dtype=torch.float32, shard: bool = False, seed: int = 0, **overrides):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**TINY, **extra, **overrides})
    model = model_cls(cfg).eval()
    randomize_biases(model)
    model = model.to(dtype)
    kwargs = {"max_shard_size": "100KB"} if shard else {}
    model.save_pretrained(str(path), **kwargs)
    return model


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """family -> (path, transformers reference model in float32)."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            path = tmp_path_factory.mktemp(family)
            ref = make_checkpoint(family, path, shard=(family == "qwen3_moe"))
            cache[family] = (str(path), ref)
        return cache[family]

    return get
