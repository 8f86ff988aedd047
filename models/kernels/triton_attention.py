"""Paged decode attention in Triton: one program per (sequence, KV head) reads that head's
keys and values straight from the cache blocks its block table lists (no gather), with an
online softmax over tiles of BLOCK_N tokens. The G query heads that share a KV head are the
rows of one `tl.dot` (padded to 16), so each key is loaded once for all of them.

The context length is read on the device, so the launch needs no host sync and can be
captured in a CUDA graph; a row with length 0 (graph padding) writes zeros.

Variants (gpt-oss, Llama 4, Mixtral / Qwen checkpoints with a sliding window): with a window W
the query at position p = length - 1 sees keys p - W + 1 .. p, with an attention chunk C keys
(p // C) * C .. p; the tiles start at the first visible key, so keys outside are never read.
Sinks add one per-head logit to each softmax's denominator (its probability mass is dropped).

An fp8 cache (float8_e4m3fn, `--kv-cache-dtype fp8`) is read as its bytes and decoded to float32
with integer ops as each tile is loaded (exact, and on every GPU: Triton's float8e4nv type needs
sm89+), then cast to q's dtype; its per-tensor `k_scale` folds into the score scale and `v_scale`
scales the output. A bfloat16 cache of a float32 model (`--kv-cache-dtype bfloat16`) is loaded as
bfloat16 and widened to float32 (exact) as each tile is loaded.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _e4m3fn_to_f32(b):
    """float8_e4m3fn bytes -> float32: sign, 4 exponent bits biased by 7, 3 mantissa bits
    (exponent 0: subnormals m * 2^-9). The cache never holds NaN (writes saturate at +-448)."""
    x = b.to(tl.uint32)
    e = (x >> 3) & 15
    m = x & 7
    normal = ((x & 128) << 24 | (e + 120) << 23 | m << 20).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    return tl.where(e == 0, tl.where((x & 128) != 0, -sub, sub), normal)


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, sinks_ptr, out_ptr,
    stride_qb, stride_qh,  # q [B, H, D], last dim contiguous
    stride_cb, stride_cs, stride_ch,  # caches [num_blocks, block_size, KVH, D], last dim contiguous
    stride_tb,  # tables [B, max_blocks]
    stride_ob, stride_oh,  # out [B, H, D]
    scale, window, chunk,  # window / chunk: 0 for none
    v_scale,  # an fp8 cache's value scale (its key scale is folded into `scale`)
    HAS_SINKS: tl.constexpr, KV_FP8: tl.constexpr,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    length = tl.load(lens_ptr + b)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D_PAD)
    g_mask = offs_g < G
    d_mask = offs_d < D
    q_rows = h * G + offs_g  # the query heads of KV head h
    q = tl.load(q_ptr + b * stride_qb + q_rows[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [G_PAD, D_PAD]
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D_PAD], tl.float32)
    # the first key the query (position length - 1) sees
    first = tl.maximum(tl.where(window > 0, length - window, 0),
                       tl.where(chunk > 0, ((length - 1) // tl.maximum(chunk, 1)) * chunk, 0))
    first = tl.maximum(first, 0)
    for start in range(first, length, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < length
        block = tl.load(tables_ptr + b * stride_tb + offs_n // BLOCK_SIZE, mask=n_mask, other=0)
        row = block.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE) * stride_cs + h * stride_ch  # [BLOCK_N]
        kv_mask = d_mask[:, None] & n_mask[None, :]
        k_t = tl.load(k_ptr + row[None, :] + offs_d[:, None], mask=kv_mask, other=0.0)  # [D_PAD, BLOCK_N]
        if KV_FP8:
            k_t = _e4m3fn_to_f32(k_t).to(q.dtype)
        else:  # a bfloat16 cache of a float32 model: widened (a no-op for the model dtype's cache)
            k_t = k_t.to(q.dtype)
        s = tl.dot(q, k_t, input_precision=PRECISION) * scale  # [G_PAD, BLOCK_N] float32
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])  # [G_PAD, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :],
                    other=0.0)  # [BLOCK_N, D_PAD]
        if KV_FP8:
            v = _e4m3fn_to_f32(v).to(q.dtype)
        else:
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    if HAS_SINKS:  # one more logit per head in the denominator
        sink = tl.load(sinks_ptr + q_rows, mask=g_mask, other=0.0).to(tl.float32)  # [G_PAD]
        m_f = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m_f)
        l_i = l_i * alpha + tl.exp(sink - m_f)
        acc = acc * alpha[:, None]
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if KV_FP8:
        out = out * v_scale
    tl.store(out_ptr + b * stride_ob + q_rows[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


def paged_decode_triton(
    q: torch.Tensor,  # [B, heads, d]
    k_cache: torch.Tensor,  # [num_blocks, block_size, kv_heads, d]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int
    seq_lens: torch.Tensor,  # [B] int
    scale: float,
    window: int = 0,  # each query sees its last `window` keys (0: all)
    chunk: int = 0,  # each query sees the keys of its own chunk of `chunk` positions (0: all)
    sinks: torch.Tensor | None = None,  # [heads] per-head sink logits
    k_scale: float = 1.0,  # an fp8 cache's per-tensor scales: keys k8 * k_scale, values v8 * v_scale
    v_scale: float = 1.0,
) -> torch.Tensor:
    B, heads, d = q.shape
    _, block_size, kvh, _ = k_cache.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and q.stride(-1) == 1
    group = heads // kvh
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    assert v_cache.dtype == k_cache.dtype and (
        fp8 or k_cache.dtype == q.dtype or (k_cache.dtype == torch.bfloat16 and q.dtype == torch.float32))
    out = torch.empty_like(q)  # [B, heads, d]
    if B == 0:
        return out
    block_n = 64 if d <= 128 else 32
    if sinks is not None:
        assert sinks.numel() == heads
        sinks = sinks.contiguous()
    if fp8:  # its bytes, decoded in the kernel
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _paged_decode_kernel[(B, kvh)](
        q, k_cache, v_cache, block_tables, seq_lens, q if sinks is None else sinks, out,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        scale * k_scale if fp8 else scale, window, chunk, v_scale if fp8 else 1.0,
        HAS_SINKS=sinks is not None, KV_FP8=fp8,
        G=group, G_PAD=max(16, triton.next_power_of_2(group)), D=d, D_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_SIZE=block_size, BLOCK_N=block_n, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=2,
    )
    return out


# -- the registered operator (what model code calls: visible to torch.profiler and torch.compile)
@torch.library.custom_op("moe_serve::paged_decode_triton", mutates_args=())
def paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    seq_lens: torch.Tensor, scale: float, window: int = 0, chunk: int = 0,
                    sinks: torch.Tensor | None = None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    return paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, window, chunk, sinks,
                               k_scale, v_scale)


@paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens, scale, window=0, chunk=0, sinks=None, k_scale=1.0, v_scale=1.0):
    return torch.empty_like(q)
