"""The output processor: from a step's results to `RequestOutput` deltas and request stats.

It owns what the client sees and what is measured per request (as vLLM v1's
`v1/engine/output_processor.py`): the incremental detokenizers (stop strings are found here
and reported to the scheduler's `check_stop` in the same step; text is never emitted past a
stop string), the prompt logprobs, the expert choices recorded per request (`return_routing`
and the MoE usage in `RequestMetrics`), the per-step token and latency counts in
`IterationStats`, and `FinishedRequestStats` / `RequestMetrics` when a request ends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

import torch

from server.engine.expert_counts import expert_counts
from server.engine.native.detokenizer import IncrementalDetokenizer
from server.engine.native.sequence import RequestState, Sequence
from server.engine.request import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from server.engine.stats import FinishedRequestStats, IterationStats

if TYPE_CHECKING:
    from server.engine.native.outputs import ModelOutput, SchedulerOutput

# expert counts [moe_layers, experts] -> tokens per device (expert placement), read when a request ends
DeviceTokens = Callable[[torch.Tensor], dict[str, int]]
Routing = tuple[torch.Tensor, torch.Tensor]  # (expert ids, router weights), each [tokens, moe_layers, top_k]


@dataclass
class SeqOutputState:
    """One completion's output side: its detokenizer and the delta not sent yet."""

    detok: IncrementalDetokenizer
    ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    routing: list[Routing] = field(default_factory=list)  # chunks of its generated tokens' routing


@dataclass
class RequestOutputState:
    """A request's output side: times, counts and what is sent once (the prompt's part)."""

    first_scheduled: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_generated: int = 0  # over all its sequences
    prompt_logprobs: list[Logprob | None] | None = None
    prompt_routing: list[Routing] = field(default_factory=list)  # chunks until first sent
    sent_prompt_info: bool = False
    expert_counts: torch.Tensor | None = None  # [moe_layers, experts] token-expert assignments
    num_dropped: int | None = None  # assignments dropped over expert capacity (None: no capacity limit)
    num_zero: int | None = None  # assignments to zero-computation experts (None: the model has none)
    seqs: dict[int, SeqOutputState] = field(default_factory=dict)  # completion index -> its state


