"""Rotary position embeddings.

Two layouts: neox ("rotate half": dimension i pairs with i + d/2; Mixtral, Qwen, GLM, gpt-oss)
and interleaved (dimension 2i pairs with 2i + 1; DeepSeek, Llama 4, ERNIE). Partial rotary
(GLM-4.5, MiniMax-M2) rotates the first `rotary_dim` dimensions of each head and passes the
rest through. Default, NTK-alpha (HunYuan), linear, llama3 and yarn settings: the inverse frequencies for
non-default types come from `transformers`' rope initialisers so that they match the
reference exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import rope_type_of


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
        rope_type = None if self.scaling is None else rope_type_of(self.scaling)
        if rope_type in (None, "ntk_alpha"):  # ntk_alpha (HunYuan): a larger base, fixed
            base = self.theta if rope_type is None else self.theta * self.scaling["alpha"] ** (d / (d - 2))
            inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
            attention_scaling = 1.0
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

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


def apply_rotary_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairs (2i, 2i + 1) rotate by frequency i. The result is laid out de-interleaved (all first
    members, then all second members): applied to both q and k, dot products are unchanged.
    x: [T, heads, d]; cos/sin: [T, 1, d] (cat(freqs, freqs) as `cos_sin` returns)."""
    half = x.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]  # [T, 1, d/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [T, heads, d/2]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "neox") -> torch.Tensor:
    """Rotary on the first cos.shape[-1] dims of every head of x [T, heads, head_dim]; the rest
    (partial rotary) passes through."""
    rot = cos.shape[-1]
    fn = apply_rotary if style == "neox" else apply_rotary_interleaved
    if rot == x.shape[-1]:
        return fn(x, cos, sin)
    return torch.cat((fn(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
