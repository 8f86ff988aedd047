"""Live check of the Grafana dashboards and alert rules: the REAL server (bundled tiny checkpoint,
subprocess) is scraped every second by a REAL Prometheus that also loads
deploy/prometheus/alerts.yml; after real HTTP traffic, every dashboard panel expression (Grafana
variables substituted) and every alert expression is run through Prometheus' query API."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from .test_prometheus_e2e import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
MODEL = "tiny-mixtral"

# Grafana template variables as a dashboard with model_name=tiny-mixtral, layer=0 would send them.
VARIABLES = {
    "model_name": MODEL,
    "layer": "0",
    "__rate_interval": "30s",
    "__interval": "30s",
    "__range": "5m",
}
_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")

# Panel expressions that cannot return data without failure traffic (kept minimal):
NO_DATA_WITHOUT_FAILURES = {
    # numerator selects status=~"5.." only; the server answers no 5xx to this traffic, the
    # 5xx series never exist, so the division has no left-hand side (Grafana shows "No data").
    ('sum(rate(moe_http_requests_total{status=~"5.."}[$__rate_interval])) / '
     'clamp_min(sum(rate(moe_http_requests_total[$__rate_interval])), 1e-9)'),
}
# Panel expressions that have no data on this single-device launch (not a traffic matter):
NO_DATA_ON_ONE_DEVICE = {
    # moe_expert_placement is only exported when experts are spread over devices
    # (NativeCore.placement_info() is None when all experts live on one device).
    ('sum by (layer, expert, device, replica) '
     '(moe_expert_placement{model_name=~"$model_name", layer=~"$layer"})'),
    'count by (device) (moe_expert_placement{model_name=~"$model_name"})',
}
EXEMPT = NO_DATA_WITHOUT_FAILURES | NO_DATA_ON_ONE_DEVICE


def substitute(expr: str) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in VARIABLES, f"unknown Grafana variable ${name} in {expr!r}"
        return VARIABLES[name]
    return _VAR.sub(repl, expr)


def panel_targets(panels: list[dict]) -> Iterator[tuple[str, str]]:
    """(panel title, target expr) for every panel, recursing through rows/nested panels."""
    for p in panels:
        for t in p.get("targets", []):
            if t.get("expr"):
                yield p.get("title", "?"), t["expr"]
        yield from panel_targets(p.get("panels", []))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    logpath = tmp_path_factory.mktemp("server") / "server.log"
    log = logpath.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port),
         # an expert capacity, so that the dropped-tokens panel has real drops to show; n-gram
         # speculation, so that the speculative-decoding panels have drafts to show
         "--max-model-len", "256", "--num-kv-blocks", "256", "--expert-capacity-factor", "1.0",
         "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited:\n{logpath.read_text()}"
            try:
                if httpx.get(f"{base}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"server not ready:\n{logpath.read_text()}"
            time.sleep(0.2)
        yield base
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="module")
def prom(prometheus_tools, server, tmp_path_factory) -> Iterator[tuple[str, Callable]]:
    """A real Prometheus scraping the server every second, with alerts.yml loaded."""
    tmp = tmp_path_factory.mktemp("prometheus")
    target = urllib.parse.urlparse(server).netloc
    port = free_port()
    cfg = tmp / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {json.dumps(str(ALERTS))}\n"
        "scrape_configs:\n  - job_name: moe-serve\n    metrics_path: /metrics\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    logpath = tmp / "prometheus.log"
    log = logpath.open("w")
    proc = subprocess.Popen(
        [prometheus_tools["prometheus"], f"--config.file={cfg}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
         "--log.level=warn"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def api(path: str, **params: str) -> dict:
        r = httpx.get(f"{base}/api/v1/{path}", params=params, timeout=10)
        data = r.json()
        assert r.status_code == 200 and data["status"] == "success", (params, data)
        return data["data"]

    def query(expr: str) -> list[dict]:
        return api("query", query=expr)["result"]

    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, logpath.read_text()
            try:
                if httpx.get(f"{base}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.1)
        # the target is scraped (and up) before any traffic, so rates see the increase
        wait_for(query, 'up{job="moe-serve"}',
                 lambda r: len(r) == 1 and r[0]["value"][1] == "1", timeout=30)
        yield base, api
    finally:
        stop(proc)
        log.close()


def send_traffic(base: str) -> None:
    with httpx.Client(base_url=base, timeout=60) as c:
        models = c.get("/v1/models").json()
        assert [m["id"] for m in models["data"]] == [MODEL], models
        for i in range(12):
            body = {"model": MODEL, "prompt": f"The number {i} is",
                    "max_tokens": 1 if i % 4 == 3 else 8, "temperature": 0}
            if i % 3 == 0:
                with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    assert r.status_code == 200, r.read()
                    lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                assert lines[-1] == "data: [DONE]", lines
            else:
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] is not None
        for content in ("Hello there", "What is a mixture of experts?"):
            r = c.post("/v1/chat/completions", json={
                "model": MODEL, "max_tokens": 8,
                "messages": [{"role": "user", "content": content}]})
            assert r.status_code == 200, r.text
        # bad requests: missing prompt, negative max_tokens
        r = c.post("/v1/completions", json={"model": MODEL})
        assert r.status_code == 400, (r.status_code, r.text)
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": -1})
        assert r.status_code == 400, (r.status_code, r.text)
        assert c.get("/v1/no-such-route").status_code == 404


def test_dashboards_and_alerts_against_live_server(server, prom):
    _, api = prom

    def query(expr: str) -> list[dict]:
        return api("query", query=expr)["result"]

    send_traffic(server)
    traffic_done = time.time()
    # Prometheus has ingested the final counter value the server reports now ...
    text = httpx.get(f"{server}/metrics", timeout=10).text
    m = re.search(r'^vllm:generation_tokens_total\{[^}]*\} (\S+)$', text, re.MULTILINE)
    assert m, "vllm:generation_tokens_total missing from /metrics"
    generated = float(m.group(1))
    assert generated > 0
    wait_for(query, f'sum(vllm:generation_tokens_total{{model_name="{MODEL}"}})',
             lambda r: len(r) == 1 and float(r[0]["value"][1]) == generated, timeout=30)

    # ... and has scraped at least 3 times since the traffic ended
    def scrapes_since_traffic(r: list[dict]) -> bool:
        return len(r) == 1 and float(r[0]["value"][1]) >= 3

    def scrape_count() -> list[dict]:
        window = max(1, math.floor(time.time() - traffic_done))
        return query(f'count_over_time(up{{job="moe-serve"}}[{window}s])')

    deadline = time.monotonic() + 30
    while not scrapes_since_traffic(scrape_count()):
        assert time.monotonic() < deadline, "prometheus did not scrape 3 times after traffic"
        time.sleep(0.25)
    assert query('up{job="moe-serve"}')[0]["value"][1] == "1"

    # every dashboard panel expression parses and (unless listed above) returns data
    checked, empty, nan = 0, [], []
    for path in DASHBOARDS:
        dash = json.loads(path.read_text())
        for title, expr in panel_targets(dash["panels"]):
            result = query(substitute(expr))  # asserts status == success
            checked += 1
            if not result:
                if expr not in EXEMPT:
                    empty.append(f"{path.name} / {title}: {expr}")
            elif expr in EXEMPT:
                pytest.fail(f"exempted expression now returns data, drop it: {expr}")
            elif any(math.isnan(float(s["value"][1])) for s in result):
                nan.append(f"{path.name} / {title}: {expr}")
    assert checked >= 30, checked
    assert not empty, "panels without data:\n" + "\n".join(empty)
    print(f"\n{checked} panel expressions ok; NaN-valued (no observations in window): {nan}")

    # every alert expression parses in Prometheus, and the rule groups are loaded and healthy
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    alerts = {r["alert"]: r["expr"] for g in groups for r in g["rules"] if "alert" in r}
    assert alerts
    for expr in alerts.values():
        query(expr)  # asserts status == success

    def rules_ok() -> bool:
        loaded = api("rules")["groups"]
        return ({g["name"] for g in loaded} == {g["name"] for g in groups}
                and {r["name"] for g in loaded for r in g["rules"]} == set(alerts)
                and all(r["health"] == "ok" for g in loaded for r in g["rules"]))

    deadline = time.monotonic() + 15
    while not rules_ok():
        assert time.monotonic() < deadline, json.dumps(api("rules"), indent=1)
        time.sleep(0.25)
