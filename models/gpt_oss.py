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
from models.loader import WeightMap, common_entries


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


def weight_map(cfg: MoEModelConfig) -> WeightMap:
    out = common_entries(cfg)
    H, inter = cfg.hidden_size, cfg.moe_intermediate_size
    weights, bias = lambda n: (slice(None), slice(None), slice(0, n)), lambda n: (slice(None), slice(None), n)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.mlp", f"layers.{i}.moe"
        out[f"{hf}.router.weight"] = (f"{ours}.gate.weight", ())
        out[f"{hf}.router.bias"] = (f"{ours}.gate.bias", ())
        out[f"{hf}.experts.gate_up_proj"] = (f"{ours}.w13", weights(H), _gate_up)
        out[f"{hf}.experts.gate_up_proj_bias"] = (f"{ours}.w13", bias(H), _deinterleave)
        out[f"{hf}.experts.down_proj"] = (f"{ours}.w2", weights(inter), lambda t: t.transpose(1, 2))
        out[f"{hf}.experts.down_proj_bias"] = (f"{ours}.w2", bias(inter))
    return out
