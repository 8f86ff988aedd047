"""The shortcut-connected MoE sublayer of LongCat-Flash (`moe_shortcut`).

A LongCat-Flash decoder layer is two of our layers (sublayers), each attention (MLA) then a
dense SwiGLU MLP; the first one's MoE block reads the same post-attention norm as its dense MLP
and its output joins the residual stream at the end of the second one:

    x = x + attn_0(norm(x));  h = norm(x);  s = moe(h);  x = x + mlp_0(h)
    x = x + attn_1(norm(x));  h = norm(x);               x = x + mlp_1(h) + s

so the MoE block overlaps a whole attention + MLP sublayer. Each sublayer owns one KV cache
like any other layer; `MoEForCausalLM.forward` carries `s` from one layer to the next.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers.attention import Attention
from models.layers.mla import MLAttention
from models.layers.moe import DenseMLP, MoEBlock
from models.layers.norm import RMSNorm


class ShortcutDecoderLayer(nn.Module):
    def __init__(self, cfg, idx: int, rotary):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = (MLAttention if cfg.mla is not None else Attention)(cfg, idx, rotary)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size, bias=cfg.mlp_bias)
        self.is_moe = cfg.sparse_layers[idx]
        if self.is_moe:
            self.moe = MoEBlock(cfg, idx)
        self.fused_norms = False  # the plan may set it; this layer always runs the plain norms

    def forward(self, x, cos_sin, meta, cache, capture, positions=None,
                shortcut: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> (hidden, the MoE output to add at the end of the next layer, or None)."""
        x = x + self.attn(self.input_norm(x), cos_sin, meta, cache, positions)
        h = self.post_attn_norm(x)
        out = self.moe(h, capture) if self.is_moe else None
        x = x + self.mlp(h)
        if shortcut is not None:
            x = x + shortcut
        return x, out
