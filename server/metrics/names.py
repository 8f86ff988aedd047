"""Every metric name, label name and bucket edge moe-serve exposes, in one place.

The core serving series (`vllm:*`) copy vLLM v1's names, label names, types and bucket edges
(`vllm/v1/metrics/loggers.py`, `PrometheusStatLogger`) so dashboards, KEDA triggers and
gateways written for vLLM work unchanged. Our own series use the `moe_` prefix.

`MetricSpec.name` is the *exposed* family name: counters include the `_total` suffix, exactly as
it appears on `/metrics` and in PromQL. Histograms expose `<name>_bucket`, `_sum` and `_count`.
Dashboards, alert rules and docs are checked against this module by the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"

# ---- label names ---------------------------------------------------------------------------
MODEL_NAME = "model_name"
ENGINE = "engine"  # vLLM: engine-core index; here: ServerMetrics(engine_name=...)
FINISHED_REASON = "finished_reason"
LAYER = "layer"
EXPERT = "expert"
DEVICE = "device"
REPLICA = "replica"
ROUTE = "route"
METHOD = "method"
STATUS = "status"
OUTCOME = "outcome"
POSITION = "position"  # speculative decoding: the draft position (0-based)
STEP = "step"  # a decode-only engine step: "verify" (drafts verified) or "decode" (plain)
CACHE_DTYPE = "cache_dtype"  # vllm:cache_config_info: --kv-cache-dtype as given (auto, fp8, fp8_e4m3)
BLOCK_SIZE = "block_size"

CORE_LABELS: tuple[str, ...] = (MODEL_NAME, ENGINE)

# vLLM's FinishReason values; the request_success series are created up front for each.
FINISHED_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error")
# how a grammar compile ended (server/engine/structured/compile_pool.py); series made up front
GRAMMAR_OUTCOMES: tuple[str, ...] = ("compiled", "invalid", "timeout", "too_large", "failed")

# ---- bucket edges --------------------------------------------------------------------------
# vLLM: vllm:time_to_first_token_seconds
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
# vLLM: vllm:inter_token_latency_seconds, vllm:request_time_per_output_token_seconds
INTER_TOKEN_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)
# vLLM: request_latency_buckets (e2e, queue, inference, prefill, decode)
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)
# vLLM: vllm:iteration_tokens_total
ITERATION_TOKENS_BUCKETS: tuple[float, ...] = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
)
# vLLM: vllm:request_params_n
REQUEST_N_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20)
# ours: HTTP request latency (streams can be long-lived)
HTTP_LATENCY_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0,
)
# ours: one engine step
STEP_TIME_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# ours: one grammar compile (its budget is --grammar-compile-timeout, 10 s by default)
GRAMMAR_COMPILE_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

DEFAULT_MAX_MODEL_LEN = 131072


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to and including max_value.

    >>> build_1_2_5_buckets(100)
    (1, 2, 5, 10, 20, 50, 100)
    """
    if max_value < 1:
        raise ValueError(f"max_value must be >= 1, got {max_value}")
    out: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(value)
        exponent += 1


@dataclass(frozen=True)
class MetricSpec:
    name: str  # exposed family name (counters end in _total)
    kind: str  # COUNTER | GAUGE | HISTOGRAM
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None  # histograms; None = token-count 1-2-5 buckets
    source: str = "moe"  # "vllm": name/labels/buckets copied from vLLM

    @property
    def series_names(self) -> tuple[str, ...]:
        """Every sample name this family exposes."""
        if self.kind == HISTOGRAM:
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


def _v(name: str, kind: str, help: str, *, extra: tuple[str, ...] = (), buckets=None) -> MetricSpec:
    return MetricSpec(name, kind, help, CORE_LABELS + extra, buckets, source="vllm")


# ---- core serving series (vLLM names) ------------------------------------------------------
NUM_REQUESTS_RUNNING = _v(
    "vllm:num_requests_running", GAUGE, "Number of requests in model execution batches.")
NUM_REQUESTS_WAITING = _v(
    "vllm:num_requests_waiting", GAUGE, "Number of requests waiting to be processed.")
