"""Verification of drafted tokens: the target's logits at the k + 1 positions of a sequence
with k drafts decide how many drafts stay and which token follows them.

- greedy rows: the longest prefix of drafts equal to the target's argmax, then the target's
  argmax at the first mismatch (or the bonus position): exactly the tokens plain greedy
  decoding would produce.
- sampled rows (standard speculative sampling, Leviathan et al. / Chen et al.): draft d_i with
  draft probability q_i is kept with probability min(1, p_i(d_i) / q_i(d_i)); at the first
  rejection the token is drawn from norm(max(0, p_i - q_i)); if all k stay, the bonus token is
  drawn from p_k. Deterministic drafts (n-gram) have one-hot q: keep with probability p_i(d_i),
  else draw from p_i with d_i removed. The output follows the target distribution exactly.

p is the target's distribution after all of the sampler's processing (structured-output mask,
penalties, logit bias, min_tokens, temperature, top-k/top-p/min-p), computed per position with
the drafts before it counted as output. Random numbers: a seeded request draws its uniforms
from its own generator ([k] for the acceptance tests, then one [vocab] draw for the final
token), so a seeded request's output is reproducible whatever else runs beside it.
"""

from __future__ import annotations

import torch

_TINY = 1e-30


def race(probs: torch.Tensor, generator: torch.Generator | None, fallback: torch.Generator) -> int:
    """One draw from `probs` [vocab] (unnormalised allowed) by the exponential race."""
    u = torch.empty_like(probs, dtype=torch.float32)
    u.uniform_(generator=generator if generator is not None else fallback)
    q = u.log_().neg_()
    return int((probs / q).argmax())


def accept_sampled(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                   generator: torch.Generator | None, fallback: torch.Generator) -> tuple[list[int], int]:
    """p [k + 1, vocab] target probabilities, drafts [k], q [k, vocab] draft probabilities or
    None (one-hot). Returns (emitted tokens, number of drafts accepted)."""
    k = len(drafts)
    gen = generator if generator is not None else fallback
    if k:
        d = torch.tensor(drafts, dtype=torch.long, device=p.device)
        p_d = p[:k].gather(1, d[:, None])[:, 0]  # [k]
        q_d = torch.ones_like(p_d) if q is None else q.gather(1, d[:, None].to(q.device))[:, 0].to(p_d)
        ratio = p_d / q_d.clamp_min(_TINY)
        u = torch.empty(k, dtype=torch.float32, device=p.device).uniform_(generator=gen)
        rejected = (u >= ratio).nonzero()
        a = int(rejected[0, 0]) if rejected.numel() else k
    else:
        a = 0
    if a < k:
        if q is None:
            residual = p[a].clone()
            residual[drafts[a]] = 0.0
        else:
            residual = (p[a] - q[a].to(p)).clamp_min_(0.0)
        if float(residual.sum()) <= 0.0:  # p == q up to rounding: any draw from p is exact
            residual = p[a]
        final = race(residual, generator, fallback)
    else:
        final = race(p[k], generator, fallback)
    return drafts[:a] + [final], a


def accept_greedy(argmax: list[int], drafts: list[int]) -> tuple[list[int], int]:
    """argmax [k + 1] target tokens, drafts [k]. (emitted tokens, number accepted)."""
    a = 0
    while a < len(drafts) and drafts[a] == argmax[a]:  # a loop over at most k drafts
        a += 1
    return drafts[:a] + [argmax[a]], a
