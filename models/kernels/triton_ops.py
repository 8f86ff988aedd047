"""Small fused ops in Triton, for the decode step on CUDA (each replaces 5-20 tiny launches).

- `rmsnorm`: RMSNorm, optionally after a residual add (returns the sum too), one program
  per token row; the same roundings as `models.layers.norm.RMSNorm` (normalise in float32,
  round to the model dtype, multiply by the weight in the model dtype).
- `rope_write_kv`: per-head q/k RMSNorm (optional), rotary embedding of q and k (neox
  layout, from the step's cos/sin rows) and the K/V store into the paged cache at each
  token's slot, in one launch; returns the rotated q.
The PyTorch paths in models/layers stay the reference (and the CPU path).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, N, stride_x, stride_r, stride_o, stride_s, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)  # the residual stream keeps the model dtype
        tl.store(sum_ptr + row * stride_s + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    y = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [T, N] -> (RMSNorm(x + residual), x + residual) (the sum is None without a residual)."""
    T, N = x.shape
    assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1)
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    if T:
        res = residual if residual is not None else x
        s = total if total is not None else out
        _rmsnorm_kernel[(T,)](x, res, weight, out, s, N, x.stride(0), res.stride(0), out.stride(0), s.stride(0), eps,
                              HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(N),
                              num_warps=4 if N <= 4096 else 8)
    return out, total


@triton.jit
def _rope_write_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr, slots_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
    stride_qkv, stride_cs, stride_qo_t, stride_qo_h, stride_cache_slot, stride_cache_h, eps,
    H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr, half: tl.constexpr, H_PAD: tl.constexpr,
    KVH_PAD: tl.constexpr, HALF_PAD: tl.constexpr, QK_NORM: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_j = tl.arange(0, HALF_PAD)
    j_mask = offs_j < half
    c1 = tl.load(cos_ptr + t * stride_cs + offs_j, mask=j_mask, other=0.0).to(tl.float32)  # [HALF]
    c2 = tl.load(cos_ptr + t * stride_cs + half + offs_j, mask=j_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_cs + offs_j, mask=j_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_cs + half + offs_j, mask=j_mask, other=0.0).to(tl.float32)
    dt = q_out_ptr.dtype.element_ty
    row = qkv_ptr + t * stride_qkv
    slot = tl.load(slots_ptr + t).to(tl.int64)
    # q heads [H_PAD, HALF_PAD] x 2 halves
    offs_h = tl.arange(0, H_PAD)
    m = (offs_h < H)[:, None] & j_mask[None, :]
    x1 = tl.load(row + offs_h[:, None] * D + offs_j[None, :], mask=m, other=0.0)
    x2 = tl.load(row + offs_h[:, None] * D + half + offs_j[None, :], mask=m, other=0.0)
    if QK_NORM:
        x1, x2 = _head_norm(x1, x2, qw_ptr, offs_j, j_mask, eps, D, half, dt)
    o1, o2 = _rotate(x1, x2, c1, c2, s1, s2, dt)
    q_dst = q_out_ptr + t * stride_qo_t + offs_h[:, None] * stride_qo_h
    tl.store(q_dst + offs_j[None, :], o1, mask=m)
    tl.store(q_dst + half + offs_j[None, :], o2, mask=m)
    # k heads, rotated into the cache; v copied
    offs_k = tl.arange(0, KVH_PAD)
    mk = (offs_k < KVH)[:, None] & j_mask[None, :]
    kbase = row + H * D + offs_k[:, None] * D
    k1 = tl.load(kbase + offs_j[None, :], mask=mk, other=0.0)
    k2 = tl.load(kbase + half + offs_j[None, :], mask=mk, other=0.0)
    if QK_NORM:
        k1, k2 = _head_norm(k1, k2, kw_ptr, offs_j, j_mask, eps, D, half, dt)
    r1, r2 = _rotate(k1, k2, c1, c2, s1, s2, dt)
    dst = slot * stride_cache_slot + offs_k[:, None] * stride_cache_h
    tl.store(k_cache_ptr + dst + offs_j[None, :], r1, mask=mk)
    tl.store(k_cache_ptr + dst + half + offs_j[None, :], r2, mask=mk)
    vbase = row + (H + KVH) * D + offs_k[:, None] * D
    tl.store(v_cache_ptr + dst + offs_j[None, :], tl.load(vbase + offs_j[None, :], mask=mk, other=0.0), mask=mk)
    tl.store(v_cache_ptr + dst + half + offs_j[None, :], tl.load(vbase + half + offs_j[None, :], mask=mk, other=0.0),
             mask=mk)


