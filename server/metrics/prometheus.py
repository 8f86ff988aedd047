"""Core serving and HTTP series on a caller-owned `CollectorRegistry`.

prometheus_client's metric objects are individually thread-safe, so the engine thread may
update them while the event loop renders. Children for the fixed label sets are bound once
at construction (the series exist, at 0, from the first scrape, as in vLLM).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import Metric

from server.engine.stats import FinishedRequestStats, IterationStats

from . import names as n

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Bounds on HTTP label values (the route is a template, but guard against a caller passing
# raw paths anyway): past MAX_ROUTES distinct routes every new one is counted as "other".
MAX_ROUTES = 64
OTHER = "other"
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


def make_metric(spec: n.MetricSpec, registry: CollectorRegistry, max_model_len: int):
    """Build the prometheus_client object for a spec (exposed name exactly `spec.name`)."""
    common = {"name": spec.name, "documentation": spec.help, "labelnames": spec.labels,
              "registry": registry}
    if spec.kind == n.COUNTER:
        return Counter(**common)  # prometheus_client keeps a trailing "_total" as the suffix
    if spec.kind == n.GAUGE:
        return Gauge(**common)
    buckets = spec.buckets if spec.buckets is not None else n.build_1_2_5_buckets(max_model_len)
    return Histogram(buckets=buckets, **common)


class CoreMetrics:
    """The vLLM-named series, bound to one (model_name, engine) label pair."""

    def __init__(self, registry: CollectorRegistry, model_name: str, engine: str,
                 max_model_len: int = n.DEFAULT_MAX_MODEL_LEN) -> None:
        lv = (model_name, engine)

        def bind(spec: n.MetricSpec):
            return make_metric(spec, registry, max_model_len).labels(*lv)

        self.running = bind(n.NUM_REQUESTS_RUNNING)
        self.waiting = bind(n.NUM_REQUESTS_WAITING)
        self.kv_usage = bind(n.KV_CACHE_USAGE)
        self._cache_info = make_metric(n.CACHE_CONFIG_INFO, registry, max_model_len)
        self.prompt_tokens = bind(n.PROMPT_TOKENS)
        self.generation_tokens = bind(n.GENERATION_TOKENS)
        self.preemptions = bind(n.NUM_PREEMPTIONS)
        self.prefix_queries = bind(n.PREFIX_CACHE_QUERIES)
        self.prefix_hits = bind(n.PREFIX_CACHE_HITS)
        self.iteration_tokens = bind(n.ITERATION_TOKENS)
        self.ttft = bind(n.TIME_TO_FIRST_TOKEN)
        self.itl = bind(n.INTER_TOKEN_LATENCY)
        self.step_time = bind(n.ENGINE_STEP_DURATION)

        self.e2e = bind(n.E2E_REQUEST_LATENCY)
        self.queue = bind(n.REQUEST_QUEUE_TIME)
        self.inference = bind(n.REQUEST_INFERENCE_TIME)
        self.prefill = bind(n.REQUEST_PREFILL_TIME)
        self.decode = bind(n.REQUEST_DECODE_TIME)
        self.tpot = bind(n.REQUEST_TIME_PER_OUTPUT_TOKEN)
        self.req_prompt_tokens = bind(n.REQUEST_PROMPT_TOKENS)
        self.req_generation_tokens = bind(n.REQUEST_GENERATION_TOKENS)
        self.max_tokens_param = bind(n.REQUEST_PARAMS_MAX_TOKENS)
        self.n_param = bind(n.REQUEST_PARAMS_N)

        self.spec_drafts = bind(n.SPEC_DECODE_NUM_DRAFTS)
        self.spec_draft_tokens = bind(n.SPEC_DECODE_NUM_DRAFT_TOKENS)
        self.spec_accepted = bind(n.SPEC_DECODE_NUM_ACCEPTED_TOKENS)
        self._spec_per_pos = make_metric(n.SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS, registry, max_model_len)
        self._decode_steps = make_metric(n.DECODE_STEPS, registry, max_model_len)
        self._distinct = make_metric(n.DECODE_STEP_DISTINCT_EXPERTS, registry, max_model_len)

        success = make_metric(n.REQUEST_SUCCESS, registry, max_model_len)
        self._success_parent = success
        self._labelvalues = lv
        self.success = {r: success.labels(*lv, r) for r in n.FINISHED_REASONS}

    def set_cache_config(self, cache_dtype: str, block_size: int) -> None:
        """vllm:cache_config_info = 1 with the KV cache's settings (cache_dtype: --kv-cache-dtype as
        given, as vLLM labels it)."""
        self._cache_info.clear()
        self._cache_info.labels(*self._labelvalues, cache_dtype, str(block_size)).set(1)

    def record_iteration(self, it: IterationStats) -> None:
        self.running.set(it.num_running)
        self.waiting.set(it.num_waiting)
        self.kv_usage.set(it.kv_cache_usage)
        self.prompt_tokens.inc(max(0, it.num_prompt_tokens))
        self.generation_tokens.inc(max(0, it.num_generation_tokens))
        self.preemptions.inc(max(0, it.num_preemptions))
        self.prefix_queries.inc(max(0, it.prefix_cache_queries))
        self.prefix_hits.inc(max(0, it.prefix_cache_hits))
        # vLLM observes prompt + generation tokens of the step (not scheduled tokens).
        self.iteration_tokens.observe(it.num_prompt_tokens + it.num_generation_tokens)
        if it.step_time > 0:
            self.step_time.observe(it.step_time)
        for ttft in it.time_to_first_tokens:
            self.ttft.observe(ttft)
        for itl in it.inter_token_latencies:
            self.itl.observe(itl)
        if it.spec_num_drafts:
            self.spec_drafts.inc(it.spec_num_drafts)
            self.spec_draft_tokens.inc(it.spec_num_draft_tokens)
            self.spec_accepted.inc(it.spec_num_accepted_tokens)
            for pos, count in enumerate(it.spec_accepted_per_pos):
                self._spec_per_pos.labels(*self._labelvalues, str(pos)).inc(count)
        if it.decode_step_kind is not None and it.distinct_experts is not None:
            self._decode_steps.labels(*self._labelvalues, it.decode_step_kind).inc()
            for layer, count in enumerate(it.distinct_experts):
                self._distinct.labels(*self._labelvalues, str(layer), it.decode_step_kind).inc(count)

    def record_finished(self, req: FinishedRequestStats) -> None:
        child = self.success.get(req.finish_reason)
        if child is None:  # unknown reasons are bounded to one extra series
            child = self._success_parent.labels(*self._labelvalues, OTHER)
        child.inc()
        self.e2e.observe(req.e2e_latency)
        self.queue.observe(req.queued_time)
        self.inference.observe(req.inference_time)
        self.prefill.observe(req.prefill_time)
        self.decode.observe(req.decode_time)
        if req.num_generation_tokens > 1:
            self.tpot.observe(req.decode_time / (req.num_generation_tokens - 1))
        self.req_prompt_tokens.observe(req.num_prompt_tokens)
        self.req_generation_tokens.observe(req.num_generation_tokens)
        if req.max_tokens_param:
            self.max_tokens_param.observe(req.max_tokens_param)
        self.n_param.observe(req.n_param)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = make_metric(n.HTTP_REQUESTS, registry, n.DEFAULT_MAX_MODEL_LEN)
        self.duration = make_metric(n.HTTP_REQUEST_DURATION, registry, n.DEFAULT_MAX_MODEL_LEN)
        self._routes: set[str] = set()
        self._lock = threading.Lock()

    def _route(self, route: str) -> str:
        with self._lock:
            if route in self._routes:
                return route
            if len(self._routes) >= MAX_ROUTES:
                return OTHER
            self._routes.add(route)
            return route

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        route = self._route(route or OTHER)
        method = method.upper() if method and method.upper() in HTTP_METHODS else "OTHER"
        try:
            code = int(status)
            status_label = str(code) if 100 <= code <= 599 else OTHER
        except (TypeError, ValueError):
            status_label = OTHER
        self.requests.labels(route, method, status_label).inc()
        self.duration.labels(route, method).observe(max(0.0, float(seconds)))


class _WithoutCreated:
    """Collector view of a registry minus the OpenMetrics `*_created` samples.

    prometheus_client adds a `_created` gauge per counter/histogram child to the text format;
    vLLM dashboards never use them and they would double the series count.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


def render_registry(registry: CollectorRegistry) -> tuple[bytes, str]:
    return generate_latest(_WithoutCreated(registry)), CONTENT_TYPE

