"""The router's expert choice in one Triton launch (`models/layers/router.py` `select_experts`).

One program per token: the scores (softmax over the experts, sigmoid, or the raw logits for a
softmax over the top-k), the correction bias added for the choice, the groups outside the best
`topk_group` of `n_group` masked (a group scored by its best expert or its best two summed),
then top-k by repeated arg-max (ties to the lower id), the weights gathered from the unbiased
scores, renormalised and scaled. Registered as `torch.ops.moe_serve.route_triton` (CUDA; CPU
tensors under TRITON_INTERPRET=1). The CPU's counterpart is the C op `moe_route_cpu`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SCORINGS = {"softmax": 0, "sigmoid": 1, "softmax_topk": 2}


@triton.jit
def _route_kernel(
    logits_ptr, bias_ptr, w_ptr, ids_ptr, E, stride_l, renorm_min, scaling,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, SCORING: tl.constexpr, HAS_BIAS: tl.constexpr,
    RENORM: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_TOP2: tl.constexpr,
    G_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    neg = float("-inf")
    logits = tl.load(logits_ptr + t * stride_l + offs, mask=valid, other=neg).to(tl.float32)
    if SCORING == 0:
        ex = tl.exp(logits - tl.max(logits, 0))
        ex = tl.where(valid, ex, 0.0)
        scores = ex / tl.sum(ex, 0)
    elif SCORING == 1:
        scores = tl.sigmoid(logits)
    else:
        scores = logits
    choice = scores
    if HAS_BIAS:
        choice = choice + tl.load(bias_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    choice = tl.where(valid, choice, neg)
    if N_GROUP > 1 and TOPK_GROUP < N_GROUP:
        per_group = E // N_GROUP
        group = offs // per_group
        offs_g = tl.arange(0, G_PAD)
        gscore = tl.full([G_PAD], neg, tl.float32)
        for g in tl.static_range(N_GROUP):
            mine = tl.where(group == g, choice, neg)
            best = tl.max(mine, 0)
            s = best
            if GROUP_TOP2:
                first = tl.argmax(mine, 0)
                s = best + tl.max(tl.where(offs == first, neg, mine), 0)
            gscore = tl.where(offs_g == g, s, gscore)
        keep = tl.zeros([BLOCK_E], tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            gb = tl.argmax(gscore, 0)
            keep = keep | (group == gb)
            gscore = tl.where(offs_g == gb, neg, gscore)
        choice = tl.where(keep & valid, choice, neg)
    offs_k = tl.arange(0, K_PAD)
    wk = tl.zeros([K_PAD], tl.float32)
    ik = tl.zeros([K_PAD], tl.int64)
    taken = offs >= E
    for r in tl.static_range(TOP_K):
        # arg-max among the experts not taken yet (a masked -inf still beats a taken one)
        cand = tl.where(taken, neg, choice)
        best = tl.max(cand, 0)
        idx = tl.min(tl.where((cand == best) & ~taken, offs, BLOCK_E), 0)
        taken = taken | (offs == idx)
        wk = tl.where(offs_k == r, tl.sum(tl.where(offs == idx, scores, 0.0), 0), wk)
        ik = tl.where(offs_k == r, idx.to(tl.int64), ik)
    kmask = offs_k < TOP_K
    if SCORING == 2:  # softmax over the chosen logits
        ex = tl.where(kmask, tl.exp(wk - tl.max(tl.where(kmask, wk, neg), 0)), 0.0)
        wk = ex / tl.sum(ex, 0)
    elif RENORM:
        wk = wk / tl.maximum(tl.sum(tl.where(kmask, wk, 0.0), 0), renorm_min)
    wk = wk * scaling
    tl.store(w_ptr + t * TOP_K + offs_k, wk, mask=kmask)
    tl.store(ids_ptr + t * TOP_K + offs_k, ik, mask=kmask)


def route_triton(logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, scoring: str,
                 renormalize: bool, renorm_min: float, n_group: int, topk_group: int, group_score: str,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 -> (weights [T, k] float32, ids [T, k] int64), as `select_experts`."""
    T, E = logits.shape
    if scoring not in SCORINGS or group_score not in ("max", "top2_sum"):
        raise ValueError(f"route_triton: scoring {scoring!r} / group score {group_score!r}")
    if not (1 <= top_k <= E and n_group >= 1 and E % n_group == 0 and 1 <= topk_group <= n_group):
        raise ValueError(f"route_triton: top_k {top_k}, groups {n_group}/{topk_group} for {E} experts")
    logits = logits.float()
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T == 0:
        return w, ids
    bias = correction_bias.float().contiguous() if correction_bias is not None else logits
    _route_kernel[(T,)](
        logits, bias, w, ids, E, logits.stride(0), float(renorm_min), float(scaling),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), SCORING=SCORINGS[scoring],
        HAS_BIAS=correction_bias is not None and scoring != "softmax_topk", RENORM=bool(renormalize),
        N_GROUP=n_group if scoring != "softmax_topk" else 1, TOPK_GROUP=topk_group,
        GROUP_TOP2=group_score == "top2_sum", G_PAD=triton.next_power_of_2(n_group), BLOCK_E=triton.next_power_of_2(E), num_warps=1,
    )
    return w, ids


@torch.library.custom_op("moe_serve::route_triton", mutates_args=())
def route_op(logits: torch.Tensor, correction_bias: torch.Tensor | None, top_k: int, scoring: str,
             renormalize: bool, renorm_min: float, n_group: int, topk_group: int, group_score: str,
             scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`route_triton` as `torch.ops.moe_serve.route_triton` (visible to torch.compile and the profiler)."""
    return route_triton(logits, correction_bias, top_k, scoring, renormalize, renorm_min, n_group, topk_group,
                        group_score, scaling)


@route_op.register_fake
def _(logits, correction_bias, top_k, scoring, renormalize, renorm_min, n_group, topk_group, group_score, scaling):
    T = logits.shape[0]
    return logits.new_empty(T, top_k, dtype=torch.float32), logits.new_empty(T, top_k, dtype=torch.int64)
