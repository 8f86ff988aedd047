"""MLA decode attention in Triton, absorbed form, reading the paged latent cache in place.

Multi-head latent attention (models/layers/mla.py) caches per token the latent c
(kv_lora_rank values) and the rotary key k_pe (one for all heads; DSA's index key may follow it
in the same row). With the query heads moved into latent space by the caller (q_lat = W_uk^T
q_nope), all heads attend to one shared "KV head":

    s[h, t] = (q_lat[h] . c_t + q_pe[h] . k_pe_t) * scale,  out[h] = sum_t softmax(s[h])_t c_t

One program per (row, block of BLOCK_H heads) walks its row's block table over tiles of BLOCK_N
tokens with an online softmax; the heads are the rows of the `tl.dot`s, so each latent tile is
loaded once for all of them and serves as both key and value. A row is one query token (a
decode sequence, or one token of a prefill chunk with its causal length). Lengths are read on
the device: no host sync, so a decode step can be captured in a CUDA graph; a row of length 0
(graph padding) writes zeros.

The latent cache may hold another dtype than the queries (`--kv-cache-dtype`): a bfloat16 cache
of a float32 model is widened as each tile is loaded; a float8_e4m3fn cache is read as its bytes
and decoded with integer ops (triton_attention._e4m3fn_to_f32: exact, on every GPU), its one
k_scale (latent and rotary key share it, as in vLLM's MLA cache) folded into the score scale and
the output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.kernels.triton_attention import _e4m3fn_to_f32


@triton.jit
def _mla_decode_kernel(
    ql_ptr, qp_ptr, lat_ptr, pe_ptr, tables_ptr, lens_ptr, out_ptr,
    stride_qlb, stride_qlh,  # q_lat [B, H, R], last dim contiguous
    stride_qpb, stride_qph,  # q_pe [B, H, DR]
    stride_lb, stride_ls,  # latent cache [num_blocks, block_size, 1, R]
    stride_pb, stride_ps,  # rotary cache [num_blocks, block_size, 1, PW]
    stride_tb,  # tables [B, max_blocks]
    stride_ob, stride_oh,  # out [B, H, R]
    scale, H,
    v_scale,  # an fp8 cache's scale on the output (its score part is folded into `scale`)
    KV_FP8: tl.constexpr,
    R: tl.constexpr, R_PAD: tl.constexpr, DR: tl.constexpr, DR_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    length = tl.load(lens_ptr + b)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_r = tl.arange(0, R_PAD)
    offs_p = tl.arange(0, DR_PAD)
    h_mask = offs_h < H
    r_mask = offs_r < R
    p_mask = offs_p < DR
    q_lat = tl.load(ql_ptr + b * stride_qlb + offs_h[:, None] * stride_qlh + offs_r[None, :],
                    mask=h_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_H, R_PAD]
    q_pe = tl.load(qp_ptr + b * stride_qpb + offs_h[:, None] * stride_qph + offs_p[None, :],
                   mask=h_mask[:, None] & p_mask[None, :], other=0.0)  # [BLOCK_H, DR_PAD]
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R_PAD], tl.float32)
    for start in range(0, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < length
        block = tl.load(tables_ptr + b * stride_tb + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = offs_n % BLOCK_SIZE
        lat_row = block * stride_lb + slot * stride_ls  # [BLOCK_N]
        pe_row = block * stride_pb + slot * stride_ps
        c = tl.load(lat_ptr + lat_row[:, None] + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                    other=0.0)  # [BLOCK_N, R_PAD]: the keys' latent part and the values
        k_pe = tl.load(pe_ptr + pe_row[None, :] + offs_p[:, None], mask=p_mask[:, None] & n_mask[None, :],
                       other=0.0)  # [DR_PAD, BLOCK_N]
        if KV_FP8:
            c = _e4m3fn_to_f32(c).to(q_lat.dtype)
            k_pe = _e4m3fn_to_f32(k_pe).to(q_lat.dtype)
        else:  # a bfloat16 cache of a float32 model: widened (a no-op for the model dtype's cache)
            c = c.to(q_lat.dtype)
            k_pe = k_pe.to(q_lat.dtype)
        s = tl.dot(q_lat, tl.trans(c), input_precision=PRECISION)
        s = (s + tl.dot(q_pe, k_pe, input_precision=PRECISION)) * scale  # [BLOCK_H, BLOCK_N] float32
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_FP8:
        out = out * v_scale
    tl.store(out_ptr + b * stride_ob + offs_h[:, None] * stride_oh + offs_r[None, :],
             out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & r_mask[None, :])


def mla_decode_triton(
    q_lat: torch.Tensor,  # [B, H, R]
    q_pe: torch.Tensor,  # [B, H, DR]
    lat_cache: torch.Tensor,  # [num_blocks, block_size, 1, R]
    pe_cache: torch.Tensor,  # [num_blocks, block_size, 1, PW >= DR]
    block_tables: torch.Tensor,  # [B, max_blocks] int
    seq_lens: torch.Tensor,  # [B] int
    scale: float,
    k_scale: float = 1.0,  # an fp8 cache's scale: values x8 * k_scale
) -> torch.Tensor:
    B, H, R = q_lat.shape
    DR = q_pe.shape[-1]
    assert q_pe.shape[:2] == (B, H) and lat_cache.shape[-1] == R and pe_cache.shape[-1] >= DR
    assert lat_cache.shape[:3] == pe_cache.shape[:3] and lat_cache.shape[2] == 1
    fp8 = lat_cache.dtype == torch.float8_e4m3fn
    assert pe_cache.dtype == lat_cache.dtype and (
        fp8 or lat_cache.dtype == q_lat.dtype or (lat_cache.dtype == torch.bfloat16 and q_lat.dtype == torch.float32))
    if fp8:  # its bytes, decoded in the kernel
        lat_cache, pe_cache = lat_cache.view(torch.uint8), pe_cache.view(torch.uint8)
    assert q_lat.stride(-1) == 1 and q_pe.stride(-1) == 1 and lat_cache.stride(-1) == 1 and pe_cache.stride(-1) == 1
    out = q_lat.new_empty(B, H, R)
    if B == 0:
        return out
    block_h = max(16, min(64, triton.next_power_of_2(H)))
    r_pad = max(16, triton.next_power_of_2(R))
    block_n = 64 if r_pad <= 128 else (32 if r_pad <= 256 else 16)
    _mla_decode_kernel[(B, triton.cdiv(H, block_h))](
        q_lat, q_pe, lat_cache, pe_cache, block_tables, seq_lens, out,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1),
        lat_cache.stride(0), lat_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1),
        block_tables.stride(0), out.stride(0), out.stride(1),
        scale * k_scale if fp8 else scale, H, k_scale if fp8 else 1.0, KV_FP8=fp8,
        R=R, R_PAD=r_pad, DR=DR, DR_PAD=max(16, triton.next_power_of_2(DR)), BLOCK_H=block_h,
        BLOCK_SIZE=lat_cache.shape[1], BLOCK_N=block_n,
        PRECISION="ieee" if q_lat.dtype == torch.float32 else "tf32",
        num_warps=4 if r_pad <= 256 else 8, num_stages=2,
    )
    return out


# -- the registered operator (what model code calls: visible to torch.profiler and torch.compile)
@torch.library.custom_op("moe_serve::mla_decode_triton", mutates_args=())
def mla_decode_op(q_lat: torch.Tensor, q_pe: torch.Tensor, lat_cache: torch.Tensor, pe_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                  k_scale: float = 1.0) -> torch.Tensor:
    return mla_decode_triton(q_lat, q_pe, lat_cache, pe_cache, block_tables, seq_lens, scale, k_scale)


@mla_decode_op.register_fake
def _(q_lat, q_pe, lat_cache, pe_cache, block_tables, seq_lens, scale, k_scale=1.0):
    return q_lat.new_empty(q_lat.shape)
