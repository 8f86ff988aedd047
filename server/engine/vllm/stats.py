"""vLLM's per-step stats -> ours: a `StatLoggerBase` bridge turns vLLM's `SchedulerStats` /
`IterationStats` into our IterationStats + FinishedRequestStats and calls our stat loggers, so
the `vllm:*` series are rendered once, by our registry. The bridge subclasses vLLM's
`PrometheusStatLogger` only so that vLLM does not add its own Prometheus logger (which would
write into the global registry). Routed experts (vLLM on GPU with
`enable_return_routed_experts`) become RoutingStats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from server.engine.stats import FinishedRequestStats, IterationStats, RoutingStats, StatLogger
from server.engine.vllm.sampling import finish_reason

log = logging.getLogger(__name__)


class StatsBridge:
    """vLLM's per-step SchedulerStats / IterationStats -> our IterationStats + FinishedRequestStats."""

    def __init__(self, loggers: list[StatLogger], n_of: Callable[[str], int]):
        self._loggers = loggers
        self._n_of = n_of
        self._sched: dict[int, Any] = {}  # last SchedulerStats per engine (data parallel)
        self._last_gauges: tuple | None = None
        self._pending_routing: RoutingStats | None = None

    def add_routing(self, routing: RoutingStats) -> None:
        p = self._pending_routing
        if p is None or (p.num_layers, p.num_experts) != (routing.num_layers, routing.num_experts):
            self._pending_routing = routing
            return
        for row, add in zip(p.expert_tokens, routing.expert_tokens):
            for e, c in enumerate(add):
                row[e] += c
        for dev, c in routing.device_tokens.items():
            p.device_tokens[dev] = p.device_tokens.get(dev, 0) + c

    def record(self, sched: Any, it: Any, engine_idx: int = 0, force: bool = False) -> None:
        if sched is not None:
            self._sched[engine_idx] = sched
        all_sched = list(self._sched.values())
        ours = IterationStats(timestamp=time.monotonic())
        ours.num_running = sum(s.num_running_reqs for s in all_sched)
        ours.num_waiting = sum(s.num_waiting_reqs + getattr(s, "num_skipped_waiting_reqs", 0) for s in all_sched)
        ours.kv_cache_usage = (sum(s.kv_cache_usage for s in all_sched) / len(all_sched)) if all_sched else 0.0
        gauges = (ours.num_running, ours.num_waiting, round(ours.kv_cache_usage, 6))
        queries = int(sched.prefix_cache_stats.queries) if sched is not None else 0
        if it is None and not force and not queries and gauges == self._last_gauges:
            return  # nothing new: no token counts, no cache lookups, same gauges
        self._last_gauges = gauges
        if sched is not None:
            pcs = sched.prefix_cache_stats
            ours.prefix_cache_queries, ours.prefix_cache_hits = int(pcs.queries), int(pcs.hits)
            details = getattr(sched, "iteration_details", None)
            if details is not None:
                ours.step_time = float(details.elapsed_ms) / 1000.0
        finished: list[FinishedRequestStats] = []
        if it is not None:
            ours.num_prompt_tokens = int(it.num_prompt_tokens)
            ours.num_generation_tokens = int(it.num_generation_tokens)
            ours.num_batched_tokens = int(it.prompt_token_stats.computed) + ours.num_generation_tokens
            ours.num_preemptions = int(it.num_preempted_reqs)
            ours.time_to_first_tokens = list(it.time_to_first_tokens_iter)
            ours.inter_token_latencies = list(it.inter_token_latencies_iter)
            for f in it.finished_requests:
                finished.append(FinishedRequestStats(
                    finish_reason=finish_reason(f.finish_reason) or "stop", e2e_latency=f.e2e_latency,
                    queued_time=f.queued_time, prefill_time=f.prefill_time, decode_time=f.decode_time,
                    inference_time=f.inference_time, num_prompt_tokens=f.num_prompt_tokens,
                    num_generation_tokens=f.num_generation_tokens, max_tokens_param=f.max_tokens_param,
                    n_param=self._n_of(f.request_id or "")))
        routing, self._pending_routing = self._pending_routing, None
        for logger in self._loggers:
            try:
                logger.record(ours, finished, routing)
            except Exception:
                log.exception("stat logger failed")


def make_bridge_class(bridge: StatsBridge) -> type:
    """A vLLM stat-logger class feeding `bridge`; a PrometheusStatLogger subclass so vLLM adds
    no Prometheus logger of its own (StatLoggerManager checks isinstance)."""
    from vllm.v1.metrics.loggers import PrometheusStatLogger

    class MoEServeStatLogger(PrometheusStatLogger):
        def __init__(self, vllm_config: Any, engine_indexes: list[int] | None = None):
            self.engine_indexes = engine_indexes or [0]  # no vLLM metric objects are created

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            bridge.record(scheduler_stats, iteration_stats, engine_idx)

        def record_admission_rejection(self, reason: str) -> None:
            pass

        def record_sleep_state(self, sleep: int = 0, level: int = 0) -> None:
            pass

        def log_engine_initialized(self) -> None:
            pass

        def log(self) -> None:
            pass

    return MoEServeStatLogger


def routing_from_experts(experts: Any, num_experts: int, device: str) -> RoutingStats | None:
    """[num_tokens, num_layers, top_k] expert ids (numpy) -> per-(layer, expert) token counts."""
    import numpy as np

    from server.engine.expert_counts import expert_counts

    arr = np.asarray(experts)
    if arr.ndim != 3 or arr.size == 0 or num_experts <= 0:
        return None
    counts = expert_counts(arr.astype(np.int64), num_experts)[0]  # [layers, experts]
    return RoutingStats(num_layers=arr.shape[1], num_experts=num_experts, expert_tokens=counts.tolist(),
                        device_tokens={device: int(arr.size)})