KV_CACHE_USAGE = _v(
    "vllm:kv_cache_usage_perc", GAUGE, "KV-cache usage. 1 means 100 percent usage.")
CACHE_CONFIG_INFO = _v(
    "vllm:cache_config_info", GAUGE, "Information of the LLMEngine CacheConfig", extra=(CACHE_DTYPE, BLOCK_SIZE))

PROMPT_TOKENS = _v("vllm:prompt_tokens_total", COUNTER, "Number of prefill tokens processed.")
GENERATION_TOKENS = _v(
    "vllm:generation_tokens_total", COUNTER, "Number of generation tokens processed.")
NUM_PREEMPTIONS = _v(
    "vllm:num_preemptions_total", COUNTER, "Cumulative number of preemption from the engine.")
PREFIX_CACHE_QUERIES = _v(
    "vllm:prefix_cache_queries_total", COUNTER,
    "Prefix cache queries, in terms of number of queried tokens.")
PREFIX_CACHE_HITS = _v(
    "vllm:prefix_cache_hits_total", COUNTER,
    "Prefix cache hits, in terms of number of cached tokens.")
REQUEST_SUCCESS = _v(
    "vllm:request_success_total", COUNTER, "Count of successfully processed requests.",
    extra=(FINISHED_REASON,))

REQUEST_PROMPT_TOKENS = _v(
    "vllm:request_prompt_tokens", HISTOGRAM, "Number of prefill tokens processed.")
REQUEST_GENERATION_TOKENS = _v(
    "vllm:request_generation_tokens", HISTOGRAM, "Number of generation tokens processed.")
ITERATION_TOKENS = _v(
    "vllm:iteration_tokens_total", HISTOGRAM, "Histogram of number of tokens per engine_step.",
    buckets=ITERATION_TOKENS_BUCKETS)
REQUEST_PARAMS_N = _v(
    "vllm:request_params_n", HISTOGRAM, "Histogram of the n request parameter.",
    buckets=REQUEST_N_BUCKETS)
REQUEST_PARAMS_MAX_TOKENS = _v(
    "vllm:request_params_max_tokens", HISTOGRAM,
    "Histogram of the max_tokens request parameter.")

TIME_TO_FIRST_TOKEN = _v(
    "vllm:time_to_first_token_seconds", HISTOGRAM,
    "Histogram of time to first token in seconds.", buckets=TTFT_BUCKETS)
INTER_TOKEN_LATENCY = _v(
    "vllm:inter_token_latency_seconds", HISTOGRAM,
    "Histogram of inter-token latency in seconds.", buckets=INTER_TOKEN_BUCKETS)
REQUEST_TIME_PER_OUTPUT_TOKEN = _v(
    "vllm:request_time_per_output_token_seconds", HISTOGRAM,
    "Histogram of time_per_output_token_seconds per request.", buckets=INTER_TOKEN_BUCKETS)
E2E_REQUEST_LATENCY = _v(
    "vllm:e2e_request_latency_seconds", HISTOGRAM,
    "Histogram of e2e request latency in seconds.", buckets=REQUEST_LATENCY_BUCKETS)
REQUEST_QUEUE_TIME = _v(
    "vllm:request_queue_time_seconds", HISTOGRAM,
    "Histogram of time spent in WAITING phase for request.", buckets=REQUEST_LATENCY_BUCKETS)
REQUEST_INFERENCE_TIME = _v(
    "vllm:request_inference_time_seconds", HISTOGRAM,
    "Histogram of time spent in RUNNING phase for request.", buckets=REQUEST_LATENCY_BUCKETS)
REQUEST_PREFILL_TIME = _v(
    "vllm:request_prefill_time_seconds", HISTOGRAM,
    "Histogram of time spent in PREFILL phase for request.", buckets=REQUEST_LATENCY_BUCKETS)
REQUEST_DECODE_TIME = _v(
    "vllm:request_decode_time_seconds", HISTOGRAM,
    "Histogram of time spent in DECODE phase for request.", buckets=REQUEST_LATENCY_BUCKETS)

