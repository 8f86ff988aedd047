"""Fused MoE experts in Triton (after vLLM's `fused_moe`): two grouped-GEMM launches.

1. `_gate_up_kernel`: for each block of BLOCK_M aligned pairs (one expert) and BLOCK_N
   intermediate columns, both the gate and the up tile are accumulated from the same
   activation loads, and SiLU(gate) * up is written: h [P, I].
2. `_down_kernel`: h @ w2[e].T times the pair's routing weight: y [P, H].
The family variants are constexpr switches of the same kernels: biases (read in place from the
stacks' last column), gpt-oss's clamped SwiGLU, Llama 4's routing weight on the input.
Then each token sums its top_k rows (a deterministic reduce, no atomics).
Rows are sorted by expert and padded to the tile height by `_align_kernel` (one launch; the
PyTorch version, `moe_align.align_pairs`, is its reference), so the whole path has no host
sync and three launches plus the reduce.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from models.kernels.moe_align import AlignedPairs


@triton.jit
def _align_kernel(ids_ptr, pairs_ptr, block_experts_ptr, num_rows_ptr, P,
                  BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    # program e: count every expert's pairs, place expert e's run (stable, padded), label its blocks
    e = tl.program_id(0)
    offs_e = tl.arange(0, E_PAD)
    counts = tl.zeros([E_PAD], tl.int32)
    for c0 in range(0, P, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1).to(tl.int32)
        counts += tl.sum((ids[None, :] == offs_e[:, None]).to(tl.int32), 1)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M  # [E_PAD]
    start = tl.sum(tl.where(offs_e < e, padded, 0), 0)
    mine = tl.sum(tl.where(offs_e == e, counts, 0), 0)
    mine_padded = tl.sum(tl.where(offs_e == e, padded, 0), 0)
    if e == 0:
        tl.store(num_rows_ptr, tl.sum(padded, 0).to(tl.int64))
    running = tl.full([], 0, tl.int32)
    for c0 in range(0, P, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1).to(tl.int32)
        hit = (ids == e).to(tl.int32)
        rank = tl.cumsum(hit, 0) - 1 + running
        tl.store(pairs_ptr + start + rank, offs.to(tl.int64), mask=hit == 1)
        running += tl.sum(hit, 0)
    for p0 in range(0, mine_padded - mine, CHUNK):  # padding rows of the run
        offs = p0 + tl.arange(0, CHUNK)
        tl.store(pairs_ptr + start + mine + offs, tl.zeros([CHUNK], tl.int64) + P, mask=mine + offs < mine_padded)
    n_blocks = mine_padded // BLOCK_M
    for b0 in range(0, n_blocks, CHUNK):
        offs = b0 + tl.arange(0, CHUNK)
        tl.store(block_experts_ptr + start // BLOCK_M + offs, tl.zeros([CHUNK], tl.int64) + e, mask=offs < n_blocks)


def align_pairs_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedPairs:
    """`moe_align.align_pairs` in one launch (rows past `num_rows` are left unwritten)."""
    flat = topk_ids.reshape(-1)
    P = flat.numel()
    max_rows = -(-(P + num_experts * (block_m - 1)) // block_m) * block_m
    pairs = torch.empty(max_rows, dtype=torch.int64, device=flat.device)
    block_experts = torch.empty(max_rows // block_m, dtype=torch.int64, device=flat.device)
    num_rows = torch.empty(1, dtype=torch.int64, device=flat.device)
    e_pad = triton.next_power_of_2(num_experts)
    chunk = max(16, min(1024, 8192 // e_pad))
    _align_kernel[(num_experts,)](flat, pairs, block_experts, num_rows, P, BLOCK_M=block_m, E_PAD=e_pad,
                                  CHUNK=chunk, num_warps=4)
    return AlignedPairs(pairs, block_experts, num_rows, block_m)


@triton.jit
def _tile_ids(pid, num_rows_max, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped ordering: programs sharing weight columns run close together (L2 reuse)
    num_pid_m = tl.cdiv(num_rows_max, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n


@triton.jit
def _swiglu(acc_g, acc_u, limit, alpha, CLAMP: tl.constexpr):
    """SiLU(gate) * up; CLAMP: gpt-oss's (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g),
    g = min(gate, limit) (shared by the float and the quantized gate/up kernels)."""
    if CLAMP:
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        h = g / (1.0 + tl.exp(-alpha * g)) * (u + 1.0)
    else:
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    return h


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, h_ptr, pairs_ptr, block_experts_ptr, num_rows_ptr, weights_ptr,
    N, K, num_pairs, num_rows_max, limit, alpha,
    stride_xm, stride_we, stride_wn, stride_hm,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr, SCALE_INPUT: tl.constexpr,
):
    # x [T, K]; w [E, 2N, K] (gate rows, then up rows; K contiguous; HAS_BIAS: the bias in column
    # K, the rows stride_wn = K + 1 apart); h [P, N]. CLAMP: gpt-oss's clamped SwiGLU with `limit`
    # and `alpha`; SCALE_INPUT: each row of x times its pair's routing weight (Llama 4)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_rows_max, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    offs_row = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + offs_row)  # [BLOCK_M]
    row_mask = pair < num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + (pair // TOP_K)[:, None] * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SCALE_INPUT:
        rw = tl.load(weights_ptr + pair, mask=row_mask, other=0.0)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if SCALE_INPUT:
            a = (a * rw.to(a.dtype)[:, None]).to(a.dtype)
        wg = tl.load(g_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc_g = tl.dot(a, wg, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, wu, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    if HAS_BIAS:
        b_ptrs = w_ptr + expert * stride_we + offs_n * stride_wn + K
        acc_g += tl.load(b_ptrs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(b_ptrs + N * stride_wn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = _swiglu(acc_g, acc_u, limit, alpha, CLAMP)
    tl.store(h_ptr + pair[:, None] * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, y_ptr, weights_ptr, pairs_ptr, block_experts_ptr, num_rows_ptr,
    N, K, num_pairs, num_rows_max,
    stride_hm, stride_we, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr, SCALE_INPUT: tl.constexpr,
):
    # h [P, K]; w [E, N, K] (K contiguous; HAS_BIAS: the bias in column K); y [P, N] = routing
    # weight * (h @ w[e].T + bias) (SCALE_INPUT: the weight was applied to the input instead)
    pid_m, pid_n = _tile_ids(tl.program_id(0), num_rows_max, N, BLOCK_M, BLOCK_N, GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_rows_ptr):
        return
    offs_row = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(pairs_ptr + offs_row)
    row_mask = pair < num_pairs
    expert = tl.load(block_experts_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + pair[:, None] * stride_hm + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(w_ptr + expert * stride_we + offs_n * stride_wn + K, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if not SCALE_INPUT:
        w = tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    tl.store(y_ptr + pair[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


SMEM_BUDGET = 200 * 1024  # bytes of shared memory a config may plan for (H100/H200: 227 KB per block)


def tile_config(num_pairs: int, num_experts: int, device_type: str, elem_size: int = 2) -> dict:
    """Block sizes by rows per expert: 16-row tiles for decode (few rows per expert), taller
    tiles as the rows grow. These are the tiles measured on an H200 (docs/benchmarks.md);
    `python -m loadtest gpu --moe-sweep` times alternatives. float32 tiles are shrunk to fit
    shared memory (`fit_shared_memory`)."""
    rows = num_pairs / num_experts
    if device_type != "cuda":  # the interpreter (tests): small tiles, fast to emulate
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_N_DOWN=32, BLOCK_K=32, GROUP_M=4, num_warps=4, num_stages=1)
    if rows <= 16:
        cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif rows <= 64:
        cfg = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    elif rows <= 512:
        cfg = dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3)
    cfg["BLOCK_N_DOWN"] = cfg["BLOCK_N"]
    return fit_shared_memory(cfg, elem_size)


def fit_shared_memory(cfg: dict, elem_size: int) -> dict:
    """Fewer pipeline stages, then a shorter K tile, until the gate+up kernel's tiles (one
    activation tile, two weight tiles per stage) fit: float32 needs twice bf16's room."""
    cfg = dict(cfg)

    def need(c):
        return c["num_stages"] * (c["BLOCK_M"] * c["BLOCK_K"] + 2 * c["BLOCK_K"] * c["BLOCK_N"]) * elem_size

    while need(cfg) > SMEM_BUDGET and cfg["num_stages"] > 2:
        cfg["num_stages"] -= 1
    while need(cfg) > SMEM_BUDGET and cfg["BLOCK_K"] > 32:
        cfg["BLOCK_K"] //= 2
    return cfg


