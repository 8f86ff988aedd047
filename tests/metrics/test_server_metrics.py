"""ServerMetrics: core (vLLM-named) series, HTTP series, rendering, isolation, threads."""

from __future__ import annotations

import json
import logging
import sys
import threading

import prometheus_client
import pytest

from server.engine.stats import PlacementInfo
from server.metrics import CONTENT_TYPE, ServerMetrics
from server.metrics import names as n

from .helpers import (
    bucket_edges,
    declared_types,
    finished,
    iteration,
    routing,
    samples,
    series,
    value,
)

MODEL = "tiny-moe"
CORE = {"model_name": MODEL, "engine": "0"}

# Copied from vLLM v1 vllm/v1/metrics/loggers.py (PrometheusStatLogger), see docs/metrics.md.
VLLM_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
             7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
VLLM_ITL = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0]
VLLM_REQUEST = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
VLLM_ITER = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]


def full_metrics(**kw) -> ServerMetrics:
    m = ServerMetrics(MODEL, "0", 2, 4, max_model_len=1000, **kw)
    m.stat_logger.record(
        iteration(num_running=3, num_waiting=2, kv_cache_usage=0.25, num_prompt_tokens=30,
                  num_generation_tokens=4, num_preemptions=1, prefix_cache_queries=30,
                  prefix_cache_hits=12, step_time=0.02, time_to_first_tokens=[0.03, 0.3],
                  inter_token_latencies=[0.02, 0.02, 0.2], spec_num_drafts=2, spec_num_draft_tokens=6,
                  spec_num_accepted_tokens=3, spec_accepted_per_pos=[2, 1, 0], decode_step_kind="verify",
                  distinct_experts=[3, 4]),
        [finished("stop", max_tokens_param=64, n_param=2), finished("length")],
        routing([[1, 1, 1, 1], [4, 0, 0, 0]], {"cuda:0": 6, "cuda:1": 2}, dropped=[1, 2], zero=[3, 0]))
    m.set_placement(PlacementInfo([(0, 0, "cuda:0", 0), (0, 0, "cuda:1", 1)]))
    m.observe_http("/v1/chat/completions", "POST", 200, 0.5)
    return m


def test_every_declared_metric_is_exposed_with_exact_name_type_and_labels():
    m = full_metrics()
    body, ctype = m.render()
    assert ctype == CONTENT_TYPE and ctype.startswith("text/plain; version=0.0.4")
    types = declared_types(body)
    smp = samples(body)
    for spec in n.ALL_SPECS:
        assert types.get(spec.name) == spec.kind, spec.name
        for sname in spec.series_names:
            got = [ls for (name, ls) in smp if name == sname]
            assert got, f"no samples for {sname}"
            extra = {"le"} if sname.endswith("_bucket") else set()
            for ls in got:
                assert {k for k, _ in ls} == set(spec.labels) | extra, sname
    # nothing exposed that names.py does not know about
    assert {name for name, _ in smp} <= n.known_series_names()
    assert not any(name.endswith("_created") for name, _ in smp)


def test_vllm_bucket_edges_and_label_names():
    smp = samples(full_metrics().render()[0])
    assert bucket_edges(smp, "vllm:time_to_first_token_seconds") == VLLM_TTFT
    assert bucket_edges(smp, "vllm:inter_token_latency_seconds") == VLLM_ITL
    assert bucket_edges(smp, "vllm:request_time_per_output_token_seconds") == VLLM_ITL
    for name in ("e2e_request_latency", "request_queue_time", "request_inference_time",
                 "request_prefill_time", "request_decode_time"):
        assert bucket_edges(smp, f"vllm:{name}_seconds") == VLLM_REQUEST, name
    assert bucket_edges(smp, "vllm:iteration_tokens_total") == VLLM_ITER
    assert bucket_edges(smp, "vllm:request_params_n") == [1, 2, 5, 10, 20]
    one_two_five = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]  # build_1_2_5_buckets(1000)
    for name in ("request_prompt_tokens", "request_generation_tokens",
                 "request_params_max_tokens"):
        assert bucket_edges(smp, f"vllm:{name}") == one_two_five, name
    assert n.build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert all(s.labels[:2] == ("model_name", "engine") for s in n.VLLM_SPECS)
    assert n.REQUEST_SUCCESS.labels == ("model_name", "engine", "finished_reason")


