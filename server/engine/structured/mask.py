"""Token bitmasks: filled for a batch of grammar states, applied to the logits rows that have one.

A bitmask row is `ceil(vocab / 32)` int32 words; bit `t % 32` of word `t // 32` set means token
`t` is allowed. Filling runs on the CPU (xgrammar's batch fill, rows on its thread pool);
applying is one batched op over the constrained rows, on the logits' device, with no host sync:
- on CPU, xgrammar's kernel;
- elsewhere, a torch expression (bits unpacked to a `[rows, vocab]` boolean mask).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

from server.engine.structured.state import GrammarState

FILL_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))
_NEG_INF = float("-inf")


def num_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class MaskFiller:
    """Fills the bitmask rows of a list of states, now or on a worker thread (`submit`), so that
    the fill overlaps the model's forward pass (xgrammar's fill releases the GIL)."""

    def __init__(self, vocab_size: int, threads: int = FILL_THREADS, overlap: bool = True):
        self.vocab_size = vocab_size
        self.words = num_words(vocab_size)
        self._batch = xgr.BatchGrammarMatcher(threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask") if overlap else None

    def fill(self, states: list[GrammarState]) -> torch.Tensor:
        """[len(states), words] int32 on the CPU."""
        bitmask = torch.empty(len(states), self.words, dtype=torch.int32)
        if states:
            self._batch.batch_fill_next_token_bitmask([s.matcher for s in states], bitmask)
        return bitmask

    def submit(self, states: list[GrammarState]) -> Future:
        if self._pool is None:
            done: Future = Future()
            done.set_result(self.fill(states))
            return done
        return self._pool.submit(self.fill, states)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits[rows[i], t] = -inf where bit t of bitmask[i] is 0.

    logits: [num_rows, vocab] float; rows: [m] int64 (on the CPU); bitmask: [m, words] int32 (CPU).
    Columns past `words * 32` (none when the bitmask was sized for this vocabulary) are left alone.
    """
    if rows.numel() == 0:
        return
    vocab = logits.shape[1]
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
        # xgrammar's kernel reads bitmask row i for logits row i: spread the rows out
        full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32)  # [num_rows, words]
        full[rows] = bitmask
        xgr.apply_token_bitmask_inplace(logits, full, vocab_size=min(vocab, bitmask.shape[1] * 32),
                                        indices=rows.tolist(), backend="cpu")
        return
    dev = logits.device
    width = min(vocab, bitmask.shape[1] * 32)
    bits = torch.arange(32, dtype=torch.int32, device=dev)  # [32]
    words = bitmask.to(dev, non_blocking=True)  # [m, words]
    allowed = ((words.unsqueeze(-1) >> bits) & 1).view(words.shape[0], -1)[:, :width].bool()  # [m, width]
    idx = rows.to(dev, non_blocking=True)
    sub = logits[idx, :width]  # [m, width] (a copy)
    logits[idx, :width] = sub.masked_fill_(~allowed, _NEG_INF)
