"""EngineCore: the synchronous heart of the native engine.

`step()` = schedule -> execute -> update, as vLLM v1's `EngineCore.step`: the scheduler picks
the batch (`scheduler.py`), the runner computes it and samples (`runner.py`), the scheduler
moves the sequences on (appends tokens, forks n > 1, applies `stop.check_stop`, frees the
blocks of finished ones) while the output processor detokenizes and builds the
`RequestOutput` deltas and request stats (`output_processor.py`). It is single-threaded;
`AsyncEngine` drives it from a thread of its own.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from collections.abc import Callable

import torch

from models.model import MoEForCausalLM
from models.layers.attention_variants import kv_reach
from server.engine.native.async_step import AsyncStepper
from server.engine.native.kv_cache import BlockPool, KVCacheManager
from server.engine.native.output_processor import OutputProcessor
from server.engine.native.outputs import ModelOutput, ScheduledSeq, SchedulerOutput
from server.engine.native.runner import ModelRunner
from server.engine.native.sampler import Sampler
from server.engine.native.scheduler import Scheduler
from server.engine.native.sequence import RequestState, Sequence, next_seq_id
from server.engine.native.spec.config import SpeculativeConfig
from server.engine.native.spec.engine import SpecDecoder, build_proposer, distinct_experts
from server.engine.native.state_slots import StateSlots
from server.engine.native.step_result import StepError, StepResult
from server.engine.request import EngineRequest, RequestOutput
from server.engine.stats import FinishedRequestStats, IterationStats, RoutingListener, RoutingStats
from server.engine.structured.runtime import StructuredRuntime
from server.engine.validate import RoutingShape, validate_request

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, model: MoEForCausalLM, tokenizer: Any, *, num_blocks: int, block_size: int,
                 max_model_len: int, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 scheduling_policy: str = "fcfs", seed: int = 0, eos_token_ids: tuple[int, ...] = (),
                 placement: Any = None, routing_listeners: tuple[RoutingListener, ...] = (),
                 speculative: SpeculativeConfig | None = None, kernels: Any = None, async_scheduling: bool = False):
        """`placement`: a PlacementManager (server/engine/native/placement) whose experts are
        placed already; it hears every step's routing. `routing_listeners` (e.g. a routing trace
        recorder) hear it too; all are closed with the core. `speculative`: speculative decoding
        (spec/; `kernels`, the KernelFlags a draft model is loaded with). `async_scheduling`: the
        host schedules and applies results one step ahead of the device (`async_step.py`; off with
        placement and with speculative decoding: server/engine/factory.py resolve_async_scheduling)."""
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
        self.eos_token_ids = tuple(eos_token_ids)
        if cfg.hybrid and enable_prefix_caching:
            log.info("prefix caching is off for %s: its linear-attention layers keep a recurrent state per "
                     "sequence, which cached KV blocks cannot restore", cfg.architecture)
            enable_prefix_caching = False
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        # every layer windowed or chunked: blocks out of every layer's reach are released; with
        # speculative decoding the reach counts the drafts too (a step's blocks are committed with
        # its drafted tokens, of which up to all k may be rejected)
        reach = kv_reach(cfg)
        if reach is not None and speculative is not None:
            reach += speculative.num_speculative_tokens + 1
        self.kv = KVCacheManager(self.pool, reach)
        # hybrid models: a state slot per running sequence (n > 1 completions included)
        self.state_slots = StateSlots(max_num_seqs) if cfg.hybrid else None
        self.scheduler = Scheduler(self.kv, max_num_seqs, max(max_num_batched_tokens, 1), self.max_model_len,
                                   scheduling_policy, enable_chunked_prefill, self.eos_token_ids,
                                   state_slots=self.state_slots)
        self.structured = StructuredRuntime(self.vocab_size)  # grammar masks (structured outputs)
        self.runner = ModelRunner(model, num_blocks, block_size, max_num_seqs=max_num_seqs,
                                  max_model_len=self.max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                                  seed=seed, eos_token_ids=self.eos_token_ids,
                                  structured=self.structured, num_state_slots=max_num_seqs if cfg.hybrid else 0)
        self.output = OutputProcessor(tokenizer, cfg.num_moe_layers, cfg.num_experts, cfg.top_k,
                                      self._device_tokens)
        self.requests: dict[str, RequestState] = {}
        self.total_preemptions = 0  # since start (tests, logs)
        self.total_prefix_hit_tokens = 0
        self.fault_hook: Callable[[list[ScheduledSeq]], None] | None = None  # tests inject failures here
        # told every step's routing counts, between steps (expert placement, traces)
        self.routing_listeners: list[RoutingListener] = list(routing_listeners)
        self.placement_manager = placement
        if placement is not None:
            self.routing_listeners.append(placement)
        self.spec: SpecDecoder | None = None
        if speculative is not None:
            if cfg.hybrid:
                raise ValueError(f"--speculative-config: {cfg.architecture} has linear-attention layers, whose "
                                 f"recurrent state cannot take back rejected drafts; speculative decoding is off "
                                 f"for hybrid models")
            proposer = build_proposer(speculative, model, num_blocks=num_blocks, block_size=block_size,
                                      max_model_len=self.max_model_len, max_num_seqs=max_num_seqs,
                                      max_num_batched_tokens=max_num_batched_tokens, kernels=kernels)
            self.spec = SpecDecoder(speculative, proposer, self.max_model_len, self.vocab_size)
            self.runner.keep_hidden = proposer.wants_hidden_states
            if proposer.wants_hidden_states:
                self.runner.keep_aux_hidden(tuple(proposer.aux_hidden_layers))
            self.scheduler.release_hook = lambda seq: proposer.release(seq.seq_id)
            log.info("speculative decoding: %s", speculative.to_json())
        self.async_step: AsyncStepper | None = None
        if async_scheduling and (placement is not None or self.spec is not None):
            log.info("async scheduling is off: %s", "expert placement rebalances between steps, with the device idle"
                     if placement is not None else "speculative decoding decides each step's inputs on the host")
        elif async_scheduling:
            self.async_step = AsyncStepper(self)

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
        generators = [None if params.seed is None else Sampler.make_generator(params.seed, i, self.runner.device)
                      for i in range(params.n)]
        state = RequestState(request, max_tokens, num_seqs_left=params.n, generators=generators)
        prompt = list(request.prompt_token_ids)
        seq = Sequence(next_seq_id(), 0, state, prompt, len(prompt), generators[0], needs_fork=params.n > 1,
                       grammar=self.structured.new_state(request.structured))
        state.seqs = [seq]
        self.requests[request.request_id] = state
        self.output.add_request(request.request_id)
        self.scheduler.add(seq)

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Drop a request now, freeing its blocks. Returns whether it was known."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.abort_request(state)
        self.output.finish(state, time.monotonic(), self.output.pending_finished, reason)
        return True

    def idle_stats(self) -> tuple[IterationStats, list[FinishedRequestStats]]:
        """Stats between steps (after aborts left the engine idle), so gauges do not go stale."""
        stats = IterationStats(timestamp=time.monotonic(), num_running=len(self.scheduler.running),
                               num_waiting=len(self.scheduler.waiting), kv_cache_usage=self.pool.usage)
        finished, self.output.pending_finished = self.output.pending_finished, []
        return stats, finished

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step ---------------------------------------------------------------------
    def step(self) -> StepResult:
        """One engine step. Raises `StepError` naming the requests it was running if it fails.
        With async scheduling it launches the next step and returns the results of the one before."""
        if self.async_step is not None:
            return self.async_step.step()
        t0 = time.monotonic()
        try:
            batch = self.scheduler.schedule()
        except Exception as exc:
            raise StepError(list(self.requests), exc) from exc
        try:
            return self._run(batch, t0)
        except Exception as exc:
            raise StepError(list(dict.fromkeys(it.seq.state.request_id for it in batch.scheduled)), exc) from exc

    def _run(self, batch: SchedulerOutput, t0: float) -> StepResult:
        stats = IterationStats(timestamp=t0, num_preemptions=batch.num_preemptions)
        finished_stats, self.output.pending_finished = self.output.pending_finished, []
        routing_stats = None
        outputs: list[RequestOutput] = []
        if not batch.empty:
            self.output.on_scheduled(batch, t0)
            if self.fault_hook is not None:
                self.fault_hook(batch.scheduled)
            result = self.runner.execute(batch)
            routing_stats = self.apply_output(batch, result, t0, stats, finished_stats, outputs)
        self.end_step(batch, stats, t0)
        return StepResult(outputs, stats, finished_stats, routing_stats)

    def apply_output(self, batch: SchedulerOutput, result: ModelOutput, now: float, stats: IterationStats,
                     finished_stats: list[FinishedRequestStats], outputs: list[RequestOutput]) -> RoutingStats | None:
        """A computed step's results: routing to the listeners, the sequences moved on, the
        deltas appended to `outputs`, and with speculative decoding the drafts for the next
        step. Sequences that finished while it was in flight (async scheduling) are skipped."""
        routing_stats = self._routing_stats(result)
        if routing_stats is not None:
            for listener in self.routing_listeners:
                listener.on_routing(routing_stats)
        self.output.record_model_output(batch, result, stats)
        distinct_experts(batch, result, stats)
        target = None
        if self.spec is not None:
            self.spec.record(batch, result, stats)
            target = self.spec.target_hidden(batch, result)
        states = list({id(it.seq.state): it.seq.state for it in batch.scheduled if not it.seq.finished}.values())
        finished = self.scheduler.update_from_output(
            batch, result, lambda seq, token, lp, may_stop: self.output.on_token(
                seq, token, lp, may_stop, now=now, stats=stats))
        new = self.output.make_outputs(states, finished, finished_stats)
        for out in new:
            if out.finished:
                del self.requests[out.request_id]
        outputs.extend(new)
        if self.spec is not None:  # drafts for the next step
            self.spec.propose(self.scheduler.running, target)
        return routing_stats

    def end_step(self, batch: SchedulerOutput, stats: IterationStats, t0: float) -> None:
        stats.num_running = len(self.scheduler.running)
        stats.num_waiting = len(self.scheduler.waiting)
        stats.kv_cache_usage = self.pool.usage
        stats.num_batched_tokens = batch.num_tokens
        stats.prefix_cache_queries, stats.prefix_cache_hits = self.pool.queries, self.pool.hits
        self.total_preemptions += batch.num_preemptions
        self.total_prefix_hit_tokens += self.pool.hits
        self.pool.queries = self.pool.hits = 0
        stats.step_time = time.monotonic() - t0

    def close(self) -> None:
        """Release what outlives a step (a routing trace file, the async device thread, a proposer's state)."""
        if self.async_step is not None:
            self.async_step.close()
        if self.spec is not None:
            self.spec.proposer.close()
        for listener in self.routing_listeners:
            listener.close()

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

    def _device_tokens(self, expert_counts: torch.Tensor) -> dict[str, int]:
        """A request's token-expert assignments [moe_layers, experts] per device."""
        if self.placement_manager is not None:
            return self.placement_manager.device_tokens_for_counts(expert_counts)
        return {str(self.runner.device): int(expert_counts.sum())}

    def _routing_stats(self, result: ModelOutput) -> RoutingStats | None:
        if result.routing is None:
            return None
        r = result.routing  # [T, moe_layers, k]
        L, E = r.shape[1], self.model.config.num_experts
        counts = result.seq_expert_counts.sum(0).tolist()  # [L, E]: the runner counted per sequence already
        zero = result.zero_expert  # [T, L, k] zero-computation assignments (LongCat), else None
        if self.placement_manager is not None:
            device_tokens = self.placement_manager.device_tokens(r)
        else:
            device_tokens = {str(self.runner.device): int(r.numel() - (0 if zero is None else zero.sum()))}
        dropped = None if result.dropped is None else result.dropped.sum(dim=(0, 2)).tolist()  # [L]
        zero_tokens = None if zero is None else zero.sum(dim=(0, 2)).tolist()  # [L]
        return RoutingStats(num_layers=L, num_experts=E, expert_tokens=counts, device_tokens=device_tokens,
                            dropped_tokens=dropped, zero_expert_tokens=zero_tokens, expert_ids=r)
