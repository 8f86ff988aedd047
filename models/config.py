"""One model config for every supported MoE family, read from a Hugging Face checkpoint.

`MoEModelConfig.from_hf(path)` reads `config.json`, fills defaults from the matching
`transformers` config class (so a checkpoint that omits a field gets the same value
`transformers` would use), and refuses architectures or options we do not implement,
naming them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_ARCHITECTURES = (
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or one of its options is not implemented."""


@dataclass(frozen=True)
class MoEModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # non-default rope settings (type, factor, ...)
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on q/k/v projections
    o_bias: bool  # bias on the output projection
    qk_norm: str | None  # None | "head" (per head, Qwen3) | "full" (whole projection, OLMoE)
    clip_qkv: float | None
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    shared_expert_intermediate_size: int  # 0: no shared expert
    shared_expert_gate: bool  # sigmoid gate on the shared expert (Qwen2-MoE)
    dense_intermediate_size: int  # for non-MoE layers (mlp_only_layers)
    sparse_layers: tuple[bool, ...]  # per layer: MoE block (True) or dense MLP (False)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_moe_layers(self) -> int:
        return sum(self.sparse_layers)

    @classmethod
    def from_hf(cls, path: str) -> "MoEModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json in {path!r}")
        with open(cfg_path) as f:
            raw = json.load(f)
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or raw.get('model_type')!r} in {cfg_path}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        from transformers import AutoConfig

        try:
            hf = AutoConfig.from_pretrained(path)
        except Exception as exc:  # invalid or unknown fields: say which checkpoint
            raise UnsupportedModelError(f"cannot read {cfg_path}: {exc}") from exc
        return cls.from_hf_config(hf, arch, raw)

    @classmethod
    def from_hf_config(cls, hf: Any, arch: str, raw: dict[str, Any] | None = None) -> "MoEModelConfig":
        raw = raw if raw is not None else hf.to_dict()
        get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731

        act = get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (only silu)")

        num_heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // num_heads
        num_layers = get("num_hidden_layers")

        rope_theta, rope_scaling = _rope(hf)
        window = _effective_sliding_window(hf, arch)
        if window is not None:
            raise UnsupportedModelError(f"sliding_window={window} is not supported (sliding-window attention)")

        if arch == "MixtralForCausalLM":
            num_experts = get("num_local_experts")
            moe_inter = get("intermediate_size")
            norm_topk, qkv_bias, qk_norm = True, False, None
            shared, dense_inter = 0, moe_inter
            sparse = (True,) * num_layers
        else:
            num_experts = get("num_experts")
            moe_inter = get("moe_intermediate_size") if arch != "OlmoeForCausalLM" else get("intermediate_size")
            norm_topk = bool(get("norm_topk_prob", False))
            dense_inter = get("intermediate_size")
            if arch == "Qwen2MoeForCausalLM":
                qkv_bias, qk_norm = bool(get("qkv_bias", True)), None
                shared = get("shared_expert_intermediate_size") or 0
            elif arch == "Qwen3MoeForCausalLM":
                qkv_bias, qk_norm, shared = bool(get("attention_bias", False)), "head", 0
            else:  # OLMoE
                qkv_bias, qk_norm, shared = bool(get("attention_bias", False)), "full", 0
            step = get("decoder_sparse_step", 1) or 1
            dense_only = set(get("mlp_only_layers", []) or [])
            sparse = tuple(
                (i not in dense_only) and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
            )
        top_k = get("num_experts_per_tok")
        if not num_experts or not top_k or top_k > num_experts:
            raise UnsupportedModelError(f"invalid MoE settings: num_experts={num_experts}, top_k={top_k}")
        o_bias = bool(get("attention_bias", False)) if arch in ("Qwen3MoeForCausalLM", "OlmoeForCausalLM") else False

        eos = get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        return cls(
            architecture=arch,
            vocab_size=get("vocab_size"),
            hidden_size=get("hidden_size"),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            max_position_embeddings=get("max_position_embeddings", 4096),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=qk_norm,
            clip_qkv=get("clip_qkv"),
            num_experts=num_experts,
            top_k=top_k,
            moe_intermediate_size=moe_inter,
            norm_topk_prob=norm_topk,
            shared_expert_intermediate_size=shared,
            shared_expert_gate=shared > 0,
            dense_intermediate_size=dense_inter,
            sparse_layers=sparse,
            bos_token_id=get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(dtype).replace("torch.", ""),
            extra={"hf_config": hf},
        )


def _rope(hf: Any) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either the transformers-5 `rope_parameters` or the older fields."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rope_type = params.get("rope_type", params.get("type", "default"))
        scaling = None if rope_type == "default" else dict(params)
    else:
        theta = getattr(hf, "rope_theta", 10000.0)
        scaling = getattr(hf, "rope_scaling", None)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        scaling = None if rope_type == "default" else dict(scaling)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return float(theta), scaling


def _effective_sliding_window(hf: Any, arch: str) -> int | None:
    window = getattr(hf, "sliding_window", None)
    if window is None:
        return None
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM") and not getattr(hf, "use_sliding_window", False):
        return None
    if window >= getattr(hf, "max_position_embeddings", 0):
        return None  # never narrower than the context: plain causal attention
    return int(window)
