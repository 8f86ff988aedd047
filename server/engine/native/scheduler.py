"""The scheduler: which sequences run this step and how many tokens each computes.

One token budget per step (`max_num_batched_tokens`) is shared by decodes and prefill
chunks (chunked prefill), running sequences first. When the block pool runs dry, the
lowest-priority running sequence (the latest arrival under FCFS) is preempted by
recompute: its blocks are freed and it goes back to the front of the waiting queue with
its tokens intact, so nothing is lost and no step can deadlock while one sequence fits.

After the model ran, `update_from_output` moves each sequence on: its computed blocks are
committed to the prefix cache, the prompt sequence of an n > 1 request forks into n, sampled
tokens are appended and `stop.check_stop` decides who stops; finished sequences leave the
queues and free their blocks.

Hybrid models (linear-attention layers) also need a state slot per running sequence
(`state_slots.StateSlots`): a sequence is admitted only when its slots are free as well (an
n > 1 request takes all n at once), gives them back when it finishes or is preempted, and a
fork asks the runner to copy the prompt's state into each completion's slot. Their prefix
cache is off (a cached block restores KV, not the recurrent state at its end).
"""

from __future__ import annotations

from collections.abc import Callable

from server.engine.native.kv_cache import KVCacheManager
from server.engine.native.outputs import ModelOutput, ScheduledSeq, SchedulerOutput
from server.engine.native.sequence import RequestState, Sequence, SeqStatus, next_seq_id
from server.engine.native.state_slots import StateSlots
from server.engine.native.stop import check_stop
from server.engine.request import Logprob
from server.engine.structured.runtime import StructuredRuntime