class OutputProcessor:
    def __init__(self, tokenizer: Any, num_moe_layers: int, num_experts: int, top_k: int,
                 device_tokens: DeviceTokens):
        self.tokenizer = tokenizer
        self.num_moe_layers, self.num_experts, self.top_k = num_moe_layers, num_experts, top_k
        self.device_tokens = device_tokens
        self.states: dict[str, RequestOutputState] = {}  # request id -> its output state
        self.pending_finished: list[FinishedRequestStats] = []  # requests aborted between steps

    def add_request(self, request_id: str) -> None:
        self.states[request_id] = RequestOutputState()

    def _seq_state(self, seq: Sequence) -> SeqOutputState:
        per_seq = self.states[seq.state.request_id].seqs
        out = per_seq.get(seq.index)
        if out is None:
            params = seq.params
            out = per_seq[seq.index] = SeqOutputState(IncrementalDetokenizer(
                self.tokenizer, seq.request.prompt_token_ids, params.stop, params.skip_special_tokens,
                params.include_stop_str_in_output))
        return out

    # -- before the model runs -----------------------------------------------------------
    def on_scheduled(self, batch: SchedulerOutput, now: float) -> None:
        for item in batch.scheduled:
            rec = self.states[item.seq.state.request_id]
            if rec.first_scheduled is None:
                rec.first_scheduled = now

    # -- the model's outputs, before the scheduler moves the sequences on ------------------
    def record_model_output(self, batch: SchedulerOutput, out: ModelOutput, stats: IterationStats) -> None:
        """Prompt tokens computed, prompt logprobs and expert choices of this step."""
        for j, item in enumerate(batch.scheduled):
            seq = item.seq
            if seq.finished:  # stopped or aborted while the step was in flight (async scheduling)
                continue
            if seq.num_computed < seq.num_prompt_tokens:
                stats.num_prompt_tokens += min(item.num_new, seq.num_prompt_tokens - seq.num_computed)
            if j in out.prompt_logprobs:
                self._prompt_logprobs(seq, out.prompt_logprobs[j])
            if out.routing is not None:
                # speculative decoding: the routing of rejected drafts is not the request's
                num_new = item.num_new - item.num_spec + out.num_accepted.get(j, 0)
                self._record_routing(seq, num_new, out, j, whole_step=not item.num_spec)

    def _prompt_logprobs(self, seq: Sequence, logprobs: list[Logprob]) -> None:
        state = self.states[seq.state.request_id]
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None]  # the first prompt token has no logprob
        if seq.num_computed + 1 == len(state.prompt_logprobs):  # else recomputed after a preemption
            state.prompt_logprobs.extend(logprobs)

    def _record_routing(self, seq: Sequence, num_new: int, out: ModelOutput, j: int, whole_step: bool = True) -> None:
        """Count the experts chosen for this sequence's tokens into its request's MoE usage and,
        when asked, keep the ids; tokens recomputed after a preemption are not counted again."""
        begin = max(seq.num_computed, seq.routing_done)
        end = seq.num_computed + num_new
        if begin >= end:
            return
        off = out.token_offsets[j] - seq.num_computed
        rows = slice(off + begin, off + end)
        chosen = out.routing[rows]  # [n, layers, k]
        state, E = self.states[seq.state.request_id], self.num_experts
        if whole_step and begin == seq.num_computed and out.seq_expert_counts is not None:
            counts = out.seq_expert_counts[j]  # [layers, experts], counted for the whole step at once
        else:  # tokens recomputed after a preemption: count only the new ones
            counts = expert_counts(chosen, E)[0].cpu()  # [layers, experts]
        if state.expert_counts is None:
            state.expert_counts = counts.clone()
        else:
            state.expert_counts += counts  # in place: no new tensor per sequence and step
        if out.dropped is not None:
            state.num_dropped = (state.num_dropped or 0) + int(out.dropped[rows].sum())
        if out.zero_expert is not None:
            state.num_zero = (state.num_zero or 0) + int(out.zero_expert[rows].sum())
        seq.routing_done = end
        if not seq.request.return_routing:
            return
        # kept compact until the API renders them: small ints and float16 weights
        ids = chosen.to(torch.uint8 if int(chosen.max()) < 256 else torch.int16).cpu()  # [n, layers, k]
        weights = out.routing_weights[rows].to(torch.float16).cpu()  # [n, layers, k]
        n_prompt = max(0, min(end, seq.num_prompt_tokens) - begin)
        if n_prompt:
            state.prompt_routing.append((ids[:n_prompt], weights[:n_prompt]))
        if n_prompt < ids.shape[0]:
            self._seq_state(seq).routing.append((ids[n_prompt:], weights[n_prompt:]))

    # -- each appended token (the scheduler's TokenListener) -------------------------------
    def on_token(self, seq: Sequence, token: int, lp: Logprob | None, may_stop: bool, *,
                 now: float, stats: IterationStats) -> str | None:
        """Buffer the token for the next delta, count it, detokenize it; returns the stop string
        it completed (looked for only when `may_stop`, i.e. after `min_tokens`)."""
        state, out = self.states[seq.state.request_id], self._seq_state(seq)
        out.ids.append(token)
        if lp is not None:
            out.logprobs.append(lp)
        stats.num_generation_tokens += 1
        state.num_generated += 1
        if state.first_token_time is None:
            state.first_token_time = now
            stats.time_to_first_tokens.append(now - seq.request.arrival_time)
        elif seq.index == 0 and state.last_token_time is not None:
            stats.inter_token_latencies.append(now - state.last_token_time)
        if seq.index == 0:
            state.last_token_time = now
        return out.detok.add_token(token, check_stop=may_stop)

    # -- after the scheduler moved the sequences on ----------------------------------------
    def make_outputs(self, states: list[RequestState], finished_now: list[Sequence],
                     finished_stats: list[FinishedRequestStats]) -> list[RequestOutput]:
        """One delta per request of `states` that has news; a request whose sequences all
        finished gets its metrics and `finished=True` (the caller forgets it)."""
        outs: list[RequestOutput] = []
        now = time.monotonic()
        ended = {id(seq) for seq in finished_now}
        for state in states:
            rec = self.states[state.request_id]
            completions = [self._completion(seq, rec.seqs[seq.index], id(seq) in ended) for seq in state.seqs
                           if id(seq) in ended or (not seq.finished and _has_news(rec, seq.index))]
            if not completions:
                continue
            finished = state.num_seqs_left == 0
            out = RequestOutput(state.request_id, completions, finished=finished)
            if not rec.sent_prompt_info:
                out.prompt_token_ids = state.request.prompt_token_ids
                out.prompt_logprobs = rec.prompt_logprobs
                if state.request.return_routing:
                    out.prompt_routing, out.prompt_routing_weights = self._cat_routing(rec.prompt_routing)
                    rec.prompt_routing = []
                rec.sent_prompt_info = True
            if finished:
                out.metrics = self.finish(state, now, finished_stats)
            outs.append(out)
        return outs

    def _completion(self, seq: Sequence, pending: SeqOutputState, ended: bool) -> CompletionOutput:
        detok = pending.detok
        text = detok.flush(stopped_by_string=isinstance(seq.stop_reason, str)) if ended else detok.delta()
        routing = weights = None
        if seq.request.return_routing:
            routing, weights = self._cat_routing(pending.routing)
        out = CompletionOutput(
            index=seq.index, text=text, token_ids=pending.ids,
            logprobs=pending.logprobs if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason, routing=routing, routing_weights=weights)
        pending.ids, pending.logprobs, pending.routing = [], [], []
        return out

    def _cat_routing(self, chunks: list[Routing]) -> Routing:
        """One (ids, weights) pair [n, moe_layers, top_k] from the chunks recorded since the last output."""
        if not chunks:
            empty = torch.empty(0, self.num_moe_layers, self.top_k)
            return empty.to(torch.uint8), empty.to(torch.float16)
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    # -- the end of a request ------------------------------------------------------------
    def finish(self, state: RequestState, now: float, finished_stats: list[FinishedRequestStats],
               reason: str | None = None) -> RequestMetrics:
        """Its FinishedRequestStats (appended) and RequestMetrics; forgets the request."""
        rec = self.states.pop(state.request_id)
        req = state.request
        arrival = req.arrival_time
        scheduled = rec.first_scheduled or now
        first = rec.first_token_time or now
        if reason is None:
            reason = next((s.finish_reason for s in state.seqs if s.index == 0), None) or "stop"
        n_prompt = len(req.prompt_token_ids)
        finished_stats.append(FinishedRequestStats(
            finish_reason=reason, e2e_latency=now - arrival, queued_time=scheduled - arrival,
            prefill_time=first - scheduled, decode_time=now - first, inference_time=now - scheduled,
            num_prompt_tokens=n_prompt, num_generation_tokens=rec.num_generated,
            max_tokens_param=req.sampling_params.max_tokens, n_param=req.sampling_params.n))
        expert_counts = device_tokens = None
        if rec.expert_counts is not None:
            expert_counts = rec.expert_counts.tolist()
            device_tokens = self.device_tokens(rec.expert_counts)
        cached = next((s.num_cached_tokens for s in state.seqs if s.index == 0), 0)
        return RequestMetrics(arrival_time=arrival, queued_time=scheduled - arrival, first_token_time=first,
                              last_token_time=rec.last_token_time, finished_time=now,
                              num_prompt_tokens=n_prompt, num_generation_tokens=rec.num_generated,
                              num_cached_prompt_tokens=cached, expert_counts=expert_counts,
                              device_expert_tokens=device_tokens, num_dropped_assignments=rec.num_dropped,
                              num_zero_expert_assignments=rec.num_zero)


def _has_news(rec: RequestOutputState, index: int) -> bool:
    pending = rec.seqs.get(index)
    return pending is not None and bool(pending.ids)
