"""The scheduler: which sequences run this step and how many tokens each computes.

One token budget per step (`max_num_batched_tokens`) is shared by decodes and prefill
chunks (chunked prefill), running sequences first. When the block pool runs dry, the
lowest-priority running sequence (the latest arrival under FCFS) is preempted by
recompute: its blocks are freed and it goes back to the front of the waiting queue with
its tokens intact, so nothing is lost and no step can deadlock while one sequence fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.native.kv_cache import KVCacheManager
from server.engine.native.sequence import Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens to compute this step

    @property
    def samples(self) -> bool:
        """Whether this step computes the sequence's last token (so a new one is sampled)."""
        return self.seq.num_computed + self.num_new == len(self.seq.token_ids)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # decodes first, then prefills
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) before the forward
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new for s in self.scheduled)

    @property
    def empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 policy: str = "fcfs", chunked_prefill: bool = True):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.chunked_prefill = chunked_prefill
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        if self.policy == "priority":
            self.waiting.sort(key=lambda s: s.sort_key(self.policy))

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence from the queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.blocks)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.blocks)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.insert(0, seq)
        if self.policy == "priority":
            self.waiting.sort(key=lambda s: s.sort_key(self.policy))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.budget
        scheduled: list[ScheduledSeq] = []
        # 1. running sequences (decodes and unfinished prefill chunks), in priority order
        self.running.sort(key=lambda s: s.sort_key(self.policy))
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed, budget)
            while not self.kv.allocate(seq.blocks, seq.num_computed, num_new, out.block_copies):
                victim = self.running[-1]
                self._preempt(victim)
                out.num_preemptions += 1
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the sequence itself was preempted: nothing after it can fit either
        # 2. waiting sequences, if nothing was preempted this step
        while self.waiting and budget > 0 and not out.num_preemptions:
            seq = self.waiting[0]
            fanout = seq.params.n if seq.needs_fork else 1
            if self.running and len(self.running) + fanout > self.max_num_seqs:
                break
            if seq.num_computed == 0 and not seq.blocks.table and not seq.needs_prompt_outputs:
                cached = self.kv.match_prefix(seq.blocks, seq.token_ids)
                seq.num_computed = cached
                if seq.num_output == 0:
                    seq.state.num_cached_prompt_tokens = cached
            num_new = min(seq.num_uncomputed, budget)
            if not self.chunked_prefill and num_new < seq.num_uncomputed:
                break
            if not self.kv.allocate(seq.blocks, seq.num_computed, num_new, out.block_copies):
                # it waits for blocks, holding none (a waiting sequence holding prefix blocks
                # could starve everyone); admission guarantees it fits in an empty pool
                self.kv.free(seq.blocks)
                seq.num_computed = 0
                break
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        # decodes (one token) first: the attention batches them together
        scheduled.sort(key=lambda s: s.num_new != 1)
        out.scheduled = scheduled
        return out
