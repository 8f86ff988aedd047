"""The verify half of a step: the sequences scheduled with drafts get their k + 1 logits rows
turned into target distributions (the sampler's own processing, per position) and their drafts
accepted or rejected (`rejection.py`); logprobs are those of the emitted tokens, computed as
without speculation (log_softmax of the raw logits, after a structured-output mask)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from server.engine.native.sampler import Sampler, SamplingRow, _needs_processing
from server.engine.native.spec.rejection import accept_greedy, accept_sampled
from server.engine.native.warp import warp_logits
from server.engine.request import Logprob

if TYPE_CHECKING:
    from server.engine.native.sequence import Sequence


@dataclass
class VerifyItem:
    seq: Sequence
    first_row: int  # its first logits row (k + 1 rows)
    num_spec: int  # k


def verify(sampler: Sampler, logits: torch.Tensor, items: list[VerifyItem], eos_token_ids: tuple[int, ...]
           ) -> list[tuple[list[int], list[Logprob | None], int]]:
    """Per item: (emitted tokens, their logprobs, drafts accepted)."""
    rows: list[SamplingRow] = []
    index: list[int] = []
    mask_rows: list[int] = []
    mask_parts: list[torch.Tensor] = []
    for it in items:
        seq = it.seq
        drafts = seq.spec_tokens[: it.num_spec]
        for i in range(it.num_spec + 1):
            # position i: the drafts before it count as output (penalties, min_tokens)
            rows.append(SamplingRow(seq.params, seq.generator, seq.request.prompt_token_ids,
                                    seq.output_ids + drafts[:i] if i else seq.output_ids,
                                    eos_token_ids, seq.sampling_cache))
            index.append(it.first_row + i)
        if seq.spec_masks is not None:
            mask_rows.extend(range(len(rows) - it.num_spec - 1, len(rows)))
            mask_parts.append(seq.spec_masks[: it.num_spec + 1])
    raw = logits[torch.tensor(index, device=logits.device)][:, : sampler.vocab_size]  # [R, vocab]
    if mask_rows:
        from server.engine.structured.mask import apply_bitmask

        raw = raw.to(torch.float32).contiguous()
        apply_bitmask(raw, torch.tensor(mask_rows, dtype=torch.long), torch.cat(mask_parts))
    x = sampler.process_logits(raw, rows) if any(_needs_processing(r) for r in rows) else raw.float()
    results: list[tuple[list[int], list[Logprob | None], int]] = []
    r0 = 0
    greedy_argmax = x.argmax(dim=-1).tolist()
    emitted_rows: list[int] = []
    emitted_tokens: list[int] = []
    for it in items:
        seq = it.seq
        drafts = seq.spec_tokens[: it.num_spec]
        n = it.num_spec + 1
        if seq.params.greedy:
            tokens, a = accept_greedy(greedy_argmax[r0: r0 + n], drafts)
        else:
            y = warp_logits(x[r0: r0 + n], [seq.params] * n)
            p = y.softmax(dim=-1)  # [k + 1, vocab]
            q = None if seq.spec_probs is None else seq.spec_probs[: it.num_spec]
            tokens, a = accept_sampled(p, drafts, q, seq.generator, sampler.generator)
        no_lps: list[Logprob | None] = [None] * len(tokens)
        results.append((tokens, no_lps, a))
        if seq.params.logprobs is not None:
            emitted_rows.extend(range(r0, r0 + len(tokens)))
            emitted_tokens.extend(tokens)
        r0 += n
    if emitted_rows:
        sel = torch.tensor(emitted_rows, device=raw.device)
        lps = Sampler._logprobs(raw[sel], torch.tensor(emitted_tokens, device=raw.device),
                                [rows[i] for i in emitted_rows])
        k = 0
        for (tokens, out_lps, _), it in zip(results, items):
            if it.seq.params.logprobs is not None:
                out_lps[:] = lps[k: k + len(tokens)]
                k += len(tokens)
    return results
