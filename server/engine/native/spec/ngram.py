"""N-gram prompt lookup (vLLM's `ngram` method): the draft is what followed the latest earlier
occurrence of the sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min)
in its own prompt + output. Vectorised: numpy over the history, no per-token Python loop."""

from __future__ import annotations

import numpy as np

from server.engine.native.spec.proposer import Draft, DraftRequest, Proposer, TargetHidden


def ngram_lookup(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> np.ndarray:
    """Up to k tokens following the latest earlier match of the longest suffix n-gram
    (n_max >= n >= n_min) of `tokens` [N]; empty when none matches."""
    N = tokens.shape[0]
    if N < n_min + 1 or k < 1:
        return tokens[:0]
    n_max = min(n_max, N - 1)
    # run[i]: how many tokens ending at position i (i < N - 1) equal the suffix ending at N - 1
    cand = tokens[: N - 1]
    run = np.zeros(N - 1, np.int64)
    alive = np.ones(N - 1, bool)
    for l in range(n_max):  # n_max vector ops over the history
        same = np.zeros(N - 1, bool)
        if l < N - 1:
            same[l:] = cand[: N - 1 - l] == tokens[N - 1 - l]
        alive &= same
        run += alive
        if not alive.any():
            break
    best = int(run.max())
    if best < n_min:
        return tokens[:0]
    i = int(np.flatnonzero(run == best)[-1])  # the latest occurrence of the longest match
    return tokens[i + 1: i + 1 + k]


class NgramProposer(Proposer):
    method = "ngram"

    def __init__(self, k: int, n_min: int, n_max: int):
        self.k, self.n_min, self.n_max = k, n_min, n_max

    def propose(self, requests: list[DraftRequest], target: TargetHidden | None) -> list[Draft]:
        out = []
        for r in requests:  # a loop over sequences
            toks = np.fromiter(r.seq.token_ids, np.int64, len(r.seq.token_ids))
            out.append(Draft(ngram_lookup(toks, self.n_min, self.n_max, min(self.k, r.max_drafts)).tolist()))
        return out
