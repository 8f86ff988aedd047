"""Gated DeltaNet (Qwen3-Next, Qwen3.5): linear attention with a per-sequence recurrent state.

Instead of a KV cache that grows with the sequence, each sequence keeps, per layer, a fixed-size
state in a slot of the runner's state cache (`StateCache`: the last `conv_kernel - 1` inputs of
the short causal convolution, and a [v_heads, k_dim, v_dim] matrix S). A token t updates it
with the gated delta rule (q and k L2-normalised, q scaled by k_dim^-1/2):

    S <- exp(g_t) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t

with beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias). Decode steps apply it once per
sequence, batched over the step's sequences (their slots gathered and scattered back); prefill
chunks use the chunked form (`chunk_gated_delta_rule`, 64 tokens a chunk: the intra-chunk part
as triangular solves and matmuls, the state carried from chunk to chunk), starting from the
state the sequence's earlier chunks left, so chunked prefill needs no special case. The output
goes through an RMSNorm gated by silu(z), then the output projection.

Projections are kept fused in our order, `in_proj` rows = [q, k, v, z, b, a]; the checkpoints'
layouts (Qwen3-Next interleaves them per key-head group) are mapped at load (models/qwen3_next.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import LinearAttentionConfig
from models.layers.paged import AttentionMetadata
from models.layers.state_conv import conv_decode, conv_prefill, decode_rows, prefill_chunks

StateCache = tuple[torch.Tensor, torch.Tensor]  # conv [slots, conv_dim, K - 1], recurrent [slots, Hv, dk, dv]
CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_gated_delta_rule(q, k, v, g, beta, state: torch.Tensor | None, chunk: int = CHUNK):
    """One sequence, float32: q, k [T, H, dk] (normalised and scaled), v [T, H, dv], g, beta [T, H],
    state [H, dk, dv] or None (zeros) -> (out [T, H, dv], final state [H, dk, dv])."""
    T, H, dk = k.shape
    dv = v.shape[-1]
    pad = (chunk - T % chunk) % chunk
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(0, 1) for x in (q, k, v))  # [H, T', d]
    g, beta = (F.pad(x, (0, 0, 0, pad)).transpose(0, 1) for x in (g, beta))  # [H, T']
    n = (T + pad) // chunk
    q, k, v = (x.reshape(H, n, chunk, -1) for x in (q, k, v))  # [H, n, C, d]
    g, beta = g.reshape(H, n, chunk), beta.reshape(H, n, chunk)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    cum = g.cumsum(-1)  # [H, n, C] log decay from the chunk's start
    above = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(above, float("-inf")).exp()  # [H, n, C, C]
    system = (k_beta @ k.transpose(-1, -2)) * decay  # strictly lower part: the chunk's own updates
    # (I + strictly_lower(system)) u = v_beta: every token's correction after the earlier ones'
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)  # [H, n, C, dv]
    w = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay  # [H, n, C, C] intra-chunk attention
    q = q * cum.exp()[..., None]
    k = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [H, n, 1, 1]
    S = q.new_zeros(H, dk, dv) if state is None else state.to(torch.float32)
    out = torch.empty_like(u)
    for i in range(n):  # the scan over chunks (a sequence's chunks depend on each other)
        v_new = u[:, i] - w[:, i] @ S  # [H, C, dv]
        out[:, i] = q[:, i] @ S + attn[:, i] @ v_new
        S = S * chunk_decay[:, i] + k[:, i].transpose(-1, -2) @ v_new
    return out.reshape(H, n * chunk, dv)[:, :T].transpose(0, 1), S


def recurrent_gated_delta_step(q, k, v, g, beta, state: torch.Tensor):
    """One token for each of B sequences, float32: q, k [B, H, dk], v [B, H, dv], g, beta [B, H],
    state [B, H, dk, dv] -> (out [B, H, dv], new state)."""
    S = state * g.exp()[..., None, None]
    kv = (k[..., None, :] @ S).squeeze(-2)  # [B, H, dv] what S recalls for k
    S = S + k[..., :, None] @ ((v - kv) * beta[..., None])[..., None, :]  # rank-1 update
    return (q[..., None, :] @ S).squeeze(-2), S


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        la: LinearAttentionConfig = cfg.linear_attention
        self.layer_idx = layer_idx
        self.la = la
        self.eps = cfg.rms_norm_eps
        H = cfg.hidden_size
        self.in_proj = nn.Linear(H, la.conv_dim + la.value_dim + 2 * la.num_v_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(la.conv_dim, la.conv_kernel))  # depthwise, causal
        self.dt_bias = nn.Parameter(torch.empty(la.num_v_heads))
        self.A_log = nn.Parameter(torch.empty(la.num_v_heads))
        self.norm_weight = nn.Parameter(torch.empty(la.v_head_dim))  # the gated RMSNorm over each head
        self.out_proj = nn.Linear(la.value_dim, H, bias=False)
        self.decode_kernel = None  # the plan's (apply_kernels): this layer has one PyTorch path

    def apply_kernels(self, kernels, packed_qkv=None, packed_o=None) -> None:
        self.decode_kernel = kernels.attention

    def state_shapes(self, num_slots: int):
        """The state tensors, ((shape, dtype), ...): the convolution window in the model dtype
        (None), the recurrent matrix in float32."""
        la = self.la
        return (((num_slots, la.conv_dim, la.conv_kernel - 1), None),
                ((num_slots, la.num_v_heads, la.k_head_dim, la.v_head_dim), torch.float32))

    def _split(self, x: torch.Tensor):
        """x [T, hidden] -> (mixed q|k|v [T, conv_dim], z [T, Hv, dv], beta, g [T, Hv] float32)."""
        la = self.la
        mixed, z, b, a = self.in_proj(x).split([la.conv_dim, la.value_dim, la.num_v_heads, la.num_v_heads], dim=-1)
        beta = b.sigmoid().float()  # in the model dtype first, as the reference
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        return mixed, z.reshape(-1, la.num_v_heads, la.v_head_dim), beta, g

    def _heads(self, mixed: torch.Tensor):
        """Convolved q|k|v [T, conv_dim] -> q, k [T, Hv, dk] (normalised, q scaled, shared by each
        key head's group of value heads) and v [T, Hv, dv], float32."""
        la = self.la
        q, k, v = mixed.float().split([la.key_dim, la.key_dim, la.value_dim], dim=-1)
        group = la.num_v_heads // la.num_k_heads
        q = l2norm(q.reshape(-1, la.num_k_heads, la.k_head_dim)) * la.k_head_dim**-0.5
        k = l2norm(k.reshape(-1, la.num_k_heads, la.k_head_dim))
        if group > 1:
            q, k = q.repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)
        return q, k, v.reshape(-1, la.num_v_heads, la.v_head_dim)

    def _gated_norm(self, o: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """RMSNorm over each head's output, times silu(z): [T, Hv, dv] -> [T, value_dim]."""
        of = o.float()
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.norm_weight * of.to(dtype)
        return (out * F.silu(z.float())).to(dtype).reshape(o.shape[0], -1)

    def forward(self, x: torch.Tensor, cos_sin, meta: AttentionMetadata, cache: StateCache,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[0]
        conv_cache, rec_cache = cache
        mixed, z, beta, g = self._split(x)
        out = x.new_empty(T, self.la.num_v_heads, self.la.v_head_dim)
        nd = meta.num_decodes
        if nd:
            slots, fresh = decode_rows(meta)
            q, k, v = self._heads(F.silu(conv_decode(conv_cache, slots, fresh, mixed[:nd], self.conv_weight)).to(x.dtype))
            state = rec_cache[slots].masked_fill(fresh[..., None], 0)
            o, state = recurrent_gated_delta_step(q, k, v, g[:nd], beta[:nd], state)
            rec_cache.index_copy_(0, slots, state)
            out[:nd] = o.to(x.dtype)
        for s, e, slot, carried in prefill_chunks(meta):  # each from its sequence's state so far
            conv = conv_prefill(conv_cache, slot, carried, mixed[s:e], self.conv_weight)
            q, k, v = self._heads(F.silu(conv).to(x.dtype))  # [n, ...]
            o, state = chunk_gated_delta_rule(q, k, v, g[s:e], beta[s:e], rec_cache[slot] if carried else None)
            rec_cache[slot] = state
            out[s:e] = o.to(x.dtype)
        return self.out_proj(self._gated_norm(out, z, x.dtype))
