"""A step's model inputs, built on the host with array ops into preallocated buffers.

Token ids, positions, KV slots, sequence lengths, block tables and logit rows are written
into fixed host buffers (pinned on CUDA) and copied to fixed device buffers without blocking,
once per step; on the CPU the host buffers are the device buffers. Nothing loops over tokens
in Python: positions and slots come from numpy over the per-sequence starts. The device
buffers never move, which is what a CUDA graph needs from its inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from server.engine.native.outputs import SchedulerOutput


@dataclass
class StepInputs:
    num_tokens: int
    num_decodes: int  # leading sequences with exactly one new token
    query_start_loc: list[int]  # [num_seqs + 1]
    seq_lens: list[int]  # [num_seqs] context length after this step
    width: int  # longest block table this step
    num_logit_rows: int
    sample_rows: dict[int, int]  # position in `scheduled` -> logits row of its last token (the first of k + 1 with drafts)
    prompt_rows: dict[int, tuple[int, int]]  # position in `scheduled` -> (first row, count)
    # speculative decoding: the attention's own view of the step, where each sequence verifying
    # k drafts is k + 1 one-token decode rows (row i sees the context up to its own position,
    # the step's KV being written first) so verify steps take the decode kernel:
    # (num_decodes, query_start_loc, seq_lens, block_tables, decode_seq_lens); None: as above
    attention: tuple | None = None
    # async scheduling: (token row, position in `scheduled`) of input ids the host does not know
    # yet (a placeholder 0 in `ids`; the previous step's sampled ids on the device fill them)
    pending: list[tuple[int, int]] = field(default_factory=list)
    copy_sizes: tuple[int, int, int] = (0, 0, 0)  # (rows, seqs, logit rows) `copy` moves

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)


class StepBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, device: torch.device):
        self.device = device
        self.separate_device = device.type == "cuda"  # on the CPU too with async scheduling
        self._alloc(max_tokens, max_seqs, max_blocks)
        self._copied: torch.cuda.Event | None = None

    def split_device(self) -> None:
        """Device buffers of their own on the CPU too (async scheduling: the host fills the next
        step's buffers while the device thread's forward reads this step's)."""
        if not self.separate_device:
            self.separate_device = True
            self.dev = {k: t.clone() for k, t in self.host.items()}

    def _alloc(self, max_tokens: int, max_seqs: int, max_blocks: int) -> None:
        cuda = self.device.type == "cuda"
        sizes = {"ids": max_tokens, "positions": max_tokens, "slots": max_tokens, "seg": max_tokens,
                 "logit_rows": max_tokens, "seq_lens": max_seqs, "state_slots": max_seqs}
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        self.host = {k: torch.zeros(n, dtype=torch.int64, pin_memory=cuda) for k, n in sizes.items()}
        self.host["tables"] = torch.zeros(max_seqs, max_blocks, dtype=torch.int64, pin_memory=cuda)
        self.np = {k: t.numpy() for k, t in self.host.items()}  # writable views of the same memory
        self.dev = ({k: t.to(self.device, copy=True) for k, t in self.host.items()} if self.separate_device
                    else self.host)

    def _ensure(self, tokens: int, seqs: int, blocks: int) -> None:
        if tokens > self.max_tokens or seqs > self.max_seqs or blocks > self.max_blocks:
            # never with the engine's limits; a CUDA graph captured on the old buffers is dropped by the runner
            self._alloc(max(tokens, self.max_tokens), max(seqs, self.max_seqs), max(blocks, self.max_blocks))

    def prepare(self, batch: SchedulerOutput, block_size: int, pad_slot: int, pad_to: int = 0,
                pad_state_slot: int = 0, copy: bool = True) -> StepInputs:
        """Fill the buffers for `batch`; with `pad_to` > num tokens (a decode-only batch run as
        a larger CUDA-graph bucket), the extra rows get token 0 at position 0, KV slot
        `pad_slot` (a scratch block) and length 0 (attention writes zeros for them). Each
        sequence's state slot (hybrid models) goes to `state_slots`; `pad_state_slot` (a
        scratch row) where it has none. `copy=False`: the caller calls `copy` later (async
        scheduling: on the device thread, in order with the forwards)."""
        sched = batch.scheduled
        S = len(sched)
        # (num_inflight: tokens of a step still in flight, async scheduling)
        starts = np.fromiter((it.seq.num_computed + it.seq.num_inflight for it in sched), np.int64, S)  # [S]
        counts = np.fromiter((it.num_new for it in sched), np.int64, S)  # [S]
        loc = np.zeros(S + 1, np.int64)
        np.cumsum(counts, out=loc[1:])
        T = int(loc[-1])
        width = max(len(it.seq.blocks.table) for it in sched)
        self._ensure(max(T, pad_to), max(S, pad_to), width)
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copies have left the host buffers
        h = self.np
        ids: list[int] = []
        logit_rows: list[int] = []
        sample_rows: dict[int, int] = {}
        prompt_rows: dict[int, tuple[int, int]] = {}
        pending: list[tuple[int, int]] = []
        tables = h["tables"]
        for j, it in enumerate(sched):  # a loop over sequences, not tokens
            seq = it.seq
            start, end = int(starts[j]), int(starts[j] + counts[j])
            if it.num_spec:  # its last token, then the drafts to verify (never with async scheduling)
                ids.extend(seq.token_ids[start:])
                ids.extend(seq.spec_tokens[: it.num_spec])
            else:
                ids.extend(seq.token_ids[start:end])
                if end > len(seq.token_ids):  # its last token is still on the device (async scheduling)
                    pending.append((len(ids), j))
                    ids.append(0)
            table = seq.blocks.table
            tables[j, : len(table)] = table
            h["state_slots"][j] = seq.state_slots[0] if seq.state_slots else pad_state_slot
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens:
                # logits at positions start..min(end, prompt)-1 predict prompt tokens start+1..
                last = min(end, seq.num_prompt_tokens)
                n = last - start - (1 if last == seq.num_prompt_tokens else 0)
                if n > 0:
                    prompt_rows[j] = (len(logit_rows), n)
                    logit_rows.extend(range(int(loc[j]), int(loc[j]) + n))
            if it.samples:  # its last token's row; with k drafts, the last k + 1 rows
                sample_rows[j] = len(logit_rows)
                logit_rows.extend(range(int(loc[j + 1]) - 1 - it.num_spec, int(loc[j + 1])))
        seg = np.repeat(np.arange(S, dtype=np.int64), counts)  # [T] sequence of each token
        pos = starts[seg] + (np.arange(T, dtype=np.int64) - loc[seg])  # [T]
        h["ids"][:T] = ids
        h["positions"][:T] = pos
        h["seg"][:T] = seg
        h["slots"][:T] = tables[seg, pos // block_size] * block_size + pos % block_size
        h["seq_lens"][:S] = starts + counts
        h["logit_rows"][: len(logit_rows)] = logit_rows
        n_rows = max(T, pad_to)
        if pad_to > T:
            h["ids"][T:pad_to] = 0
            h["positions"][T:pad_to] = 0
            h["slots"][T:pad_to] = pad_slot
            h["seg"][T:pad_to] = 0
            h["seq_lens"][S:pad_to] = 0
            h["state_slots"][S:pad_to] = pad_state_slot
        sizes = (n_rows, max(S, pad_to), len(logit_rows))
        if copy:
            self.copy(sizes)
        num_decodes = int(np.argmax(counts != 1)) if (counts != 1).any() else S
        spec = np.fromiter((it.num_spec for it in sched), np.int64, S)  # [S]
        attention = self._verify_rows(starts, counts, spec, width) if spec.any() else None
        return StepInputs(T, num_decodes, loc.tolist(), (starts + counts).tolist(), width, len(logit_rows),
                          sample_rows, prompt_rows, attention, pending, sizes)

    def _verify_rows(self, starts: np.ndarray, counts: np.ndarray, spec: np.ndarray, width: int) -> tuple:
        """The attention rows of a step with drafts (`StepInputs.attention`); the sequences with
        drafts come before the prefill chunks (the scheduler's order)."""
        S = len(counts)
        per = np.where(spec > 0, spec + 1, 1)  # [S] attention rows of each sequence
        src = np.repeat(np.arange(S), per)  # [R] the sequence of each row
        within = np.arange(len(src)) - np.repeat(np.cumsum(per) - per, per)  # [R] index inside its sequence
        one = spec[src] > 0
        a_counts = np.where(one, 1, counts[src])  # [R]
        a_lens = np.where(one, starts[src] + within + 1, starts[src] + counts[src])  # [R]
        a_loc = np.zeros(len(src) + 1, np.int64)
        np.cumsum(a_counts, out=a_loc[1:])
        nd = int(np.argmax(a_counts != 1)) if (a_counts != 1).any() else len(src)
        tables = torch.from_numpy(self.np["tables"][src, :width]).to(self.device)  # [R, width] (a copy)
        lens = torch.from_numpy(a_lens[:nd].copy()).to(self.device)  # [nd]
        return nd, a_loc.tolist(), a_lens.tolist(), tables, lens

    def copy(self, sizes: tuple[int, int, int]) -> None:
        """The host buffers' first (rows, seqs, logit rows) to the device buffers."""
        if self.dev is self.host:
            return
        n_rows, n_seqs, n_logits = sizes
        for k in ("ids", "positions", "slots", "seg"):
            self.dev[k][:n_rows].copy_(self.host[k][:n_rows], non_blocking=True)
        self.dev["logit_rows"][:n_logits].copy_(self.host["logit_rows"][:n_logits], non_blocking=True)
        self.dev["seq_lens"][:n_seqs].copy_(self.host["seq_lens"][:n_seqs], non_blocking=True)
        self.dev["state_slots"][:n_seqs].copy_(self.host["state_slots"][:n_seqs], non_blocking=True)
        self.dev["tables"][:n_seqs].copy_(self.host["tables"][:n_seqs], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