# ---- speculative decoding (vLLM names) ------------------------------------------------------
SPEC_DECODE_NUM_DRAFTS = _v(
    "vllm:spec_decode_num_drafts_total", COUNTER, "Number of spec decoding drafts.")
SPEC_DECODE_NUM_DRAFT_TOKENS = _v(
    "vllm:spec_decode_num_draft_tokens_total", COUNTER, "Number of draft tokens.")
SPEC_DECODE_NUM_ACCEPTED_TOKENS = _v(
    "vllm:spec_decode_num_accepted_tokens_total", COUNTER, "Number of accepted tokens.")
SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS = _v(
    "vllm:spec_decode_num_accepted_tokens_per_pos_total", COUNTER,
    "Accepted tokens per draft position.", extra=(POSITION,))

# ---- our engine series ---------------------------------------------------------------------
ENGINE_STEP_DURATION = MetricSpec(
    "moe_engine_step_duration_seconds", HISTOGRAM, "Wall time of one engine step in seconds.",
    CORE_LABELS, STEP_TIME_BUCKETS)

DECODE_STEPS = MetricSpec(
    "moe_decode_steps_total", COUNTER,
    "Engine steps without prefill tokens, by kind: verify (some sequence verified speculative drafts) "
    "or decode (one token per sequence).", CORE_LABELS + (STEP,))
DECODE_STEP_DISTINCT_EXPERTS = MetricSpec(
    "moe_decode_step_distinct_experts_total", COUNTER,
    "Distinct experts the tokens of such steps touched, per MoE layer, summed over steps "
    "(divide by moe_decode_steps_total: experts streamed per verify step vs per plain decode step).",
    CORE_LABELS + (LAYER, STEP))

# ---- HTTP ----------------------------------------------------------------------------------
HTTP_REQUESTS = MetricSpec(
    "moe_http_requests_total", COUNTER,
    "HTTP requests served, by route template, method and status code.",
    (ROUTE, METHOD, STATUS))
HTTP_REQUEST_DURATION = MetricSpec(
    "moe_http_request_duration_seconds", HISTOGRAM,
    "HTTP request latency in seconds (until the response, or the stream, ends).",
    (ROUTE, METHOD), HTTP_LATENCY_BUCKETS)

# ---- structured outputs: grammar compiles ----------------------------------------------------
GRAMMAR_COMPILES_WAITING = MetricSpec(
    "moe_grammar_compiles_waiting", GAUGE,
    "Grammar compiles (distinct specs) queued for a compile process.", ())
GRAMMAR_COMPILES_RUNNING = MetricSpec(
    "moe_grammar_compiles_running", GAUGE,
    "Grammar compiles under way (the trial in a compile process, then the server's own).", ())
GRAMMAR_COMPILE_DURATION = MetricSpec(
    "moe_grammar_compile_duration_seconds", HISTOGRAM,
    "Wall time of one grammar compile (trial and, when accepted, the server's own), by outcome.", (OUTCOME,),
    GRAMMAR_COMPILE_BUCKETS)
GRAMMAR_CACHE_BYTES = MetricSpec(
    "moe_grammar_cache_bytes", GAUGE, "Bytes held by the compiled-grammar cache (grammars and their specs).", ())

# ---- MoE routing and placement -------------------------------------------------------------
EXPERT_TOKENS = MetricSpec(
    "moe_expert_tokens_total", COUNTER,
    "Token-to-expert assignments routed to each logical expert.",
    (MODEL_NAME, LAYER, EXPERT))
EXPERT_LOAD_IMBALANCE = MetricSpec(
    "moe_expert_load_imbalance", GAUGE,
    "Max over mean of per-expert token load in a layer over the sliding window "
    "(1 = perfectly balanced, num_experts = all tokens on one expert).",
    (MODEL_NAME, LAYER))
EXPERT_PLACEMENT = MetricSpec(
    "moe_expert_placement", GAUGE,
    "1 for each placed copy (replica) of a logical expert on a device.",
    (MODEL_NAME, LAYER, EXPERT, DEVICE, REPLICA))
