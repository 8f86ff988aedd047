"""Logprobs of chosen tokens plus the top-k alternatives, from logits (sampled and prompt tokens)."""

from __future__ import annotations

import torch

from server.engine.request import Logprob

# compute_logprobs works in row chunks of at most this many [rows * vocab] elements
CHUNK_ELEMS = 1 << 25


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[Logprob]:
    """Logprob of token_ids[i] under log_softmax(logits[i]) plus the top-k (id, logprob), best first.

    logits: [N, vocab] (any float dtype; computed in float32), token_ids: [N].
    Works in row chunks so prompt logprobs over long prompts stay within bounded memory.
    """
    n, vocab = logits.shape
    k = max(0, min(k, vocab))
    token_ids = token_ids.to(device=logits.device, dtype=torch.long)
    chunk = max(1, CHUNK_ELEMS // max(vocab, 1))
    chosen_parts, top_v_parts, top_i_parts = [], [], []
    for start in range(0, n, chunk):
        lp = torch.log_softmax(logits[start : start + chunk].float(), dim=-1)  # [c, vocab]
        ids = token_ids[start : start + chunk].unsqueeze(1)  # [c, 1]
        chosen_parts.append(lp.gather(1, ids).squeeze(1))  # [c]
        if k:
            top = lp.topk(k, dim=-1)  # values/indices [c, k], descending
            top_v_parts.append(top.values)
            top_i_parts.append(top.indices)
    if n == 0:
        return []
    chosen = torch.cat(chosen_parts).tolist()
    ids_list = token_ids.tolist()
    if not k:
        return [Logprob(t, v) for t, v in zip(ids_list, chosen)]
    top_v = torch.cat(top_v_parts).tolist()
    top_i = torch.cat(top_i_parts).tolist()
    return [
        Logprob(t, v, list(zip(ti, tv)))
        for t, v, ti, tv in zip(ids_list, chosen, top_i, top_v)
    ]
