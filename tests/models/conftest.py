"""Random-weight tiny checkpoints of every supported family, made with transformers."""

from __future__ import annotations

import pytest
import torch
import transformers

TINY = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, initializer_range=0.08)

FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2)),
    "mixtral-top1": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                     dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=1)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                       num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(intermediate_size=128, moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                       norm_topk_prob=True, head_dim=32, decoder_sparse_step=1, mlp_only_layers=[0])),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(intermediate_size=48, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=8.0)),
}


def make_checkpoint(family: str, path, dtype=torch.float32, shard: bool = False, seed: int = 0, **overrides):
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(**{**TINY, **extra, **overrides})
    model = model_cls(cfg).eval().to(dtype)
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