DEVICE_EXPERT_TOKENS = MetricSpec(
    "moe_device_expert_tokens_total", COUNTER,
    "Token-to-expert assignments executed on each device.", (MODEL_NAME, DEVICE))
DROPPED_TOKENS = MetricSpec(
    "moe_dropped_tokens_total", COUNTER,
    "Token-to-expert assignments dropped over expert capacity (--expert-capacity-factor), per MoE layer.",
    (MODEL_NAME, LAYER))
ZERO_EXPERT_TOKENS = MetricSpec(
    "moe_zero_expert_tokens_total", COUNTER,
    "Token assignments to zero-computation experts (LongCat-Flash: the token passes through, scaled), "
    "per MoE layer; not counted in moe_expert_tokens_total.",
    (MODEL_NAME, LAYER))

VLLM_SPECS: tuple[MetricSpec, ...] = (
    NUM_REQUESTS_RUNNING, NUM_REQUESTS_WAITING, KV_CACHE_USAGE, CACHE_CONFIG_INFO,
    PROMPT_TOKENS, GENERATION_TOKENS, NUM_PREEMPTIONS, PREFIX_CACHE_QUERIES, PREFIX_CACHE_HITS,
    REQUEST_SUCCESS,
    REQUEST_PROMPT_TOKENS, REQUEST_GENERATION_TOKENS, ITERATION_TOKENS, REQUEST_PARAMS_N,
    REQUEST_PARAMS_MAX_TOKENS,
    TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, REQUEST_TIME_PER_OUTPUT_TOKEN,
    E2E_REQUEST_LATENCY, REQUEST_QUEUE_TIME, REQUEST_INFERENCE_TIME, REQUEST_PREFILL_TIME,
    REQUEST_DECODE_TIME,
    SPEC_DECODE_NUM_DRAFTS, SPEC_DECODE_NUM_DRAFT_TOKENS, SPEC_DECODE_NUM_ACCEPTED_TOKENS,
    SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS,
)
ENGINE_SPECS: tuple[MetricSpec, ...] = (ENGINE_STEP_DURATION, DECODE_STEPS, DECODE_STEP_DISTINCT_EXPERTS)
HTTP_SPECS: tuple[MetricSpec, ...] = (HTTP_REQUESTS, HTTP_REQUEST_DURATION)
GRAMMAR_SPECS: tuple[MetricSpec, ...] = (
    GRAMMAR_COMPILES_WAITING, GRAMMAR_COMPILES_RUNNING, GRAMMAR_COMPILE_DURATION, GRAMMAR_CACHE_BYTES,
)
MOE_SPECS: tuple[MetricSpec, ...] = (
    EXPERT_TOKENS, EXPERT_LOAD_IMBALANCE, EXPERT_PLACEMENT, DEVICE_EXPERT_TOKENS, DROPPED_TOKENS,
    ZERO_EXPERT_TOKENS,
)
ALL_SPECS: tuple[MetricSpec, ...] = VLLM_SPECS + ENGINE_SPECS + HTTP_SPECS + GRAMMAR_SPECS + MOE_SPECS

# Series from prometheus_client's process/platform/GC collectors (registered on every
# ServerMetrics registry; process_* only on Linux), and series Prometheus itself synthesizes.
RUNTIME_SERIES: frozenset[str] = frozenset({
    "process_virtual_memory_bytes", "process_resident_memory_bytes",
    "process_start_time_seconds", "process_cpu_seconds_total", "process_open_fds",
    "process_max_fds", "python_info", "python_gc_objects_collected_total",
    "python_gc_objects_uncollectable_total", "python_gc_collections_total",
})
PROMETHEUS_SYNTHETIC_SERIES: frozenset[str] = frozenset({
    "up", "scrape_duration_seconds", "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling", "scrape_series_added",
})


def known_series_names() -> frozenset[str]:
    """Every sample name a PromQL expression may reference against a moe-serve target."""
    names: set[str] = set(RUNTIME_SERIES) | set(PROMETHEUS_SYNTHETIC_SERIES)
    for spec in ALL_SPECS:
        names.update(spec.series_names)
    return frozenset(names)
