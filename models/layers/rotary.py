"""Rotary position embeddings (neox / "rotate half" layout, as Mixtral, Qwen-MoE and OLMoE use).

Default, linear, llama3 and yarn settings: the inverse frequencies for non-default types come
from `transformers`' rope initialisers so that they match the reference exactly.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None, hf_config=None):
        super().__init__()
        self.head_dim, self.theta, self.scaling, self.hf_config = head_dim, theta, scaling, hf_config
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)  # [head_dim / 2]
        self.attention_scaling = 1.0
        if not self.inv_freq.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)compute the frequencies in float32, e.g. after the module was built on `meta`."""
        d = self.head_dim
        if self.scaling is None:
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
            attention_scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            rope_type = self.scaling.get("rope_type", self.scaling.get("type"))
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, "cpu")
        self.inv_freq = inv_freq.float().to(self.inv_freq.device)
        self.attention_scaling = float(attention_scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens] -> cos, sin: [num_tokens, 1, head_dim]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        cos = (emb.cos() * self.attention_scaling).to(dtype)[:, None, :]
        sin = (emb.sin() * self.attention_scaling).to(dtype)[:, None, :]
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, heads, head_dim]; cos/sin: [T, 1, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