@triton.jit
def _rotate(x1, x2, c1, c2, s1, s2, dt: tl.constexpr):
    # apply_rotary's roundings: x * cos and rotate_half(x) * sin each rounded, then their sum
    a1 = (x1.to(tl.float32) * c1[None, :]).to(dt).to(tl.float32)
    b1 = ((-x2.to(tl.float32)) * s1[None, :]).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * c2[None, :]).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * s2[None, :]).to(dt).to(tl.float32)
    return (a1 + b1).to(dt), (a2 + b2).to(dt)


@triton.jit
def _head_norm(x1, x2, w_ptr, offs_j, j_mask, eps, D: tl.constexpr, half: tl.constexpr, dt: tl.constexpr):
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(f1 * f1, 1) + tl.sum(f2 * f2, 1)) / D + eps)  # [heads]
    w1 = tl.load(w_ptr + offs_j, mask=j_mask, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + half + offs_j, mask=j_mask, other=0.0).to(tl.float32)
    y1 = (f1 * rstd[:, None]).to(dt).to(tl.float32) * w1[None, :]
    y2 = (f2 * rstd[:, None]).to(dt).to(tl.float32) * w2[None, :]
    return y1.to(dt), y2.to(dt)


def rope_write_kv(
    qkv: torch.Tensor,  # [T, (H + 2 KVH) * D]
    cos: torch.Tensor,  # [T, 1, D] in the model dtype
    sin: torch.Tensor,
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm: torch.Tensor | None = None,  # [D] per-head RMSNorm weights (Qwen3), or None
    k_norm: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Rotated (and head-normed) q [T, H, D]; k and v stored into the cache at their slots."""
    T = qkv.shape[0]
    D = head_dim
    q = torch.empty(T, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q
    assert qkv.stride(-1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    cos2, sin2 = cos.reshape(T, D), sin.reshape(T, D)
    qk_norm = q_norm is not None
    _rope_write_kv_kernel[(T,)](
        qkv, cos2, sin2, q_norm if qk_norm else qkv, k_norm if qk_norm else qkv, slot_mapping, q, k_cache, v_cache,
        qkv.stride(0), cos2.stride(0), q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), eps,
        H=num_heads, KVH=num_kv_heads, D=D, half=D // 2, H_PAD=triton.next_power_of_2(num_heads),
        KVH_PAD=triton.next_power_of_2(num_kv_heads), HALF_PAD=triton.next_power_of_2(D // 2), QK_NORM=qk_norm,
        num_warps=4,
    )
    return q


# -- the registered operators (what model code calls: visible to torch.profiler and torch.compile)
@torch.library.custom_op("moe_serve::rmsnorm_triton", mutates_args=())
def rmsnorm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) [T, N]."""
    return rmsnorm(x, weight, eps)[0]


@rmsnorm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("moe_serve::add_rmsnorm_triton", mutates_args=())
def add_rmsnorm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual), [T, N] each."""
    return rmsnorm(x, weight, eps, residual=residual)


@add_rmsnorm_op.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("moe_serve::rope_write_kv_triton", mutates_args=("k_cache", "v_cache"))
def rope_write_kv_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                     head_dim: int, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """`rope_write_kv`: the rotated q [T, H, D]; k and v written into the caches."""
    return rope_write_kv(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim, q_norm,
                         k_norm, eps)


@rope_write_kv_op.register_fake
def _(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim, q_norm, k_norm, eps):
    return qkv.new_empty(qkv.shape[0], num_heads, head_dim)
