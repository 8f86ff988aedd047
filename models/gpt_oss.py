"""gpt-oss (`GptOssForCausalLM`): attention sinks, sliding-window layers alternating with full
ones, q/k/v/o biases, YaRN; a router with a bias and a softmax over the top-k logits; experts
with biases and the clamped SwiGLU. Experts are stored stacked as `gate_up_proj [E, H, 2I]`
(gate and up columns interleaved) and `down_proj [E, I, H]` (or their MXFP4 `_blocks` /
`_scales`, which the loader dequantizes to those layouts). Ours: `w13 [E, 2I, H + 1]` (gate
rows, up rows, the bias as the last column) and `w2 [E, H, I + 1]`."""

from __future__ import annotations

from typing import Any

import torch

from models.config import MoEModelConfig, RouterConfig
from models.family import PublishedConfig, TinyConfig
from models.weight_map import WeightMap, decoder_map

ARCHITECTURES = ("GptOssForCausalLM",)
PUBLISHED = (
    PublishedConfig("gpt-oss", "gpt-oss-120b", "GptOssForCausalLM", dict(
        hidden_size=2880, num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
        intermediate_size=2880, num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
        vocab_size=201088, max_position_embeddings=131072, swiglu_limit=7.0,
        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                          original_max_position_embeddings=4096, truncate=False), rope_theta=150000.0),
        quantized="MXFP4 experts"),
)
TINY = (
    # sinks, sliding window 8 on even layers, YaRN, router bias, expert biases, clamped SwiGLU
    TinyConfig("gpt_oss", "GptOssForCausalLM", dict(
        intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8,
        swiglu_limit=0.5, rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0,
                                               original_max_position_embeddings=16, beta_fast=32.0, beta_slow=1.0,
                                               truncate=False)), engine="default"),
)


def hf_config_class(arch: str):
    import transformers

    return transformers.GptOssConfig


def config_fields(hf: Any, arch: str, num_layers: int) -> dict[str, Any]:
    bias = bool(getattr(hf, "attention_bias", True))
    inter = hf.intermediate_size
    return dict(
        qkv_bias=bias, o_bias=bias, attention_sinks=True,
        num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok, moe_intermediate_size=inter,
        dense_intermediate_size=inter, norm_topk_prob=True, router=RouterConfig(scoring="softmax_topk", bias=True),
        expert_bias=True, swiglu_limit=float(hf.swiglu_limit), swiglu_alpha=float(getattr(hf, "swiglu_alpha", 1.702)),
        sparse_layers=(True,) * num_layers,
    )


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """[..., 2I] with gate/up alternating -> [..., 2I] as gate half then up half."""
    return torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1)


def _gate_up(t: torch.Tensor) -> torch.Tensor:
    return _deinterleave(t).transpose(1, 2)  # [E, H, 2I] -> [E, 2I, H]


def _gate_up_rows(q):
    """`_gate_up` of an MXFP4 QTensor [E, 2I, H] (rows are gpt-oss's interleaved gate/up outputs)."""
    from models.quant.weights import permute_rows

    n = q.shape[-2]
    return permute_rows(q, torch.cat((torch.arange(0, n, 2), torch.arange(1, n, 2))))


def _down(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # [E, I, H] -> [E, H, I]


# the same transforms of a weight kept quantized (models/loader.plan_quantized): its rows are the
# output features already; gate/up's de-interleave is a row permutation
_gate_up.qtensor = _gate_up_rows  # type: ignore[attr-defined]
_gate_up.permutes_rows = True  # type: ignore[attr-defined]
_down.qtensor = lambda q: q  # type: ignore[attr-defined]


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    H, inter = cfg.hidden_size, cfg.moe_intermediate_size
    weights, bias = lambda n: (slice(None), slice(None), slice(0, n)), lambda n: (slice(None), slice(None), n)

    def moe(i: int, hf: str, ours: str) -> WeightMap:
        return {
            f"{hf}.router.weight": (f"{ours}.gate.weight", ()),
            f"{hf}.router.bias": (f"{ours}.gate.bias", ()),
            f"{hf}.experts.gate_up_proj": (f"{ours}.w13", weights(H), _gate_up),
            f"{hf}.experts.gate_up_proj_bias": (f"{ours}.w13", bias(H), _deinterleave),
            f"{hf}.experts.down_proj": (f"{ours}.w2", weights(inter), _down),
            f"{hf}.experts.down_proj_bias": (f"{ours}.w2", bias(inter)),
        }

    return decoder_map(cfg, moe)