# called for every appended token: (sequence, token, its logprob, whether stops may apply now)
# -> the stop string the token completed, if any (the output processor's detokenizer)
TokenListener = Callable[[Sequence, int, "Logprob | None", bool], "str | None"]


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 policy: str = "fcfs", chunked_prefill: bool = True, eos_token_ids: tuple[int, ...] = (),
                 state_slots: StateSlots | None = None):
        self.kv = kv
        self.state_slots = state_slots
        self._state_copies: list[tuple[int, int]] = []  # forks since the last schedule()
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_num_seqs = max_num_seqs
        self.budget = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.policy = policy
        self.chunked_prefill = chunked_prefill
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        # told when a sequence gives its blocks back (finished, aborted, preempted): the
        # speculative proposer forgets it
        self.release_hook: Callable[[Sequence], None] | None = None

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)
        if self.policy == "priority":
            self.waiting.sort(key=lambda s: s.sort_key(self.policy))

    def abort_request(self, state: RequestState) -> None:
        """Drop a request's unfinished sequences from the queues, freeing their blocks."""
        for seq in state.seqs:
            if not seq.finished:
                self._remove(seq)

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        """Give back the sequence's KV blocks and state slots (and its drafts, and whatever a
        speculative proposer keeps for it)."""
        self.kv.free(seq.blocks)
        if seq.spec_tokens:
            seq.clear_spec()
        if self.release_hook is not None:
            self.release_hook(seq)
        if seq.state_slots:
            self.state_slots.free(seq.state_slots)
            seq.state_slots = []

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)  # recompute: the state is rebuilt from the tokens
        seq.num_computed = 0
        seq.num_inflight = 0  # a step in flight (async scheduling) computed it for nothing
        seq.status = SeqStatus.WAITING
        self.waiting.insert(0, seq)
        if self.policy == "priority":
            self.waiting.sort(key=lambda s: s.sort_key(self.policy))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(state_copies=self._state_copies)
        self._state_copies = []
        budget = self.budget
        scheduled: list[ScheduledSeq] = []
        # 1. running sequences (decodes and unfinished prefill chunks), in priority order
        self.running.sort(key=lambda s: s.sort_key(self.policy))
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.num_inflight and seq.num_uncomputed == 0:  # all its tokens are in a step in flight (async)
                i += 1
                continue
            # speculative decoding (never with async scheduling): a decode with k drafts computes
            # k + 1 tokens; drafts take what the budget and the free blocks allow and never preempt anyone
            num_spec = min(len(seq.spec_tokens), budget - 1) if seq.num_uncomputed == 1 else 0
            if num_spec and self.kv.allocate(seq.blocks, seq.num_computed, 1 + num_spec, out.block_copies):
                del seq.spec_tokens[num_spec:]
                scheduled.append(ScheduledSeq(seq, 1 + num_spec, num_spec))
                budget -= 1 + num_spec
                i += 1
                continue
            if seq.spec_tokens:
                seq.clear_spec()
            num_new = min(seq.num_uncomputed, budget)
            while not self.kv.allocate(seq.blocks, seq.num_computed + seq.num_inflight, num_new, out.block_copies):
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
            if seq.num_pending:  # preempted with its last token still on the device (async scheduling)
                break
            fanout = seq.params.n if seq.needs_fork else 1
            if self.running and len(self.running) + fanout > self.max_num_seqs:
                break
            if self.state_slots is not None and not seq.state_slots:
                slots = self.state_slots.allocate(fanout)
                if slots is None:
                    break
                seq.state_slots = slots
            if seq.num_computed == 0 and not seq.blocks.table and not seq.needs_prompt_outputs:
                cached = self.kv.match_prefix(seq.blocks, seq.token_ids)
                seq.num_computed = cached
                if seq.num_output == 0:
                    seq.num_cached_tokens = cached
            num_new = min(seq.num_uncomputed, budget)
            if not self.chunked_prefill and num_new < seq.num_uncomputed:
                break
            if not self.kv.allocate(seq.blocks, seq.num_computed, num_new, out.block_copies):
                # it waits for blocks, holding none (a waiting sequence holding prefix blocks
                # could starve everyone); admission guarantees it fits in an empty pool
                self._release(seq)
                seq.num_computed = 0
                break
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        # decodes (one token, and drafts to verify) first: the attention batches them together
        scheduled.sort(key=lambda s: s.num_new - s.num_spec != 1)
        out.scheduled = scheduled
        return out

    # -- after the model ran ---------------------------------------------------------------
    def update_from_output(self, batch: SchedulerOutput, out: ModelOutput, on_token: TokenListener) -> list[Sequence]:
        """Apply a step's results (`out` from `ModelRunner.execute`); returns the sequences
        that finished, in request order (their blocks are freed)."""
        states: dict[str, RequestState] = {}
        for j, item in enumerate(batch.scheduled):
            seq = item.seq
            if seq.finished:  # stopped or aborted while this step was in flight (async scheduling)
                continue  # its token is discarded (never emitted); its blocks were freed then
            states.setdefault(seq.state.request_id, seq.state)
            if item.num_spec:
                self._update_spec(seq, item, j, out, on_token)
                continue
            if seq.status is SeqStatus.RUNNING:  # else preempted while in flight: it recomputes
                seq.num_computed += item.num_new
                seq.num_inflight = max(0, seq.num_inflight - item.num_new)
                self.kv.commit(seq.blocks, seq.token_ids, seq.num_computed)
            tokens = out.sampled_token_ids.get(j)
            if tokens is None:
                continue
            seq.num_pending = 0  # the host knows it now
            children = self._fork(seq) if seq.needs_fork else [seq]
            for child, token, lp in zip(children, tokens, out.sampled_logprobs[j], strict=True):
                self._append(child, token, lp, on_token)
        finished = [seq for st in states.values() for seq in st.seqs if seq.finish_reason and not seq.finished]
        for seq in finished:
            self._remove(seq)
            seq.state.num_seqs_left -= 1
        return finished

    def _update_spec(self, seq: Sequence, item: ScheduledSeq, j: int, out: ModelOutput,
                     on_token: TokenListener) -> None:
        """A verified sequence: its accepted drafts' KV stays (num_computed moves past them),
        its tokens are appended until one stops it (nothing is emitted past a stop or
        max_tokens), and the blocks past its new length go back to the pool (the rejected
        positions' slots in a kept block are simply overwritten later)."""
        seq.num_computed += item.num_new - item.num_spec + out.num_accepted[j]
        seq.clear_spec()
        for token, lp in zip(out.sampled_token_ids[j], out.sampled_logprobs[j], strict=True):
            self._append(seq, token, lp, on_token)
            if seq.finish_reason:
                break
        self.kv.commit(seq.blocks, seq.token_ids, seq.num_computed)
        self.kv.trim(seq.blocks, seq.num_computed)

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """The n sequences of an n > 1 request, once its shared prompt is computed."""
        state = seq.state
        slots = seq.state_slots[1:]
        children = [seq] + [Sequence(next_seq_id(), i, state, list(seq.token_ids), seq.num_prompt_tokens,
                                     state.generators[i] if state.generators else None,
                                     blocks=self.kv.fork(seq.blocks), num_computed=seq.num_computed,
                                     status=SeqStatus.RUNNING, routing_done=seq.routing_done,
                                     grammar=StructuredRuntime.fork(seq.grammar),
                                     state_slots=slots[i - 1: i])
                            for i in range(1, seq.params.n)]
        if slots:  # each completion continues from the prompt's state
            seq.state_slots = seq.state_slots[:1]
            self._state_copies += [(seq.state_slot, slot) for slot in slots]
        seq.needs_fork = False
        state.seqs = children
        self.running.extend(children[1:])
        return children

    def _append(self, seq: Sequence, token: int, lp: Logprob | None, on_token: TokenListener) -> None:
        seq.token_ids.append(token)
        seq.output_ids.append(token)
        stop_str = on_token(seq, token, lp, seq.num_output >= seq.params.min_tokens)
        # structured output: "stop" once the structure is complete, "error" if the matcher failed
        grammar_end = StructuredRuntime.accept(seq.grammar, token, seq.output_ids)
        stop = check_stop(seq, token, eos_token_ids=self.eos_token_ids, max_model_len=self.max_model_len,
                          stop_str=stop_str, grammar_end=grammar_end)
        if stop is not None:
            seq.finish_reason, seq.stop_reason = stop
