"""A real Prometheus (127.0.0.1, 1 s scrapes, temp storage) scrapes ServerMetrics.render()."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from server.engine.stats import PlacementInfo
from server.metrics import ServerMetrics
from server.metrics import names as n

from .helpers import finished, iteration, routing

MODEL = "tiny-moe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def metrics_target() -> Iterator[tuple[ServerMetrics, int]]:
    metrics = ServerMetrics(MODEL, "0", 2, 4)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/metrics":
                self.send_error(404)
                return
            body, ctype = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield metrics, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def prometheus(prometheus_tools, metrics_target, tmp_path: Path) -> Iterator[Callable]:
    _, target_port = metrics_target
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: moe-serve\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n")
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [prometheus_tools["prometheus"], f"--config.file={cfg}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def query(expr: str) -> list[dict]:
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.load(resp)
        assert data["status"] == "success", data
        return data["data"]["result"]

    try:
        deadline = time.monotonic() + 90  # generous: CI machines can be heavily loaded
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.1)
        yield query
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_for(query: Callable, expr: str, ok: Callable[[list[dict]], bool],
             timeout: float = 90.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        result = query(expr)
        if ok(result):
            return result
        assert time.monotonic() < deadline, f"timed out on {expr!r}: {result}"
        time.sleep(0.25)


def scalar(result: list[dict]) -> float:
    assert len(result) == 1, result
    return float(result[0]["value"][1])


def test_real_prometheus_ingests_vllm_series_and_quantiles_work(metrics_target, prometheus):
    metrics, _ = metrics_target
    query = prometheus
    # first batch: 20 first tokens at 30 ms (bucket (0.02, 0.04])
    metrics.stat_logger.record(
        iteration(num_running=3, num_waiting=1, kv_cache_usage=0.5, num_prompt_tokens=100,
                  num_generation_tokens=20, time_to_first_tokens=[0.03] * 20,
                  inter_token_latencies=[0.02] * 20, spec_num_drafts=1, spec_num_draft_tokens=2,
                  spec_num_accepted_tokens=1, spec_accepted_per_pos=[1, 0]),
        [finished("stop"), finished("length")],
        routing([[1, 1, 1, 1], [8, 0, 0, 0]], {"cuda:0": 12}))
    metrics.set_placement(PlacementInfo([(0, 0, "cuda:0", 0), (1, 0, "cuda:1", 0)]))
    metrics.observe_http("/v1/completions", "POST", 200, 0.2)

    # observe_http ran last: once its series is in the TSDB, a scrape saw all of the above
    wait_for(query, 'moe_http_requests_total{route="/v1/completions"}', lambda r: len(r) == 1)

    # every vLLM-named sample name made it into the TSDB under its exact name
    got = query('count by (__name__) ({__name__=~"vllm:.+"})')
    ingested = {r["metric"]["__name__"] for r in got}
    expected = {s for spec in n.VLLM_SPECS for s in spec.series_names}
    assert ingested == expected, (expected - ingested, ingested - expected)
    labels = query("vllm:num_requests_running")[0]["metric"]
    assert labels["model_name"] == MODEL and labels["engine"] == "0"
    assert labels["job"] == "moe-serve"
    assert scalar(query('vllm:kv_cache_usage_perc{model_name="tiny-moe"}')) == 0.5
    assert scalar(query('vllm:request_success_total{finished_reason="length"}')) == 1
    assert scalar(query('moe_expert_load_imbalance{layer="1"}')) == 4.0
    assert len(query("moe_expert_placement")) == 2
    assert scalar(query('moe_http_requests_total{route="/v1/completions",status="200"}')) == 1

    # histogram_quantile over the raw buckets: the median TTFT lies in (0.02, 0.04]
    p50 = scalar(query(
        "histogram_quantile(0.5, sum by (le) (vllm:time_to_first_token_seconds_bucket))"))
    assert 0.02 < p50 <= 0.04

    # second batch, slower: 50 more first tokens at 300 ms (bucket (0.25, 0.5])
    metrics.stat_logger.record(iteration(time_to_first_tokens=[0.3] * 50), [], None)
    wait_for(query, "sum(vllm:time_to_first_token_seconds_count)",
             lambda r: len(r) == 1 and float(r[0]["value"][1]) == 70)
    # 50 of the 70 (or of the 50 new, if the first scrape came after batch one) are in
    # (0.25, 0.5]: the 90th percentile of the increase lies there either way
    p90 = scalar(query("histogram_quantile(0.9, sum by (le) "
                       "(increase(vllm:time_to_first_token_seconds_bucket[10m])))"))
    assert 0.25 < p90 <= 0.5
    # and the dashboard form (rate over a window) answers too
    expr = ("histogram_quantile(0.99, sum by (le) "
            "(rate(vllm:time_to_first_token_seconds_bucket[1m])))")
    wait_for(query, expr, lambda r: len(r) == 1 and 0.25 < float(r[0]["value"][1]) <= 0.5)
