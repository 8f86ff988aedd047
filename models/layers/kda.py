"""Kimi Delta Attention (Kimi Linear): linear attention with a per-channel gated delta rule.

KDA is Gated DeltaNet (`models/layers/linear_attention.py`) with a finer forget gate: the decay
is a vector over the key channels of each head instead of one scalar per head. Each sequence
keeps, per layer, a fixed-size state in a slot of the runner's state cache: the last
`conv_kernel - 1` inputs of the short causal convolution over q, k and v, and a
[heads, head_dim, head_dim] matrix S. A token t updates it with (q and k L2-normalised, q scaled
by head_dim^-1/2, g_t a vector over the key channels):

    S <- diag(exp(g_t)) S;  S <- S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T q_t

with beta = sigmoid(b_proj x), g = -exp(A_log[head]) * softplus(f_b(f_a x) + dt_bias). Decode steps
apply it once per sequence, batched over the step's sequences (their slots gathered and
scattered back); prefill chunks use the chunked form (`chunk_kda`, 64 tokens a chunk, the
intra-chunk part as triangular solves over per-channel decays, the state carried from chunk to
chunk) from the state the sequence's earlier chunks left, so chunked prefill needs no special
case. The output goes through an RMSNorm gated by sigmoid(g_b(g_a x)), then the output projection.

Projections of x are fused in our order, `in_proj` rows = [q, k, v, b, f_a, g_a]; the three
convolutions (q_conv1d, k_conv1d, v_conv1d) are one depthwise convolution over [q | k | v]
(models/kimi_linear.py maps the checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import KDAConfig
from models.layers.paged import AttentionMetadata
from models.layers.state_conv import conv_decode, conv_prefill, decode_rows, prefill_chunks

StateCache = tuple[torch.Tensor, torch.Tensor]  # conv [slots, 3 * H * d, K - 1], recurrent [slots, H, d, d]
CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def chunk_kda(q, k, v, g, beta, state: torch.Tensor | None, chunk: int = CHUNK):
    """One sequence, float32: q, k [T, H, dk] (normalised and scaled), v [T, H, dv], g [T, H, dk]
    (log decay per key channel), beta [T, H], state [H, dk, dv] or None (zeros) ->
    (out [T, H, dv], final state [H, dk, dv])."""
    T, H, dk = k.shape
    dv = v.shape[-1]
    pad = (chunk - T % chunk) % chunk
    q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(0, 1) for x in (q, k, v, g))  # [H, T', d]
    beta = F.pad(beta, (0, 0, 0, pad)).transpose(0, 1)  # [H, T']
    n = (T + pad) // chunk
    q, k, v, g = (x.reshape(H, n, chunk, -1) for x in (q, k, v, g))  # [H, n, C, d]
    beta = beta.reshape(H, n, chunk, 1)
    k_beta, v_beta = k * beta, v * beta
    cum = g.cumsum(-2)  # [H, n, C, dk] log decay from the chunk's start, per channel
    above = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)[..., None]  # [C, C, 1]
    S = q.new_zeros(H, dk, dv) if state is None else state.to(torch.float32)
    out = q.new_empty(H, n, chunk, dv)
    for i in range(n):  # a chunk at a time: its [H, C, C, dk] decays are the largest tensor
        c, ki, qi, kbi = cum[:, i], k[:, i], q[:, i], k_beta[:, i]
        # decay[t, s] = exp(cum_t - cum_s) per channel for s <= t (0 above the diagonal)
        decay = (c[:, :, None, :] - c[:, None, :, :]).masked_fill(above, float("-inf")).exp()  # [H, C, C, dk]
        decayed_k = decay * ki[:, None, :, :]  # [t, s]: k_s decayed from s to t
        system = (decayed_k @ kbi[..., None]).squeeze(-1)  # [H, C, C]: k_beta_t . decayed k_s
        attn = (decayed_k @ qi[..., None]).squeeze(-1)  # [H, C, C]: q_t . decayed k_s (s <= t)
        # (I + strictly_lower(system)) u = v_beta: every token's correction after the earlier ones'
        u = torch.linalg.solve_triangular(system, v_beta[:, i], upper=False, unitriangular=True)  # [H, C, dv]
        w = torch.linalg.solve_triangular(system, kbi * c.exp(), upper=False, unitriangular=True)  # [H, C, dk]
        v_new = u - w @ S
        out[:, i] = (qi * c.exp()) @ S + attn @ v_new
        last = c[:, -1:]  # [H, 1, dk]
        S = S * last.transpose(-1, -2).exp() + (ki * (last - c).exp()).transpose(-1, -2) @ v_new
    return out.reshape(H, n * chunk, dv)[:, :T].transpose(0, 1), S


def recurrent_kda_step(q, k, v, g, beta, state: torch.Tensor):
    """One token for each of B sequences, float32: q, k [B, H, dk], v [B, H, dv], g [B, H, dk],
    beta [B, H], state [B, H, dk, dv] -> (out [B, H, dv], new state)."""
    S = state * g.exp()[..., None]
    kv = (k[..., None, :] @ S).squeeze(-2)  # [B, H, dv] what S recalls for k
    S = S + k[..., :, None] @ ((v - kv) * beta[..., None])[..., None, :]  # rank-1 update
    return (q[..., None, :] @ S).squeeze(-2), S


class Float32Bias(nn.Module):
    """A bias the reference keeps in float32 in any model dtype (Kimi Linear's `dt_bias`)."""

    def __init__(self, n: int):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(n))
        self.keep_fp32 = True  # MoEForCausalLM.restore_fp32_modules


class KimiDeltaAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        kda: KDAConfig = cfg.kda
        self.layer_idx = layer_idx
        self.kda = kda
        self.eps = cfg.rms_norm_eps
        H, d = kda.num_heads, kda.head_dim
        self.in_proj = nn.Linear(cfg.hidden_size, kda.conv_dim + H + 2 * d, bias=False)  # [q, k, v, b, f_a, g_a]
        self.conv_weight = nn.Parameter(torch.empty(kda.conv_dim, kda.conv_kernel))  # depthwise, causal
        self.f_b_proj = nn.Linear(d, kda.key_dim, bias=False)  # the forget gate's low-rank second half
        self.g_b_proj = nn.Linear(d, kda.key_dim, bias=False)  # the output gate's
        self.dt = Float32Bias(kda.key_dim)  # dt_bias, float32 as the reference keeps it
        self.A_log = nn.Parameter(torch.empty(H))
        self.norm_weight = nn.Parameter(torch.empty(d))  # the gated RMSNorm over each head
        self.o_proj = nn.Linear(kda.key_dim, cfg.hidden_size, bias=False)
        self.decode_kernel = None  # the plan's (apply_kernels): this layer has one PyTorch path

    def apply_kernels(self, kernels, packed_qkv=None, packed_o=None) -> None:
        self.decode_kernel = kernels.attention

    def state_shapes(self, num_slots: int):
        """The state tensors, ((shape, dtype), ...): the convolution window in the model dtype
        (None), the recurrent matrix in float32."""
        kda = self.kda
        return (((num_slots, kda.conv_dim, kda.conv_kernel - 1), None),
                ((num_slots, kda.num_heads, kda.head_dim, kda.head_dim), torch.float32))

    def _split(self, x: torch.Tensor):
        """x [T, hidden] -> (mixed q|k|v [T, conv_dim], output gate [T, H, d], beta [T, H],
        g [T, H, d]; beta and g float32)."""
        kda = self.kda
        H, d = kda.num_heads, kda.head_dim
        mixed, b, f_a, g_a = self.in_proj(x).split([kda.conv_dim, H, d, d], dim=-1)
        beta = b.sigmoid().float()  # in the model dtype first, as the reference
        pre = self.f_b_proj(f_a).float() + self.dt.bias.float()
        g = -self.A_log.float().exp()[:, None] * F.softplus(pre.view(-1, H, d))
        return mixed, self.g_b_proj(g_a).view(-1, H, d), beta, g

    def _heads(self, mixed: torch.Tensor):
        """Convolved q|k|v [T, conv_dim] -> q, k (normalised, q scaled), v [T, H, d], float32."""
        kda = self.kda
        q, k, v = (t.reshape(-1, kda.num_heads, kda.head_dim) for t in mixed.float().split(kda.key_dim, dim=-1))
        return l2norm(q) * kda.head_dim**-0.5, l2norm(k), v

    def _gated_norm(self, o: torch.Tensor, gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """RMSNorm over each head's output, times sigmoid(gate), in float32: [T, H, d] -> [T, key_dim]."""
        of = o.float()
        of = self.norm_weight.float() * (of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps))
        return (of * gate.float().sigmoid()).to(dtype).reshape(o.shape[0], -1)

    def forward(self, x: torch.Tensor, cos_sin, meta: AttentionMetadata, cache: StateCache,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[0]
        conv_cache, rec_cache = cache
        H, d = self.kda.num_heads, self.kda.head_dim
        mixed, gate, beta, g = self._split(x)
        out = x.new_empty(T, H, d)
        nd = meta.num_decodes
        if nd:
            slots, fresh = decode_rows(meta)
            q, k, v = self._heads(F.silu(conv_decode(conv_cache, slots, fresh, mixed[:nd], self.conv_weight)).to(x.dtype))
            state = rec_cache[slots].masked_fill(fresh[..., None], 0)
            o, state = recurrent_kda_step(q, k, v, g[:nd], beta[:nd], state)
            rec_cache.index_copy_(0, slots, state)
            out[:nd] = o.to(x.dtype)
        for s, e, slot, carried in prefill_chunks(meta):  # each from its sequence's state so far
            conv = conv_prefill(conv_cache, slot, carried, mixed[s:e], self.conv_weight)
            q, k, v = self._heads(F.silu(conv).to(x.dtype))  # [n, H, d]
            o, state = chunk_kda(q, k, v, g[s:e], beta[s:e], rec_cache[slot] if carried else None)
            rec_cache[slot] = state
            out[s:e] = o.to(x.dtype)
        return self.o_proj(self._gated_norm(out, gate, x.dtype))
