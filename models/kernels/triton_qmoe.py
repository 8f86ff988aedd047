"""Quantized fused MoE and dense linears in Triton: the weights stay in their QTensor format
(models/quant/formats.py) and are dequantized tile by tile inside the GEMM's K loop, in registers;
no dequantized weight is ever written to memory (issue 27).

`qmoe_triton` is `triton_moe.fused_moe_triton` (same alignment kernel, same tile ordering, gate+up
with SiLU-and-mul or gpt-oss's clamped SwiGLU fused, down times the routing weight, then the
reduce) over quantized stacks; `qlinear_triton` is the dense linear. Per format (what vLLM does):

- `fp8_block` (DeepSeek-V3): W8A8. The activations (x, and h before the down GEMM) are quantized
  per token per group of `bk` to float8_e4m3 on the fly (`quant_fp8_groups`, vLLM's
  `per_token_group_quant_fp8`: scale = amax / 448), the K loop runs fp8 x fp8 dots with float32
  accumulation and applies a_scale[row, k-block] * w_scale[n-block, k-block] per K tile (the tile's
  BLOCK_K divides bk).
- `fp8_channel` / `fp8_tensor`: W8A8 with dynamic per-token activation scales (vLLM's
  compressed-tensors FP8 MoE with `per_act_token_quant`, its FP8-dynamic scheme); both scales are
  applied once after the K loop. The per-tensor weight scale is the channel case with stride 0.
- without fp8 dot hardware (CUDA capability < 8.9; `fp8_act=False`), the fp8 formats run W8A16:
  the weight bytes are decoded (e4m3 bit fields; Triton has no e4m3 type before sm89) and scaled in
  registers, then the dot runs in the activation dtype (what vLLM's Marlin fallback does on Ampere).
- `mxfp4` (gpt-oss): W4A16. E2M1 codes decoded arithmetically in registers (sign, 2-bit exponent,
  1-bit mantissa: the FP4 table without a memory lookup), times 2^(e8m0 - 127) per 32 inputs;
  the biases and clamped SwiGLU of gpt-oss in the epilogue.
- `int4_group`: W4A16, (code - zero) * scale per group (zero 8 when symmetric), groups of any size.
- `int8_channel`: W8A16, the channel scale after the K loop.

Under TRITON_INTERPRET=1 (the CPU tests) every path runs as on the GPU, fp8 dots included (the
interpreter computes them exactly); the float -> fp8 rounding is done by `_round_e4m3` (round to
nearest even computed in float32, then an exact cast) because the interpreter's own fp32 -> fp8
cast rounds wrongly where the mantissa carries into the exponent.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.kernels.triton_moe import _swiglu, _tile_ids, align_pairs_triton, fit_shared_memory, tile_config
from models.quant.formats import MX_GROUP, FormatError, QTensor, WeightFormat

FP8_MAX = 448.0
# format codes of the kernels (constexpr FMT) and scale layouts (constexpr SCALE)
_FP8, _INT8, _MXFP4, _INT4 = 0, 1, 2, 3
_S_ROW, _S_BLOCK, _S_GROUP = 0, 1, 2  # scale per output row (after the K loop) / per (bn, bk) block / per (row, group)


@triton.jit
def _round_e4m3(y):
    """float32 y (|y| <= 448) -> the nearest float8_e4m3fn value (ties to even), still float32."""
    a = tl.abs(y)
    bits = a.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, -6)  # subnormals share the smallest normal exponent's step
    step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(exp - 3): 3 mantissa bits
    q = a * ((3 - exp + 127) << 23).to(tl.float32, bitcast=True)  # a / step, exact
    f = tl.floor(q)
    d = q - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    r = (f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)) * step
    return tl.where(y < 0, -r, r)  # -0.0 for the negatives that round to zero, as a cast does


@triton.jit
def _quant_fp8_kernel(x_ptr, q_ptr, s_ptr, K, GROUP, stride_xm, stride_qm, stride_sm, BLOCK: tl.constexpr):
    # program (row, group): scale = amax / 448 over x[row, group], q = round(x / scale)
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    start = grp * GROUP
    amax = tl.zeros([BLOCK], tl.float32)
    for c in range(0, GROUP, BLOCK):
        offs = start + c + tl.arange(0, BLOCK)
        m = (c + tl.arange(0, BLOCK) < GROUP) & (offs < K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0), 1e-10) / 448.0
    tl.store(s_ptr + row * stride_sm + grp, scale)
    for c in range(0, GROUP, BLOCK):
        offs = start + c + tl.arange(0, BLOCK)
        m = (c + tl.arange(0, BLOCK) < GROUP) & (offs < K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=m, other=0.0).to(tl.float32)
        y = tl.minimum(tl.maximum(tl.div_rn(x, scale), -448.0), 448.0)  # IEEE division, as torch
        tl.store(q_ptr + row * stride_qm + offs, _round_e4m3(y).to(q_ptr.dtype.element_ty), mask=m)


def quant_fp8_groups(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (float8_e4m3fn [M, K], float32 scales [M, ceil(K / group)]): dynamic per-token,
    per-group activation quantization (group = K: per token)."""
    M, K = x.shape
    assert x.stride(-1) == 1
    n_groups = -(-K // group)
    q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(M, n_groups, dtype=torch.float32, device=x.device)
    if M:
        block = min(1024, triton.next_power_of_2(group))
        _quant_fp8_kernel[(M, n_groups)](x, q, s, K, group, x.stride(0), q.stride(0), s.stride(0), BLOCK=block,
                                         num_warps=4)
    return q, s


@triton.jit
def _w_tile(d_ptr, s_ptr, z_ptr, rows, n_mask, k0, kk, k_mask, stride_dn, stride_sn, stride_sk, stride_zn,
            BN, GROUP, FMT: tl.constexpr, SCALE: tl.constexpr, A8: tl.constexpr, DT: tl.constexpr):
    """The weight tile [BLOCK_K, BLOCK_N] for output rows `rows` and inputs `kk` = k0 + [0, BLOCK_K),
    ready for tl.dot with activations of dtype DT: raw fp8 when A8 (its scales are applied by the
    caller), else dequantized (SCALE == _S_ROW: the row scale is left to the caller)."""
    m = k_mask[:, None] & n_mask[None, :]
    # one return at the end: the constexpr branches below are resolved at compile time
    if FMT == 0 or FMT == 1:  # fp8 / int8 codes, one byte per weight
        w = tl.load(d_ptr + rows[None, :] * stride_dn + kk[:, None], mask=m, other=0.0)
        if A8:
            out = w
        else:
            if FMT == 0:  # float8_e4m3fn bytes decoded here (sm80 has no e4m3 type): S.EEEE.MMM, bias 7
                b = w.to(tl.int32)
                e = (b >> 3) & 0xF
                mt = (b & 7).to(tl.float32)
                pow2 = ((tl.maximum(e, 1) + 117) << 23).to(tl.float32, bitcast=True)  # 2^(e - 10)
                mag = tl.where(e == 0, mt * 0.001953125, (8.0 + mt) * pow2)  # subnormal: mt * 2^-9
                wf = tl.where((b & 0x80) != 0, -mag, mag)
            else:
                wf = w.to(tl.float32)
            if SCALE == 1:  # fp8_block in W8A16: one block scale per output row in this K tile
                s = tl.load(s_ptr + (rows // BN) * stride_sn + (k0 // GROUP) * stride_sk, mask=n_mask, other=0.0)
                wf = wf * s[None, :]
            out = wf.to(DT)
    else:
        byte = tl.load(d_ptr + rows[None, :] * stride_dn + (kk // 2)[:, None], mask=m, other=0).to(tl.int32)
        code = (byte >> ((kk % 2) * 4)[:, None]) & 0xF
        sm = tl.load(s_ptr + rows[None, :] * stride_sn + (kk // GROUP)[:, None] * stride_sk, mask=m, other=0)
        if FMT == 2:  # E2M1: sign bit 3, exponent bits 1-2, mantissa bit 0; E8M0 scale 2^(s - 127)
            e = (code >> 1) & 3
            mant = (code & 1).to(tl.float32)
            pow2 = ((tl.maximum(e, 1) + 126) << 23).to(tl.float32, bitcast=True)  # 2^(e - 1)
            mag = tl.where(e == 0, 0.5 * mant, (1.0 + 0.5 * mant) * pow2)
            v = tl.where((code & 8) != 0, -mag, mag)
            scale = (sm.to(tl.int32) << 23).to(tl.float32, bitcast=True)
            out = (v * scale).to(DT)
        else:  # int4 group: (code - zero) * scale, zero 8 when symmetric (z_ptr is None)
            if z_ptr is None:
                zf = (code * 0 + 8).to(tl.float32)
            else:
                zf = tl.load(z_ptr + rows[None, :] * stride_zn + (kk // GROUP)[:, None], mask=m, other=0).to(tl.float32)
            out = ((code.to(tl.float32) - zf) * sm.to(tl.float32)).to(DT)
    return out


@triton.jit
def _qmm(a_ptrs, as_ptrs, row_mask, d_ptr, s_ptr, z_ptr, offs_n, n_mask, K, N2,
         stride_dn, stride_sn, stride_sk, stride_zn, BN, GROUP,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         FMT: tl.constexpr, SCALE: tl.constexpr, A8: tl.constexpr, TWO: tl.constexpr, PRECISION: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] = A[rows] @ W[offs_n].T in float32 with every scale applied; with TWO,
    also acc2 for the rows offs_n + N2 (the up half of a gate+up stack) from the same A loads.
    a_ptrs [BLOCK_M, BLOCK_K] point at k = 0; as_ptrs [BLOCK_M] at the rows' activation scales (A8)."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rows2 = offs_n + N2
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        a = tl.load(a_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = _w_tile(d_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, kk, k_mask, stride_dn, stride_sn, stride_sk, stride_zn,
                    BN, GROUP, FMT, SCALE, A8, a.dtype)
        if TWO:
            w2 = _w_tile(d_ptr, s_ptr, z_ptr, rows2, n_mask, k0, kk, k_mask, stride_dn, stride_sn, stride_sk, stride_zn,
                         BN, GROUP, FMT, SCALE, A8, a.dtype)
        if A8 and SCALE == 1:  # fp8 block: a_scale[row, kb] * w_scale[nb, kb] per K tile (BLOCK_K divides bk)
            kb = k0 // GROUP
            a_s = tl.load(as_ptrs + kb, mask=row_mask, other=0.0)
            w_s = tl.load(s_ptr + (offs_n // BN) * stride_sn + kb * stride_sk, mask=n_mask, other=0.0)
            acc += tl.dot(a, w, out_dtype=tl.float32) * (a_s[:, None] * w_s[None, :])
            if TWO:
                w_s2 = tl.load(s_ptr + (rows2 // BN) * stride_sn + kb * stride_sk, mask=n_mask, other=0.0)
                acc2 += tl.dot(a, w2, out_dtype=tl.float32) * (a_s[:, None] * w_s2[None, :])
        elif A8:
            acc = tl.dot(a, w, acc, out_dtype=tl.float32)
            if TWO:
                acc2 = tl.dot(a, w2, acc2, out_dtype=tl.float32)
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
            if TWO:
                acc2 = tl.dot(a, w2, acc2, input_precision=PRECISION)
    if SCALE == 0:  # a scale per output row (channel; per tensor with stride 0), and per token when A8
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)[None, :]
        if TWO:
            acc2 = acc2 * tl.load(s_ptr + rows2 * stride_sn, mask=n_mask, other=0.0)[None, :]
        if A8:
            a_s = tl.load(as_ptrs, mask=row_mask, other=0.0)[:, None]
            acc = acc * a_s
            acc2 = acc2 * a_s
    return acc, acc2


@triton.jit
def _qgate_up_kernel(
    x_ptr, xs_ptr, d_ptr, s_ptr, z_ptr, b_ptr, h_ptr, pairs_ptr, block_experts_ptr, num_rows_ptr, weights_ptr,
    N, K, num_pairs, num_rows_max, limit, alpha, BN, GROUP,
    stride_xm, stride_xsm, stride_de, stride_dn, stride_se, stride_sn, stride_sk, stride_ze, stride_zn,
    stride_be, stride_hm,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FMT: tl.constexpr, SCALE: tl.constexpr, A8: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr, SCALE_INPUT: tl.constexpr,
):
    # x [T, K] (fp8 with scales xs [T, K / GROUP] when A8); w13 [E, 2N, K] quantized (gate rows, then
    # up rows); bias b [E, 2N]; h [P, N] = act(gate, up) as triton_moe._gate_up_kernel
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_rows_max, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    offs_row = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + offs_row)
    row_mask = pair < num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    tok = pair // TOP_K
    a_ptrs = x_ptr + tok[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    zp = z_ptr
    if z_ptr is not None:
        zp = z_ptr + expert * stride_ze
    acc_g, acc_u = _qmm(a_ptrs, xs_ptr + tok * stride_xsm, row_mask, d_ptr + expert * stride_de,
                        s_ptr + expert * stride_se, zp, offs_n, n_mask, K, N,
                        stride_dn, stride_sn, stride_sk, stride_zn, BN, GROUP,
                        BLOCK_M, BLOCK_N, BLOCK_K, FMT, SCALE, A8, True, PRECISION)
    if SCALE_INPUT:  # Llama 4: (w * x) @ W = w * (x @ W), before the bias
        rw = tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        acc_g = acc_g * rw
        acc_u = acc_u * rw
    if HAS_BIAS:
        acc_g += tl.load(b_ptr + expert * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptr + expert * stride_be + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = _swiglu(acc_g, acc_u, limit, alpha, CLAMP)
    tl.store(h_ptr + pair[:, None] * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _qdown_kernel(
    h_ptr, hs_ptr, d_ptr, s_ptr, z_ptr, b_ptr, y_ptr, weights_ptr, pairs_ptr, block_experts_ptr, num_rows_ptr,
    N, K, num_pairs, num_rows_max, BN, GROUP,
    stride_hm, stride_hsm, stride_de, stride_dn, stride_se, stride_sn, stride_sk, stride_ze, stride_zn,
    stride_be, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FMT: tl.constexpr, SCALE: tl.constexpr, A8: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCALE_INPUT: tl.constexpr,
):
    # h [P, K] (fp8 + scales hs when A8); w2 [E, N, K] quantized; y [P, N] = weight * (h @ w2[e].T + b)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_rows_max, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    offs_row = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + offs_row)
    row_mask = pair < num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    a_ptrs = h_ptr + pair[:, None] * stride_hm + tl.arange(0, BLOCK_K)[None, :]
    zp = z_ptr
    if z_ptr is not None:
        zp = z_ptr + expert * stride_ze
    acc, _ = _qmm(a_ptrs, hs_ptr + pair * stride_hsm, row_mask, d_ptr + expert * stride_de,
                  s_ptr + expert * stride_se, zp, offs_n, n_mask, K, 0,
                  stride_dn, stride_sn, stride_sk, stride_zn, BN, GROUP,
                  BLOCK_M, BLOCK_N, BLOCK_K, FMT, SCALE, A8, False, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + expert * stride_be + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if not SCALE_INPUT:
        acc = acc * tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + pair[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _qlinear_kernel(
    x_ptr, xs_ptr, d_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, BN, GROUP,
    stride_xm, stride_xsm, stride_dn, stride_sn, stride_sk, stride_zn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FMT: tl.constexpr, SCALE: tl.constexpr, A8: tl.constexpr, PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    # y [M, N] = x [M, K] @ w.T (+ b)
    pid_m, pid_n = _tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_m < M
    rows = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    a_ptrs = x_ptr + rows[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :]
    acc, _ = _qmm(a_ptrs, xs_ptr + rows * stride_xsm, row_mask, d_ptr, s_ptr, z_ptr, offs_n.to(tl.int64), n_mask,
                  K, 0, stride_dn, stride_sn, stride_sk, stride_zn, BN, GROUP,
                  BLOCK_M, BLOCK_N, BLOCK_K, FMT, SCALE, A8, False, PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


# -- host side ----------------------------------------------------------------------------------

_FP8_FORMATS = (WeightFormat.FP8_BLOCK, WeightFormat.FP8_CHANNEL, WeightFormat.FP8_TENSOR)


def fp8_dot_supported(device: torch.device) -> bool:
    """fp8 x fp8 tensor-core dots (the kernel plan's probe, `plan.fp8_dots`)."""
    from models.kernels.plan import fp8_dots

    return fp8_dots(device)


class _W:
    """A QTensor's kernel arguments: tensors, strides (expert, row, k-group), constexpr codes."""

    def __init__(self, q: QTensor, experts: bool):
        fmt = WeightFormat(q.fmt)
        lead = 1 if experts else 0
        if q.data.dim() != lead + 2:
            raise FormatError(f"expected {'an expert stack [E, N, K]' if experts else 'a weight [N, K]'}, "
                              f"got a {fmt.value} QTensor of shape {q.shape}")
        self.fmt, self.N, self.K = fmt, q.shape[-2], q.shape[-1]
        self.data, self.scale, self.zero = q.data, q.scale, q.zero
        assert q.data.stride(-1) == 1, "the quantized data must be contiguous along K"
        self.bn, self.group = 1, 1
        if fmt in _FP8_FORMATS:
            self.FMT = _FP8
            self.SCALE = _S_BLOCK if fmt == WeightFormat.FP8_BLOCK else _S_ROW
            if fmt == WeightFormat.FP8_BLOCK:
                if q.block is None:
                    raise FormatError("fp8_block needs its block size")
                self.bn, self.group = q.block
        elif fmt == WeightFormat.INT8_CHANNEL:
            self.FMT, self.SCALE = _INT8, _S_ROW
        elif fmt == WeightFormat.MXFP4:
            self.FMT, self.SCALE, self.group = _MXFP4, _S_GROUP, MX_GROUP
        elif fmt == WeightFormat.INT4_GROUP:
            if q.group is None:
                raise FormatError("int4_group needs its group size")
            self.FMT, self.SCALE, self.group = _INT4, _S_GROUP, q.group
        else:
            raise FormatError(f"format {fmt.value} is not a quantized format")
        s = self.scale
        expect = {_S_ROW: (s.shape[-2], 1), _S_BLOCK: (-(-self.N // self.bn), -(-self.K // self.group)),
                  _S_GROUP: (self.N, -(-self.K // self.group))}[self.SCALE]
        if self.SCALE == _S_ROW and s.shape[-2] not in (1, self.N):
            expect = (self.N, 1)
        if tuple(s.shape[-2:]) != expect or (self.zero is not None and self.zero.shape != s.shape):
            raise FormatError(f"{fmt.value} [{self.N}, {self.K}]: scales {tuple(s.shape)}, expected [..., "
                              f"{expect[0]}, {expect[1]}]" + ("" if self.zero is None else " (zeros alike)"))
        if self.FMT in (_MXFP4, _INT4) and (self.K % 2 or self.data.shape[-1] * 2 != self.K):
            raise FormatError(f"{fmt.value}: K={self.K} packs into {self.K // 2} bytes, data has {self.data.shape[-1]}")
        self.stride_e = (self.data.stride(0), s.stride(0), self.zero.stride(0) if self.zero is not None else 0) \
            if experts else (0, 0, 0)
        # per-tensor scales [.., 1, 1]: the row stride 0 makes it the channel case
        self.stride_sn = 0 if s.shape[-2] == 1 and self.N > 1 and self.SCALE == _S_ROW else s.stride(-2)
        self.stride_sk = s.stride(-1)
        self.stride_dn = self.data.stride(-2)
        self.stride_zn = self.zero.stride(-2) if self.zero is not None else 0
        if self.zero is not None:
            assert self.zero.stride(-1) == 1

    @property
    def fp8(self) -> bool:
        return self.FMT == _FP8

    def data_arg(self, a8: bool) -> torch.Tensor:
        """fp8 data as float8 for the fp8 dots, as its bytes for W8A16 (decoded in registers)."""
        return self.data.view(torch.uint8) if self.fp8 and not a8 else self.data

    def act_group(self) -> int:
        """The activation quantization group of W8A8: bk for block scales, the whole row otherwise."""
        return self.group if self.SCALE == _S_BLOCK else self.K


def _config(cfg: dict, w: _W, a8: bool) -> tuple[dict, dict, int]:
    cfg = dict(cfg)
    launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    bn_down = cfg.pop("BLOCK_N_DOWN", cfg["BLOCK_N"])
    if w.SCALE == _S_BLOCK:  # one weight (and W8A8: activation) scale per K tile
        while cfg["BLOCK_K"] > w.group or w.group % cfg["BLOCK_K"]:
            cfg["BLOCK_K"] //= 2
            if cfg["BLOCK_K"] < 16:
                raise FormatError(f"fp8_block with bk={w.group}: no K tile of 16+ divides it")
    return cfg, launch, bn_down


def _use_a8(w: _W, x: torch.Tensor, fp8_act: bool | None) -> bool:
    if not w.fp8:
        return False
    return fp8_dot_supported(x.device) if fp8_act is None else bool(fp8_act)


def _activations(x: torch.Tensor, w: _W, a8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the GEMM's A operand, its per-row / per-group scales): fp8 + scales when W8A8, else x itself
    (the scales argument is then an unused dummy)."""
    if a8:
        return quant_fp8_groups(x, w.act_group())
    return x, x.new_empty(1, 1, dtype=torch.float32)


def _bias_arg(b: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    if b is None:
        return like, 0
    assert b.stride(-1) == 1
    return b, (b.stride(0) if b.dim() > 1 else 0)


def qmoe_triton(x: torch.Tensor, w13: QTensor, w2: QTensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, *,
                b13: torch.Tensor | None = None, b2: torch.Tensor | None = None, limit: float | None = None,
                alpha: float = 1.702, weight_on_input: bool = False, config: dict | None = None,
                fp8_act: bool | None = None) -> torch.Tensor:
    """The fused MoE over quantized stacks: x [T, H]; w13 QTensor [E, 2I, H] (gate rows, then up
    rows, as `fused_moe_triton` takes them); w2 QTensor [E, H, I]; topk_ids / topk_w [T, k];
    b13 [E, 2I] / b2 [E, H] optional biases; `limit` / `alpha`: gpt-oss's clamped SwiGLU;
    `weight_on_input`: Llama 4's routing weight on the input. -> [T, H] in x.dtype.
    `fp8_act`: W8A8 for the fp8 formats (default: where the device has fp8 dots), else W8A16.
    No host sync (a CUDA graph can capture it)."""
    T, k = topk_ids.shape
    g, d = _W(w13, True), _W(w2, True)
    E, two_i, H = w13.shape
    inter = two_i // 2
    if x.shape[-1] != H or w2.shape != (E, H, inter):
        raise FormatError(f"shapes: x {tuple(x.shape)}, w13 {w13.shape}, w2 {w2.shape}")
    if T == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    P = T * k
    cfg = dict(config or tile_config(P, E, x.device.type, x.element_size()))
    a8_1, a8_2 = _use_a8(g, x, fp8_act), _use_a8(d, x, fp8_act)
    cfg1, launch, bn_down = _config(cfg, g, a8_1)
    cfg2, _, _ = _config(cfg, d, a8_2)
    bm = cfg1["BLOCK_M"]
    aligned = align_pairs_triton(topk_ids, E, bm)
    max_rows = aligned.sorted_pairs.numel()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    weights = topk_w.reshape(-1).contiguous()
    h = torch.empty(P, inter, dtype=x.dtype, device=x.device)
    a, a_s = _activations(x, g, a8_1)
    bias1, stride_b1 = _bias_arg(b13, x)
    grid1 = (triton.cdiv(max_rows, bm) * triton.cdiv(inter, cfg1["BLOCK_N"]),)
    _qgate_up_kernel[grid1](
        a, a_s, g.data_arg(a8_1), g.scale, g.zero, bias1, h, aligned.sorted_pairs, aligned.block_experts, aligned.num_rows,
        weights, inter, H, P, max_rows, float(limit or 0.0), float(alpha), g.bn, g.group,
        a.stride(0), a_s.stride(0), g.stride_e[0], g.stride_dn, g.stride_e[1], g.stride_sn, g.stride_sk,
        g.stride_e[2], g.stride_zn, stride_b1, h.stride(0),
        TOP_K=k, FMT=g.FMT, SCALE=g.SCALE, A8=a8_1, PRECISION=precision, HAS_BIAS=b13 is not None,
        CLAMP=limit is not None, SCALE_INPUT=bool(weight_on_input), **cfg1, **launch,
    )
    hq, h_s = _activations(h, d, a8_2)
    bias2, stride_b2 = _bias_arg(b2, x)
    y = torch.empty(P, H, dtype=x.dtype, device=x.device)
    grid2 = (triton.cdiv(max_rows, bm) * triton.cdiv(H, bn_down),)
    _qdown_kernel[grid2](
        hq, h_s, d.data_arg(a8_2), d.scale, d.zero, bias2, y, weights, aligned.sorted_pairs, aligned.block_experts,
        aligned.num_rows, H, inter, P, max_rows, d.bn, d.group,
        hq.stride(0), h_s.stride(0), d.stride_e[0], d.stride_dn, d.stride_e[1], d.stride_sn, d.stride_sk,
        d.stride_e[2], d.stride_zn, stride_b2, y.stride(0),
        FMT=d.FMT, SCALE=d.SCALE, A8=a8_2, PRECISION=precision, HAS_BIAS=b2 is not None,
        SCALE_INPUT=bool(weight_on_input), **{**cfg2, "BLOCK_N": bn_down}, **launch,
    )
    return y.view(T, k, H).sum(dim=1)


def linear_config(M: int, device_type: str, elem_size: int = 2) -> dict:
    """Tiles of the dense quantized linear: 16-row tiles for decode, taller ones for prefill."""
    if device_type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if M <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif M <= 128:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    return fit_shared_memory(cfg, elem_size)


def qlinear_triton(x: torch.Tensor, w: QTensor, bias: torch.Tensor | None = None, *, config: dict | None = None,
                   fp8_act: bool | None = None) -> torch.Tensor:
    """x [M, K] @ w.T (+ bias [N]) -> [M, N] in x.dtype, w a QTensor [N, K] (any format; fp8 as W8A8
    where the device has fp8 dots, per-token / per-group activation scales as in `qmoe_triton`)."""
    q = _W(w, False)
    M, K = x.shape
    if K != q.K:
        raise FormatError(f"x has {K} inputs, the weight {q.K}")
    y = torch.empty(M, q.N, dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    x = x.contiguous()
    a8 = _use_a8(q, x, fp8_act)
    cfg, launch, _ = _config(config or linear_config(M, x.device.type, x.element_size()), q, a8)
    a, a_s = _activations(x, q, a8)
    b, _ = _bias_arg(bias, x)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(q.N, cfg["BLOCK_N"]),)
    _qlinear_kernel[grid](
        a, a_s, q.data_arg(a8), q.scale, q.zero, b, y, M, q.N, K, q.bn, q.group,
        a.stride(0), a_s.stride(0), q.stride_dn, q.stride_sn, q.stride_sk, q.stride_zn, y.stride(0),
        FMT=q.FMT, SCALE=q.SCALE, A8=a8, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        HAS_BIAS=bias is not None, **cfg, **launch,
    )
    return y
