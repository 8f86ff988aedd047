"""Temperature, min_p, top_k and top_p for the sampler's random rows (vLLM v1 semantics)."""

from __future__ import annotations

import math

import torch

from server.engine.request import SamplingParams

_NEG_INF = float("-inf")


def warp_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p for non-greedy rows: a new float32 [n, vocab] tensor.

    Removed tokens are -inf. Each filter touches only the rows that use it (in place when
    that is every row, else gathered and written back).
    """
    dev, n, vocab = logits.device, logits.shape[0], logits.shape[1]
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    y = logits.float() / temp.unsqueeze(1)  # [n, vocab]  (a fresh tensor, ours to modify)

    def filtered(rows: list[int], fn) -> None:  # fn(sub [m, vocab] ours to modify) -> [m, vocab]
        if len(rows) == n:
            out = fn(y)
            if out is not y:
                y.copy_(out)
        else:
            r_idx = torch.tensor(rows, device=dev)
            y[r_idx] = fn(y[r_idx])

    # min_p: prob < min_p * max_prob  <=>  logit < max_logit + log(min_p); no softmax needed.
    mp_rows = [j for j, p in enumerate(params) if p.min_p > 0.0]
    if mp_rows:
        log_mp = torch.tensor([math.log(params[j].min_p) for j in mp_rows], device=dev)  # [m]

        def min_p(sub: torch.Tensor) -> torch.Tensor:
            thresh = sub.amax(dim=-1) + log_mp  # [m]
            return sub.masked_fill_(sub < thresh.unsqueeze(1), _NEG_INF)

        filtered(mp_rows, min_p)

    # top_p rows: one full sort (their top_k applied on the sorted logits too);
    # top_k-only rows: topk for the k-th largest value, no sort.
    def k_of(p: SamplingParams) -> int:
        return p.top_k if 0 < p.top_k < vocab else 0

    tk_rows = [j for j, p in enumerate(params) if p.top_p >= 1.0 and k_of(p)]
    if tk_rows:
        ks = [k_of(params[j]) for j in tk_rows]
        k_idx = torch.tensor(ks, device=dev).unsqueeze(1) - 1  # [m, 1]

        def top_k(sub: torch.Tensor) -> torch.Tensor:
            top_vals = sub.topk(max(ks), dim=-1).values  # [m, max_k] descending
            kth = top_vals.gather(1, k_idx)  # [m, 1]
            return sub.masked_fill_(sub < kth, _NEG_INF)  # ties with the k-th value are kept

        filtered(tk_rows, top_k)

    tp_rows = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if tp_rows:
        ks = [k_of(params[j]) for j in tp_rows]
        top_p = torch.tensor([params[j].top_p for j in tp_rows], dtype=torch.float32, device=dev)  # [m]

        def top_k_top_p(sub: torch.Tensor) -> torch.Tensor:
            sub_sorted, order = sub.sort(dim=-1)  # [m, vocab] ascending, [m, vocab]
            if any(ks):
                # k-th largest sits at position vocab - k; k == 0 (off) -> position 0 (keeps all)
                pos = torch.tensor([vocab - k if k else 0 for k in ks], device=dev).unsqueeze(1)  # [m, 1]
                sub_sorted.masked_fill_(sub_sorted < sub_sorted.gather(1, pos), _NEG_INF)
            cum = sub_sorted.softmax(dim=-1).cumsum_(dim=-1)  # [m, vocab] ascending cumulative probs
            drop = cum <= (1.0 - top_p).unsqueeze(1)  # [m, vocab]
            drop[:, -1] = False  # always keep the most likely token
            sub_sorted.masked_fill_(drop, _NEG_INF)
            return sub.scatter_(1, order, sub_sorted)

        filtered(tp_rows, top_k_top_p)
    return y