def fused_moe_triton(x, w13, w2, topk_ids, topk_w, config: dict | None = None, bias: bool = False,
                     limit: float | None = None, alpha: float = 1.702, weight_on_input: bool = False) -> torch.Tensor:
    """The Triton grouped GEMMs (shapes as `fused_moe.fused_experts`): pairs aligned per expert on
    the device, gate+up with SiLU-and-mul fused, then down times the routing weight; no host sync.
    The family variants (`fused_moe.ExpertVariant`): `bias` (the stacks' last column, read in
    place), the clamped SwiGLU where `limit` is given, `weight_on_input`."""
    T, k = topk_ids.shape
    E, two_i, H = w13.shape
    H -= 1 if bias else 0
    inter = two_i // 2
    P = T * k
    if T == 0:
        return torch.zeros_like(x)
    assert x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1
    cfg = dict(config or tile_config(P, E, x.device.type, x.element_size()))
    launch = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    bn_down = cfg.pop("BLOCK_N_DOWN", cfg["BLOCK_N"])
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    aligned = align_pairs_triton(topk_ids, E, bm)
    max_rows = aligned.sorted_pairs.numel()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    h = torch.empty(P, inter, dtype=x.dtype, device=x.device)  # [P, I]
    weights = topk_w.reshape(-1).contiguous()  # [P]
    variant = dict(HAS_BIAS=bool(bias), SCALE_INPUT=bool(weight_on_input))
    grid1 = (triton.cdiv(max_rows, bm) * triton.cdiv(inter, bn),)
    _gate_up_kernel[grid1](
        x, w13, h, aligned.sorted_pairs, aligned.block_experts, aligned.num_rows, weights,
        inter, H, P, max_rows, float(limit or 0.0), float(alpha),
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        TOP_K=k, PRECISION=precision, CLAMP=limit is not None, **variant, **cfg, **launch,
    )
    y = torch.empty(P, H, dtype=x.dtype, device=x.device)  # [P, H] weighted expert outputs
    grid2 = (triton.cdiv(max_rows, bm) * triton.cdiv(H, bn_down),)
    _down_kernel[grid2](
        h, w2, y, weights, aligned.sorted_pairs, aligned.block_experts, aligned.num_rows,
        H, inter, P, max_rows,
        h.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        PRECISION=precision, **variant, **{**cfg, "BLOCK_N": bn_down}, **launch,
    )
    return y.view(T, k, H).sum(dim=1)


# -- the registered operator (what model code calls: visible to torch.profiler and torch.compile)
@torch.library.custom_op("moe_serve::fused_moe_triton", mutates_args=())
def fused_moe_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor,
                 topk_w: torch.Tensor, bias: bool = False, limit: float | None = None, alpha: float = 1.702,
                 weight_on_input: bool = False) -> torch.Tensor:
    """`fused_moe_triton` with the default tile configuration, as `torch.ops.moe_serve.fused_moe_triton`."""
    return fused_moe_triton(x, w13, w2, topk_ids, topk_w, bias=bias, limit=limit, alpha=alpha,
                            weight_on_input=weight_on_input)


@fused_moe_op.register_fake
def _(x, w13, w2, topk_ids, topk_w, bias=False, limit=None, alpha=1.702, weight_on_input=False):
    return x.new_empty(x.shape)
