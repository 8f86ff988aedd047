"""EngineCore: the synchronous heart of the native engine.

`step()` = schedule -> execute -> sample -> update (detokenize, stop checks, finish, free
KV blocks) -> outputs and stats. It is single-threaded; `AsyncEngine` drives it from a
thread of its own.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable

import torch

from models.model import MoEForCausalLM
from server.engine.native.detokenizer import IncrementalDetokenizer
from server.engine.native.kv_cache import BlockPool, KVCacheManager
from server.engine.native.runner import ModelOutput, ModelRunner
from server.engine.native.sampler import Sampler, SamplingRow, compute_logprobs
from server.engine.native.scheduler import ScheduledSeq, Scheduler
from server.engine.native.sequence import RequestState, Sequence, SeqStatus
from server.engine.request import CompletionOutput, EngineRequest, Logprob, RequestMetrics, RequestOutput
from server.engine.stats import FinishedRequestStats, IterationStats, RoutingStats
from server.engine.structured.runtime import StructuredRuntime
from server.engine.validate import RoutingShape, validate_request

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, model: MoEForCausalLM, tokenizer: Any, *, num_blocks: int, block_size: int,
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 scheduling_policy: str = "fcfs", seed: int = 0, eos_token_ids: tuple[int, ...] = (),
                 enforce_eager: bool = False, placement: Any = None,
                 routing_listeners: tuple[Callable[[RoutingStats], None], ...] = ()):
        """`placement`: a PlacementManager (server/engine/native/placement) whose experts are
        placed already; it hears every step's routing. `routing_listeners` hear it too."""
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.config
        self.vocab_size = cfg.vocab_size
        self.block_size = block_size
        self.max_model_len = min(max_model_len, num_blocks * block_size)
        if not enable_chunked_prefill and max_num_batched_tokens < self.max_model_len:
            # a longer prompt could never be scheduled (it would wait forever, blocking the queue)
            raise ValueError(f"--max-num-batched-tokens ({max_num_batched_tokens}) must be at least "
                             f"--max-model-len ({self.max_model_len}) when chunked prefill is off "
                             f"(--no-enable-chunked-prefill): a prompt is then computed in one step")
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.kv = KVCacheManager(self.pool)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max(max_num_batched_tokens, 1), self.max_model_len,
                                   scheduling_policy, enable_chunked_prefill)
        self.runner = ModelRunner(model, num_blocks, block_size, max_num_seqs=max_num_seqs,
                                  max_model_len=self.max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                                  enforce_eager=enforce_eager)
        self.sampler = Sampler(self.vocab_size, self.runner.device, seed)
        self.eos_token_ids = tuple(eos_token_ids)
        self.requests: dict[str, RequestState] = {}
        self.seqs: dict[str, list[Sequence]] = {}
        self._seq_ids = itertools.count()
        self.moe_layers = [i for i, s in enumerate(cfg.sparse_layers) if s]
        self._pending_finished: list[FinishedRequestStats] = []  # aborted between steps
        self.step_request_ids: list[str] | None = None  # the requests in the step being run
        self.total_preemptions = 0  # since start (tests, logs)
        self.total_prefix_hit_tokens = 0
        self.fault_hook: Callable[[list[ScheduledSeq]], None] | None = None  # tests inject failures here
        # called after every step with that step's routing counts (expert placement, traces)
        self.routing_listeners: list[Callable[[RoutingStats], None]] = list(routing_listeners)
        self.placement_manager = placement
        if placement is not None:
            self.routing_listeners.append(placement.on_routing)
        self.structured = StructuredRuntime(self.vocab_size)  # grammar masks (structured outputs)

    # -- admission --------------------------------------------------------------------
    def validate(self, request: EngineRequest) -> int:
        """Check a request against the model and this engine's limits; returns its max_tokens."""
        cfg = self.model.config
        return validate_request(request, self.vocab_size, self.max_model_len, max_num_seqs=self.scheduler.max_num_seqs,
                                routing=RoutingShape(cfg.num_moe_layers, cfg.top_k))

    def add_request(self, request: EngineRequest, max_tokens: int | None = None) -> None:
        """Queue a request; `max_tokens` is `validate`'s answer when the caller validated already."""
        if max_tokens is None:
            max_tokens = self.validate(request)
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        params = request.sampling_params
        state = RequestState(request, max_tokens, num_seqs_left=params.n)
        self.requests[request.request_id] = state
        seq = self._new_seq(state, 0, list(request.prompt_token_ids), None)
        seq.needs_fork = params.n > 1
        self.seqs[request.request_id] = [seq]
        self.scheduler.add(seq)

    def _new_seq(self, state: RequestState, index: int, token_ids: list[int], parent: Sequence | None) -> Sequence:
        params = state.request.sampling_params
        prompt = state.request.prompt_token_ids
        detok = IncrementalDetokenizer(self.tokenizer, prompt, params.stop, params.skip_special_tokens,
                                       params.include_stop_str_in_output)
        gen = None if params.seed is None else Sampler.make_generator(params.seed, index, self.runner.device)
        seq = Sequence(next(self._seq_ids), index, state, token_ids, len(prompt), detok, gen)
        seq.grammar = (self.structured.new_state(state.request.structured) if parent is None
                       else self.structured.fork(parent.grammar))
        if parent is not None:
            seq.blocks = self.kv.fork(parent.blocks)
            seq.num_computed = parent.num_computed
            seq.routing_done = parent.routing_done
            seq.status = SeqStatus.RUNNING
        return seq

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Drop a request now, freeing its blocks. Returns whether it was known."""
        state = self.requests.get(request_id)
        if state is None:
            return False
        for seq in self.seqs[request_id]:
            if not seq.finished:
                self.scheduler.remove(seq)
                seq.status = SeqStatus.FINISHED
        self._finish(state, time.monotonic(), self._pending_finished, reason)
        del self.requests[request_id]
        del self.seqs[request_id]
        return True

    def idle_stats(self) -> tuple[IterationStats, list[FinishedRequestStats]]:
        """Stats between steps (after aborts left the engine idle), so gauges do not go stale."""
        stats = IterationStats(timestamp=time.monotonic(), num_running=len(self.scheduler.running),
                               num_waiting=len(self.scheduler.waiting), kv_cache_usage=self.pool.usage)
        finished, self._pending_finished = self._pending_finished, []
        return stats, finished

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # -- the step ---------------------------------------------------------------------
    def step(self) -> tuple[list[RequestOutput], IterationStats, list[FinishedRequestStats], RoutingStats | None]:
        t0 = time.monotonic()
        self.step_request_ids = None  # unknown until scheduled: a failure now fails every request
        batch = self.scheduler.schedule()
        self.step_request_ids = list(dict.fromkeys(item.seq.state.request_id for item in batch.scheduled))
        stats = IterationStats(timestamp=t0, num_preemptions=batch.num_preemptions)
        finished_stats, self._pending_finished = self._pending_finished, []
        routing_stats = None
        outputs: list[RequestOutput] = []
        if not batch.empty:
            for item in batch.scheduled:
                st = item.seq.state
                if st.first_scheduled is None:
                    st.first_scheduled = t0
            if self.fault_hook is not None:
                self.fault_hook(batch.scheduled)
            # grammar masks of this step's samplers are filled while the model runs
            self.structured.begin_step([item.seq.grammar for item in batch.scheduled if item.samples])
            result = self.runner.execute(batch)
            routing_stats = self._routing_stats(result, batch.num_tokens)
            if routing_stats is not None:
                for listener in self.routing_listeners:
                    listener(routing_stats)
            touched = self._update(batch.scheduled, result, stats, t0)
            outputs = self._collect(touched, finished_stats)
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_cache_usage = self.pool.usage
        stats.num_batched_tokens = batch.num_tokens
        stats.prefix_cache_queries, stats.prefix_cache_hits = self.pool.queries, self.pool.hits
        self.total_preemptions += batch.num_preemptions
        self.total_prefix_hit_tokens += self.pool.hits
        self.pool.queries = self.pool.hits = 0
        stats.step_time = time.monotonic() - t0
        return outputs, stats, finished_stats, routing_stats

    def close(self) -> None:
        """Release what outlives a step (the placement manager's routing trace file)."""
        if self.placement_manager is not None:
            self.placement_manager.close()

    def placement_info(self):
        """Where each logical expert lives (PlacementInfo), or None when all are on one device."""
        return self.placement_manager.info() if self.placement_manager is not None else None

    def fail_requests(self, request_ids: list[str], message: str) -> list[RequestOutput]:
        """Finish these requests with an error (their blocks freed), e.g. after a failed step."""
        outs = []
        for rid in request_ids:
            if rid in self.requests:
                self.abort(rid, reason="error")
                outs.append(RequestOutput(rid, [], finished=True, error=message))
        return outs

    def _routing_stats(self, result: ModelOutput, num_tokens: int) -> RoutingStats | None:
        if result.routing is None:
            return None
        E = self.model.config.num_experts
        r = result.routing  # [T, moe_layers, k]
        L = r.shape[1]
        flat = (r + torch.arange(L, device=r.device)[None, :, None] * E).reshape(-1)
        counts = torch.bincount(flat, minlength=L * E).view(L, E).tolist()
        if self.placement_manager is not None:
            device_tokens = self.placement_manager.device_tokens(r)
        else:
            device_tokens = {str(self.runner.device): int(r.numel())}
        dropped = None if result.dropped is None else result.dropped.sum(dim=(0, 2)).tolist()  # [L]
        return RoutingStats(num_layers=L, num_experts=E, expert_tokens=counts, device_tokens=device_tokens,
                            dropped_tokens=dropped)

    def _update(self, scheduled: list[ScheduledSeq], result: ModelOutput, stats: IterationStats, now: float):
        rows: list[SamplingRow] = []
        row_seqs: list[Sequence] = []
        logit_index: list[int] = []
        touched: dict[str, None] = {}
        for j, item in enumerate(scheduled):
            seq, state = item.seq, item.seq.state
            samples = item.samples  # before num_computed moves on
            touched[state.request_id] = None
            was_prompt = seq.num_computed < seq.num_prompt_tokens
            if was_prompt:
                stats.num_prompt_tokens += min(item.num_new, seq.num_prompt_tokens - seq.num_computed)
            if j in result.prompt_rows:
                self._prompt_logprobs(seq, result, j)
            if result.routing is not None:
                self._record_routing(seq, item, result, j)
            seq.num_computed += item.num_new
            self.kv.commit(seq.blocks, seq.token_ids, seq.num_computed)
            if not samples:
                continue
            if seq.needs_fork:
                children = [seq] + [self._new_seq(state, i, list(seq.token_ids), seq)
                                    for i in range(1, seq.params.n)]
                seq.needs_fork = False
                self.seqs[state.request_id] = children
                self.scheduler.running.extend(children[1:])
            else:
                children = [seq]
            for child in children:
                rows.append(SamplingRow(child.params, child.generator, state.request.prompt_token_ids,
                                        child.output_ids, self.eos_token_ids, child.sampling_cache))
                row_seqs.append(child)
                logit_index.append(result.sample_rows[j])
        if not rows:
            return touched
        logits = result.logits[torch.tensor(logit_index, device=result.logits.device)]  # [rows, vocab]
        sampled = self.sampler(logits, rows, self.structured.mask([seq.grammar for seq in row_seqs]))
        for seq, token, lp in zip(row_seqs, sampled.token_ids, sampled.logprobs):
            self._append_token(seq, token, lp, now, stats)
        return touched

    def _prompt_logprobs(self, seq: Sequence, result: ModelOutput, j: int) -> None:
        state = seq.state
        if state.prompt_logprobs is None:
            state.prompt_logprobs = [None]  # the first prompt token has no logprob
        start = seq.num_computed
        if start + 1 != len(state.prompt_logprobs):
            return  # recomputed after a preemption: already recorded
        first, count = result.prompt_rows[j]
        k = seq.params.prompt_logprobs
        targets = torch.tensor(seq.token_ids[start + 1 : start + 1 + count])
        state.prompt_logprobs.extend(compute_logprobs(result.logits[first : first + count], targets, k))

    def _record_routing(self, seq: Sequence, item: ScheduledSeq, result: ModelOutput, j: int) -> None:
        """Count the experts chosen for this sequence's tokens into its request's MoE usage and,
        when asked, keep the ids; tokens recomputed after a preemption are not counted again."""
        begin = max(seq.num_computed, seq.routing_done)
        end = seq.num_computed + item.num_new
        if begin >= end:
            return
        off = result.token_offsets[j] - seq.num_computed
        rows = slice(off + begin, off + end)
        chosen = result.routing[rows]  # [n, layers, k]
        state, E = seq.state, self.model.config.num_experts
        if begin == seq.num_computed and result.seq_expert_counts is not None:
            counts = result.seq_expert_counts[j]  # [layers, experts], counted for the whole step at once
        else:  # tokens recomputed after a preemption: count only the new ones
            L = chosen.shape[1]
            flat = (chosen + torch.arange(L, device=chosen.device)[None, :, None] * E).reshape(-1)
            counts = torch.bincount(flat, minlength=L * E).view(L, E).cpu()  # [layers, experts]
        if state.expert_counts is None:
            state.expert_counts = counts.clone()
        else:
            state.expert_counts += counts  # in place: no new tensor per sequence and step
        if result.dropped is not None:
            state.num_dropped = (state.num_dropped or 0) + int(result.dropped[rows].sum())
        seq.routing_done = end
        if not state.request.return_routing:
            return
        # kept compact until the API renders them: small ints and float16 weights
        ids = chosen.to(torch.uint8 if E <= 256 else torch.int16).cpu()  # [n, layers, k]
        weights = result.routing_weights[rows].to(torch.float16).cpu()  # [n, layers, k]
        n_prompt = max(0, min(end, seq.num_prompt_tokens) - begin)
        if n_prompt:
            state.prompt_routing.append((ids[:n_prompt], weights[:n_prompt]))
        if n_prompt < ids.shape[0]:
            seq.pending_routing.append((ids[n_prompt:], weights[n_prompt:]))

    def _cat_routing(self, chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """One (ids, weights) pair [n, moe_layers, top_k] from the chunks recorded since the last output."""
        if not chunks:
            cfg = self.model.config
            empty = torch.empty(0, cfg.num_moe_layers, cfg.top_k)
            return empty.to(torch.uint8), empty.to(torch.float16)
        return torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])

    def _append_token(self, seq: Sequence, token: int, lp: Logprob | None, now: float, stats: IterationStats) -> None:
        state, params = seq.state, seq.params
        seq.token_ids.append(token)
        seq.output_ids.append(token)
        seq.pending_ids.append(token)
        if lp is not None:
            seq.pending_logprobs.append(lp)
        stats.num_generation_tokens += 1
        state.num_generated += 1
        if state.first_token_time is None:
            state.first_token_time = now
            stats.time_to_first_tokens.append(now - state.request.arrival_time)
        elif seq.index == 0 and state.last_token_time is not None:
            stats.inter_token_latencies.append(now - state.last_token_time)
        if seq.index == 0:
            state.last_token_time = now
        may_stop = seq.num_output >= params.min_tokens  # no stop of any kind before min_tokens
        stop_str = seq.detok.add_token(token, check_stop=may_stop)
        n_out = seq.num_output
        # structured output: "stop" once the structure is complete, "error" if the matcher failed
        grammar_end = self.structured.accept(seq.grammar, token, seq.output_ids)
        if grammar_end == "error":
            seq.finish_reason = "error"
        elif not params.ignore_eos and token in self.eos_token_ids and may_stop:
            seq.finish_reason = "stop"
        elif may_stop and token in params.stop_token_set:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif stop_str is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_str
        elif grammar_end is not None:
            seq.finish_reason = grammar_end
        elif n_out >= state.max_tokens or len(seq.token_ids) >= self.max_model_len:
            # a structure that is complete at the budget's end stopped, one inside it ran out
            seq.finish_reason = "stop" if self.structured.complete(seq.grammar) else "length"

    def _collect(self, touched: dict[str, None], finished_stats: list[FinishedRequestStats]) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        now = time.monotonic()
        for rid in touched:
            state = self.requests.get(rid)
            if state is None:
                continue
            completions = []
            for seq in self.seqs[rid]:
                if seq.finished or not (seq.pending_ids or seq.finish_reason):
                    continue
                if seq.finish_reason is not None:
                    text = seq.detok.flush(stopped_by_string=isinstance(seq.stop_reason, str))
                    self.scheduler.remove(seq)
                    seq.status = SeqStatus.FINISHED
                    state.num_seqs_left -= 1
                else:
                    text = seq.detok.delta()
                routing = weights = None
                if state.request.return_routing:
                    routing, weights = self._cat_routing(seq.pending_routing)
                completions.append(CompletionOutput(
                    index=seq.index, text=text, token_ids=seq.pending_ids,
                    logprobs=seq.pending_logprobs if seq.params.logprobs is not None else None,
                    finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                    routing=routing, routing_weights=weights))
                seq.pending_ids, seq.pending_logprobs, seq.pending_routing = [], [], []
            if not completions:
                continue
            finished = state.num_seqs_left == 0
            out = RequestOutput(rid, completions, finished=finished)
            if not state.sent_prompt_info:
                out.prompt_token_ids = state.request.prompt_token_ids
                out.prompt_logprobs = state.prompt_logprobs
                if state.request.return_routing:
                    out.prompt_routing, out.prompt_routing_weights = self._cat_routing(state.prompt_routing)
                    state.prompt_routing = []
                state.sent_prompt_info = True
            if finished:
                out.metrics = self._finish(state, now, finished_stats)
                del self.requests[rid]
                del self.seqs[rid]
            outs.append(out)
        return outs

    def _finish(self, state: RequestState, now: float, finished_stats: list[FinishedRequestStats],
                reason: str | None = None) -> RequestMetrics:
        req = state.request
        arrival = req.arrival_time
        scheduled = state.first_scheduled or now
        first = state.first_token_time or now
        if reason is None:
            reason = next((s.finish_reason for s in self.seqs[req.request_id] if s.index == 0), None) or "stop"
        n_prompt = len(req.prompt_token_ids)
        finished_stats.append(FinishedRequestStats(
            finish_reason=reason, e2e_latency=now - arrival, queued_time=scheduled - arrival,
            prefill_time=first - scheduled, decode_time=now - first, inference_time=now - scheduled,
            num_prompt_tokens=n_prompt, num_generation_tokens=state.num_generated,
            max_tokens_param=req.sampling_params.max_tokens, n_param=req.sampling_params.n))
        expert_counts = device_tokens = None
        if state.expert_counts is not None:
            expert_counts = state.expert_counts.tolist()
            if self.placement_manager is not None:
                device_tokens = self.placement_manager.device_tokens_for_counts(state.expert_counts)
            else:
                device_tokens = {str(self.runner.device): int(state.expert_counts.sum())}
        return RequestMetrics(arrival_time=arrival, queued_time=scheduled - arrival, first_token_time=first,
                              last_token_time=state.last_token_time, finished_time=now,
                              num_prompt_tokens=n_prompt, num_generation_tokens=state.num_generated,
                              num_cached_prompt_tokens=state.num_cached_prompt_tokens,
                              expert_counts=expert_counts, device_expert_tokens=device_tokens,
                              num_dropped_assignments=state.num_dropped)
