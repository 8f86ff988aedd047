"""Grafana dashboards: structure, datasource/model variables, and PromQL metric names."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from server.metrics.names import known_series_names

from .promql import metric_names

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted(GRAFANA.glob("*.json"))


def load_builder():
    spec = importlib.util.spec_from_file_location("build_dashboards",
                                                  GRAFANA / "build_dashboards.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def all_panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows nest their panels
    return out


def exprs(dash: dict) -> list[str]:
    found = [t["expr"] for p in all_panels(dash) for t in p.get("targets", []) if "expr" in t]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            found.append(var["definition"])
            found.append(var["query"]["query"])
    return found


def test_promql_name_extractor():
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:time_to_first_token_'
        'seconds_bucket{model_name=~"$model_name", x="a{b}"}[$__rate_interval])))'
    ) == {"vllm:time_to_first_token_seconds_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / clamp_min(sum(b), 1e-9) and on(job) up > 0"
                        ) == {"a_total", "b", "up"}
    assert metric_names("topk(10, sum by (layer) (x offset 5m))") == {"x"}
    assert metric_names('label_values(moe_expert_tokens_total{model_name=~"$m"}, layer)') == {
        "moe_expert_tokens_total"}


def test_expected_dashboards_exist_and_are_up_to_date():
    assert {p.name for p in DASHBOARDS} == {"moe-serve-serving.json", "moe-serve-moe.json"}
    builder = load_builder()
    for fname, build in builder.DASHBOARDS.items():
        assert (GRAFANA / fname).read_text() == builder.render(build), (
            f"{fname} is stale: run python deploy/grafana/build_dashboards.py")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path):
    dash = json.loads(path.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query"
    panels = all_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("x", "y", "w", "h")), p["title"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):  # panels must not overlap
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"overlap at {x},{y}: {p['title']}"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert "model_name" in t["expr"] or "moe_http_" in t["expr"], t["expr"]
        if p.get("repeat"):
            assert p["repeat"] in variables


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_metric_names_exist(path: Path):
    dash = json.loads(path.read_text())
    known = known_series_names()
    used: set[str] = set()
    for expr in exprs(dash):
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        unknown = names - known
        assert not unknown, f"{unknown} in {expr!r} not in server/metrics/names.py"
        used |= names
    assert used


def test_dashboards_cover_the_required_views():
    serving = (GRAFANA / "moe-serve-serving.json").read_text()
    for needle in ("vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds",
                   "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                   "vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                   "vllm:generation_tokens_total", "moe_http_requests_total",
                   "histogram_quantile(0.99"):
        assert needle in serving, needle
    moe = json.loads((GRAFANA / "moe-serve-moe.json").read_text())
    kinds = {p["type"] for p in all_panels(moe)}
    assert {"heatmap", "table", "timeseries"} <= kinds
    heat = [p for p in all_panels(moe) if p["type"] == "heatmap"]
    assert heat and heat[0]["repeat"] == "layer"
    text = json.dumps(moe)
    for needle in ("moe_expert_load_imbalance", "moe_device_expert_tokens_total",
                   "moe_expert_placement", "moe_expert_tokens_total"):
        assert needle in text, needle