def test_iteration_and_finished_stats_feed_counters_and_histograms():
    smp = samples(full_metrics().render()[0])
    assert value(smp, "vllm:num_requests_running", **CORE) == 3
    assert value(smp, "vllm:num_requests_waiting", **CORE) == 2
    assert value(smp, "vllm:kv_cache_usage_perc", **CORE) == 0.25
    assert value(smp, "vllm:prompt_tokens_total", **CORE) == 30
    assert value(smp, "vllm:generation_tokens_total", **CORE) == 4
    assert value(smp, "vllm:num_preemptions_total", **CORE) == 1
    assert value(smp, "vllm:prefix_cache_queries_total", **CORE) == 30
    assert value(smp, "vllm:prefix_cache_hits_total", **CORE) == 12
    assert value(smp, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(smp, "vllm:request_success_total", finished_reason="length") == 1
    assert value(smp, "vllm:request_success_total", finished_reason="abort") == 0
    # TTFT: 0.03 and 0.3 -> le=0.04 holds 1, le=0.5 holds 2
    ttft = "vllm:time_to_first_token_seconds"
    assert value(smp, f"{ttft}_count", **CORE) == 2
    assert value(smp, f"{ttft}_sum", **CORE) == pytest.approx(0.33)
    assert value(smp, f"{ttft}_bucket", le="0.02") == 0
    assert value(smp, f"{ttft}_bucket", le="0.04") == 1
    assert value(smp, f"{ttft}_bucket", le="0.5") == 2
    assert value(smp, "vllm:inter_token_latency_seconds_count", **CORE) == 3
    assert value(smp, "vllm:inter_token_latency_seconds_bucket", le="0.025") == 2
    assert value(smp, "vllm:iteration_tokens_total_sum", **CORE) == 34  # prompt + generation
    assert value(smp, "moe_engine_step_duration_seconds_count", **CORE) == 1
    # two finished requests
    assert value(smp, "vllm:e2e_request_latency_seconds_count", **CORE) == 2
    assert value(smp, "vllm:e2e_request_latency_seconds_sum", **CORE) == 2.0
    assert value(smp, "vllm:request_queue_time_seconds_sum", **CORE) == pytest.approx(0.2)
    assert value(smp, "vllm:request_prefill_time_seconds_sum", **CORE) == pytest.approx(0.4)
    assert value(smp, "vllm:request_decode_time_seconds_sum", **CORE) == pytest.approx(1.4)
    assert value(smp, "vllm:request_inference_time_seconds_sum", **CORE) == pytest.approx(1.8)
    assert value(smp, "vllm:request_prompt_tokens_sum", **CORE) == 20
    assert value(smp, "vllm:request_generation_tokens_sum", **CORE) == 16
    # decode 0.7 s over 8 tokens -> 0.1 s per output token after the first
    tpot = "vllm:request_time_per_output_token_seconds_sum"
    assert value(smp, tpot, **CORE) == pytest.approx(0.2)
    # max_tokens only observed when given; n observed per request
    assert value(smp, "vllm:request_params_max_tokens_count", **CORE) == 1
    assert value(smp, "vllm:request_params_max_tokens_sum", **CORE) == 64
    assert value(smp, "vllm:request_params_n_sum", **CORE) == 3


def test_counters_accumulate_over_steps_and_unknown_finish_reason_is_bounded():
    m = ServerMetrics(MODEL, "0")
    for _ in range(5):
        m.stat_logger.record(iteration(num_prompt_tokens=2, num_generation_tokens=1), [], None)
    m.stat_logger.record(iteration(), [finished("weird"), finished("weirder")], None)
    smp = samples(m.render()[0])
    assert value(smp, "vllm:prompt_tokens_total", **CORE) == 10
    assert value(smp, "vllm:generation_tokens_total", **CORE) == 5
    assert value(smp, "vllm:request_success_total", finished_reason="other") == 2
    assert len(series(smp, "vllm:request_success_total")) == len(n.FINISHED_REASONS) + 1


def test_http_metrics_route_method_status_and_cardinality_bound():
    m = ServerMetrics(MODEL, "0")
    m.observe_http("/v1/models/{model}", "get", 404, 0.001)
    m.observe_http("/v1/models/{model}", "GET", 404, 0.002)
    m.observe_http("/v1/chat/completions", "POST", 503, 0.3)
    m.observe_http("/v1/chat/completions", "BREW", 200, 0.3)
    for i in range(200):  # a caller wrongly passing raw paths
        m.observe_http(f"/raw/{i}", "GET", 200, 0.01)
    smp = samples(m.render()[0])
    reqs = "moe_http_requests_total"
    assert value(smp, reqs, route="/v1/models/{model}", method="GET", status="404") == 2
    assert value(smp, reqs, route="/v1/chat/completions", method="POST", status="503") == 1
    assert value(smp, reqs, route="/v1/chat/completions", method="OTHER", status="200") == 1
    routes = {dict(ls)["route"] for ls in series(smp, reqs)}
    assert len(routes) <= 65 and "other" in routes
    dur = "moe_http_request_duration_seconds"
    assert value(smp, f"{dur}_count", route="/v1/models/{model}", method="GET") == 2
    assert value(smp, f"{dur}_bucket", route="/v1/models/{model}", method="GET", le="0.005") == 2


def test_registry_isolation_between_instances():
    a, b = ServerMetrics(MODEL, "0", 1, 2), ServerMetrics(MODEL, "0", 1, 2)
    a.stat_logger.record(iteration(num_running=7, num_prompt_tokens=5), [],
                         routing([[3, 1]]))
    a.observe_http("/health", "GET", 200, 0.001)
    sa, sb = samples(a.render()[0]), samples(b.render()[0])
    assert value(sa, "vllm:num_requests_running", **CORE) == 7
    assert value(sb, "vllm:num_requests_running", **CORE) == 0
    assert value(sb, "vllm:prompt_tokens_total", **CORE) == 0
    assert value(sb, "moe_expert_tokens_total", layer="0", expert="0") == 0
    assert not series(sb, "moe_http_requests_total")
    assert a.registry is not b.registry
    # nothing leaked into prometheus_client's global registry
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(x.startswith(("vllm:", "moe_")) for x in global_names)
    # both carry their own process/platform collectors
    for smp in (sa, sb):
        names = {k[0] for k in smp}
        assert "python_info" in names
        if sys.platform.startswith("linux"):  # ProcessCollector reads /proc
            assert "process_cpu_seconds_total" in names


def test_record_never_raises_into_the_engine(caplog):
    m = ServerMetrics(MODEL, "0")
    with caplog.at_level(logging.ERROR, logger="server.metrics"):
        m.stat_logger.record(iteration(time_to_first_tokens=["bad"]), [], None)  # type: ignore
        m.stat_logger.record(iteration(num_prompt_tokens=1), [], None)
    assert "recording engine stats failed" in caplog.text
    assert value(samples(m.render()[0]), "vllm:prompt_tokens_total", **CORE) == 1


def test_routing_snapshot_is_json_serialisable():
    snap = full_metrics().routing_snapshot()
    assert json.loads(json.dumps(snap)) == snap
    assert snap["model"] == MODEL and snap["num_layers"] == 2 and snap["num_experts"] == 4
    assert snap["layers"][1]["window_tokens"] == [4, 0, 0, 0]
    assert snap["layers"][1]["imbalance"] == 4.0
    assert snap["device_tokens"] == {"cuda:0": 6, "cuda:1": 2}
    assert snap["dropped_tokens"] == 3 and snap["dropped_tokens_per_layer"] == [1, 2]
    assert snap["zero_expert_tokens_per_layer"] == [3, 0]
    assert len(snap["placement"]) == 2


def test_engine_thread_records_while_loop_renders():
    """record() from one thread, render() from another: no errors, every scrape parses,
    counters only grow, and the MoE snapshot is never torn (all layers equal per scrape)."""
    m = ServerMetrics(MODEL, "0", 4, 8)
    steps = 1500
    loads = [[1] * 8 for _ in range(4)]  # each step adds 8 tokens to every layer
    errors: list[BaseException] = []

    def engine() -> None:
        try:
            for _ in range(steps):
                m.stat_logger.record(iteration(num_prompt_tokens=1, inter_token_latencies=[0.01]),
                                     [finished()], routing(loads, {"cuda:0": 32}))
        except Exception as e:  # pragma: no cover  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=engine)
    t.start()
    last = -1.0
    renders = 0
    while t.is_alive() or renders == 0:
        smp = samples(m.render()[0])
        renders += 1
        now = value(smp, "vllm:prompt_tokens_total", **CORE)
        assert now >= last
        last = now
        per_layer = {}
        for ls, v in series(smp, "moe_expert_tokens_total").items():
            layer = dict(ls)["layer"]
            per_layer[layer] = per_layer.get(layer, 0) + v
        assert len(set(per_layer.values())) == 1, per_layer
    t.join()
    assert not errors
    smp = samples(m.render()[0])
    assert value(smp, "vllm:prompt_tokens_total", **CORE) == steps
    assert value(smp, "vllm:e2e_request_latency_seconds_count", **CORE) == steps
    assert value(smp, "moe_expert_tokens_total", layer="3", expert="7") == steps
    assert value(smp, "moe_device_expert_tokens_total", device="cuda:0") == 32 * steps


def test_speculative_decoding_series():
    smp = samples(full_metrics().render()[0])

    def value(name: str, **labels: str) -> float:
        hits = [v for (nm, ls), v in smp.items() if nm == name and all((k, x) in ls for k, x in labels.items())]
        assert len(hits) == 1, (name, labels, hits)
        return hits[0]

    assert value("vllm:spec_decode_num_drafts_total") == 2
    assert value("vllm:spec_decode_num_draft_tokens_total") == 6
    assert value("vllm:spec_decode_num_accepted_tokens_total") == 3
    assert [value("vllm:spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(3)] == [2, 1, 0]
    assert value("moe_decode_steps_total", step="verify") == 1
    assert [value("moe_decode_step_distinct_experts_total", layer=str(i), step="verify") for i in range(2)] == [3, 4]
