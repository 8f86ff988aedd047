"""Mamba2 (Granite 4.0-H): a selective state-space layer with a per-sequence recurrent state.

Each sequence keeps, per layer, a fixed-size state in a slot of the runner's state cache: the
last `conv_kernel - 1` inputs of the causal depthwise convolution over [x | B | C], and the SSM
state S [heads, head_dim, state_size]. With dt = softplus(dt_raw + dt_bias) (per head) and
A = -exp(A_log), a token t does

    S <- exp(dt_t A) S + dt_t x_t B_t^T;  y_t = S C_t + D x_t

(B and C shared by the heads of a group). Decode steps apply it once per sequence, batched over
the step's sequences (their slots gathered and scattered back); prefill chunks use the chunked
(SSD) form, `mamba2_chunk_scan`: within a chunk the outputs are a masked, decay-weighted
C B^T product with the inputs, the state carried from chunk to chunk, starting from the state the
sequence's earlier chunks left (so chunked prefill needs no special case). As the reference
(transformers' `torch_forward`), the chunked scan clamps dt to `time_step_limit` and the
single-token step does not. The output goes through a grouped RMSNorm of y * silu(z), then the
output projection.

`in_proj` rows are the checkpoint's: [z (intermediate) | x, B, C (conv_dim) | dt (heads)].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import Mamba2Config
from models.layers.paged import AttentionMetadata
from models.layers.state_conv import conv_decode, conv_prefill, decode_rows, prefill_chunks

StateCache = tuple[torch.Tensor, torch.Tensor]  # conv [slots, conv_dim, K - 1], ssm [slots, H, P, N]


def mamba2_chunk_scan(x, dt, A, B, C, state: torch.Tensor | None, chunk: int):
    """One sequence, float32: x [T, H, P], dt [T, H] (after bias, softplus and clamp), A [H],
    B, C [T, H, N] (groups already repeated per head), state [H, P, N] or None (zeros) ->
    (y [T, H, P] without the D skip, final state [H, P, N])."""
    T, H, P = x.shape
    N = B.shape[-1]
    pad = (chunk - T % chunk) % chunk
    n = (T + pad) // chunk
    # padded steps have dt = 0: no decay, no input, so the final state is the last real token's
    xdt = F.pad(x * dt[..., None], (0, 0, 0, 0, 0, pad)).reshape(n, chunk, H, P).permute(2, 0, 1, 3)  # [H, n, L, P]
    B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)).reshape(n, chunk, H, N).permute(2, 0, 1, 3) for t in (B, C))
    a = F.pad(dt * A, (0, 0, 0, pad)).reshape(n, chunk, H).permute(2, 0, 1)  # [H, n, L] log decay per step
    cum = a.cumsum(-1)
    above = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(above, float("-inf")).exp()  # [H, n, L, L]
    y = ((C @ B.transpose(-1, -2)) * decay) @ xdt  # [H, n, L, P] the chunk's own tokens
    to_end = (cum[..., -1:] - cum).exp()[..., None]  # decay from each token to its chunk's end
    chunk_states = (xdt * to_end).transpose(-1, -2) @ B  # [H, n, P, N] what each chunk adds
    from_start = cum.exp()[..., None]  # decay from the chunk's start to each token
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [H, n, 1, 1]
    S = x.new_zeros(H, P, N) if state is None else state.to(torch.float32)
    for i in range(n):  # the scan over chunks (a sequence's chunks depend on each other)
        y[:, i] += (C[:, i] @ S.transpose(-1, -2)) * from_start[:, i]
        S = S * chunk_decay[:, i] + chunk_states[:, i]
    return y.reshape(H, n * chunk, P)[:, :T].transpose(0, 1), S


def mamba2_step(x, dt, A, B, C, state: torch.Tensor):
    """One token for each of S sequences, float32: x [S, H, P], dt [S, H] (after bias and
    softplus), A [H], B, C [S, H, N], state [S, H, P, N] -> (y [S, H, P] without the D skip,
    new state)."""
    state = state * (dt * A).exp()[..., None, None] + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    return (state @ C[..., None]).squeeze(-1), state


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        m: Mamba2Config = cfg.mamba
        self.layer_idx = layer_idx
        self.m = m
        self.eps = cfg.rms_norm_eps
        H = cfg.hidden_size
        self.in_proj = nn.Linear(H, m.intermediate_size + m.conv_dim + m.num_heads, bias=m.proj_bias)
        self.conv_weight = nn.Parameter(torch.empty(m.conv_dim, m.conv_kernel))  # depthwise, causal
        self.conv_bias = nn.Parameter(torch.empty(m.conv_dim)) if m.conv_bias else None
        self.dt_bias = nn.Parameter(torch.empty(m.num_heads))
        self.A_log = nn.Parameter(torch.empty(m.num_heads))
        self.D = nn.Parameter(torch.empty(m.num_heads))
        self.norm_weight = nn.Parameter(torch.empty(m.intermediate_size))  # the gated, grouped RMSNorm
        self.out_proj = nn.Linear(m.intermediate_size, H, bias=m.proj_bias)
        self.decode_kernel = None  # the plan's (apply_kernels): this layer has one PyTorch path

    def apply_kernels(self, kernels, packed_qkv=None, packed_o=None) -> None:
        self.decode_kernel = kernels.attention

    def state_shapes(self, num_slots: int):
        """The state tensors, ((shape, dtype), ...): the convolution window in the model dtype
        (None), the SSM state in float32."""
        m = self.m
        return (((num_slots, m.conv_dim, m.conv_kernel - 1), None),
                ((num_slots, m.num_heads, m.head_dim, m.state_size), torch.float32))

    def _ssm_inputs(self, conv: torch.Tensor):
        """Convolved x|B|C [T, conv_dim] -> x [T, H, P], B, C [T, H, N] (each group's B and C
        repeated for its heads), float32."""
        m = self.m
        gn = m.n_groups * m.state_size
        xs, B, C = conv.float().split([m.intermediate_size, gn, gn], dim=-1)
        rep = m.num_heads // m.n_groups
        B = B.reshape(-1, m.n_groups, m.state_size).repeat_interleave(rep, dim=1)
        C = C.reshape(-1, m.n_groups, m.state_size).repeat_interleave(rep, dim=1)
        return xs.reshape(-1, m.num_heads, m.head_dim), B, C

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """RMSNorm over each group of y * silu(z) (float32), times the weight: [T, intermediate]."""
        m = self.m
        h = y * F.silu(z.float())
        g = h.reshape(h.shape[0], m.n_groups, -1)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.norm_weight.float() * g.reshape(h.shape)).to(dtype)

    def forward(self, x: torch.Tensor, cos_sin, meta: AttentionMetadata, cache: StateCache,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        m = self.m
        T = x.shape[0]
        conv_cache, ssm_cache = cache
        z, xbc, dt = self.in_proj(x).split([m.intermediate_size, m.conv_dim, m.num_heads], dim=-1)
        A = -self.A_log.float().exp()
        D = self.D.float()[:, None]
        weight, bias = self.conv_weight, self.conv_bias
        dt = dt.float() + self.dt_bias.float()
        y = torch.empty(T, m.num_heads, m.head_dim, dtype=torch.float32, device=x.device)
        nd = meta.num_decodes
        if nd:
            slots, fresh = decode_rows(meta)
            xs, B, C = self._ssm_inputs(F.silu(conv_decode(conv_cache, slots, fresh, xbc[:nd], weight, bias)).to(x.dtype))
            state = ssm_cache[slots].masked_fill(fresh[..., None], 0)
            out, state = mamba2_step(xs, F.softplus(dt[:nd]), A, B, C, state)
            ssm_cache.index_copy_(0, slots, state)
            y[:nd] = out + D * xs
        lo, hi = m.time_step_limit
        for s, e, slot, carried in prefill_chunks(meta):  # each from its sequence's state so far
            conv = conv_prefill(conv_cache, slot, carried, xbc[s:e], weight, bias)
            xs, B, C = self._ssm_inputs(F.silu(conv).to(x.dtype))
            step = F.softplus(dt[s:e]).clamp(lo, hi)
            out, state = mamba2_chunk_scan(xs, step, A, B, C, ssm_cache[slot] if carried else None, m.chunk_size)
            ssm_cache[slot] = state
            y[s:e] = out + D * xs
        return self.out_proj(self._gated_norm(y.reshape(T, -1), z, x.dtype))
