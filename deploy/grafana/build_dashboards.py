#!/usr/bin/env python3
"""Generate the moe-serve Grafana dashboards (JSON, schemaVersion 39).

    python deploy/grafana/build_dashboards.py          # write the JSON files next to this script
    python deploy/grafana/build_dashboards.py --check  # exit 1 if the committed JSON is stale

Every metric name used here must exist in server/metrics/names.py (tests/metrics checks it).
The datasource is the `${datasource}` template variable; `model_name` filters every query.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model_name=~"$model_name"'
RI = "$__rate_interval"
QUANTILES = (0.5, 0.95, 0.99)


# ---- building blocks -----------------------------------------------------------------------
class Layout:
    """Hands out panel ids and grid positions left to right, top to bottom (24 columns)."""

    def __init__(self) -> None:
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def place(self, w: int, h: int) -> tuple[int, dict]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        pid = self.next_id
        self.next_id += 1
        return pid, pos

    def newline(self) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0


def target(expr: str, legend: str = "", ref: str = "A", **extra) -> dict:
    t = {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "refId": ref}
    t.update(extra)
    return t


def targets(*pairs: tuple[str, str], **extra) -> list[dict]:
    return [target(e, leg, chr(ord("A") + i), **extra) for i, (e, leg) in enumerate(pairs)]


def panel(lay: Layout, kind: str, title: str, tgts: list[dict], *, w: int = 12, h: int = 8,
          unit: str = "short", description: str = "", options: dict | None = None,
          field_config: dict | None = None, **extra) -> dict:
    pid, pos = lay.place(w, h)
    defaults = {"unit": unit}
    defaults.update(field_config or {})
    p = {
        "datasource": DS, "description": description, "fieldConfig": {
            "defaults": defaults, "overrides": []},
        "gridPos": pos, "id": pid, "options": options or {}, "targets": tgts, "title": title,
        "type": kind,
    }
    p.update(extra)
    return p


def row(lay: Layout, title: str) -> dict:
    lay.newline()
    pid, pos = lay.place(24, 1)
    lay.newline()
    return {"collapsed": False, "gridPos": pos, "id": pid, "panels": [], "title": title,
            "type": "row"}


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    return [
        (f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{M}}}[{RI}])))",
         f"p{int(q * 100)}" + (f" {{{{{by}}}}}" if by else ""))
        for q in QUANTILES
    ]


def datasource_var() -> dict:
    return {"current": {}, "hide": 0, "includeAll": False, "label": "Data source",
            "multi": False, "name": "datasource", "options": [], "query": "prometheus",
            "refresh": 1, "regex": "", "skipUrlSync": False, "type": "datasource"}


def query_var(name: str, label: str, query: str, *, multi: bool = True) -> dict:
    return {"current": {}, "datasource": DS, "definition": query, "hide": 0,
            "includeAll": multi, "label": label, "multi": multi, "name": name, "options": [],
            "query": {"qryType": 1, "query": query, "refId": "PrometheusVariableQueryEditor"},
            "refresh": 2, "regex": "", "skipUrlSync": False, "sort": 3, "type": "query"}


def dashboard(uid: str, title: str, panels: list[dict], variables: list[dict],
              description: str) -> dict:
    return {
        "annotations": {"list": []}, "description": description, "editable": True,
        "fiscalYearStartMonth": 0, "graphTooltip": 1, "links": [], "liveNow": False,
        "panels": panels, "refresh": "30s", "schemaVersion": SCHEMA_VERSION,
        "tags": ["moe-serve", "llm"], "templating": {"list": variables},
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {}, "timezone": "",
        "title": title, "uid": uid, "version": 1, "weekStart": "",
    }


MODEL_VAR = query_var("model_name", "Model", "label_values(vllm:num_requests_running, model_name)")


# ---- serving dashboard -----------------------------------------------------------------------
def serving() -> dict:
    lay = Layout()
    ts = "timeseries"
    p = [row(lay, "Overview")]
    p.append(panel(lay, "stat", "Requests running", targets(
        (f"sum(vllm:num_requests_running{{{M}}})", "running")), w=6, h=4))
    p.append(panel(lay, "stat", "Requests waiting", targets(
        (f"sum(vllm:num_requests_waiting{{{M}}})", "waiting")), w=6, h=4))
    p.append(panel(lay, "stat", "KV cache usage", targets(
        (f"max(vllm:kv_cache_usage_perc{{{M}}})", "kv")), w=6, h=4, unit="percentunit"))
    p.append(panel(lay, "stat", "Finished requests/s", targets(
        (f"sum(rate(vllm:request_success_total{{{M}}}[{RI}]))", "req/s")), w=6, h=4,
        unit="reqps"))

    p.append(row(lay, "Latency"))
    p.append(panel(lay, ts, "Time to first token", targets(
        *quantiles("vllm:time_to_first_token_seconds")), unit="s",
        description="TTFT p50/p95/p99 (histogram_quantile over vLLM's TTFT buckets)."))
    p.append(panel(lay, ts, "Inter-token latency", targets(
        *quantiles("vllm:inter_token_latency_seconds")), unit="s"))
    p.append(panel(lay, ts, "End-to-end request latency", targets(
        *quantiles("vllm:e2e_request_latency_seconds")), unit="s"))
    p.append(panel(lay, ts, "Queue time", targets(
        *quantiles("vllm:request_queue_time_seconds")), unit="s",
        description="Time requests spend WAITING before first being scheduled."))
    p.append(panel(lay, ts, "Mean prefill / decode / inference time per request", targets(
        *[(f"sum(rate(vllm:request_{ph}_time_seconds_sum{{{M}}}[{RI}])) / "
           + f"sum(rate(vllm:request_{ph}_time_seconds_count{{{M}}}[{RI}]))", ph)
          for ph in ("prefill", "decode", "inference")]), unit="s"))
    p.append(panel(lay, ts, "Engine step time", targets(
        *quantiles("moe_engine_step_duration_seconds")), unit="s"))

    p.append(row(lay, "Load"))
    p.append(panel(lay, ts, "Request rate by finish reason", targets(
        (f"sum by (finished_reason) (rate(vllm:request_success_total{{{M}}}[{RI}]))",
         "{{finished_reason}}")), unit="reqps"))
    p.append(panel(lay, ts, "Requests running and waiting", targets(
        (f"sum(vllm:num_requests_running{{{M}}})", "running"),
        (f"sum(vllm:num_requests_waiting{{{M}}})", "waiting"))))
    p.append(panel(lay, ts, "KV cache usage", targets(
        (f"max by (model_name) (vllm:kv_cache_usage_perc{{{M}}})", "{{model_name}}")),
        unit="percentunit", field_config={"max": 1, "min": 0}))
    p.append(panel(lay, ts, "Token throughput", targets(
        (f"sum(rate(vllm:prompt_tokens_total{{{M}}}[{RI}]))", "prompt tokens/s"),
        (f"sum(rate(vllm:generation_tokens_total{{{M}}}[{RI}]))", "generation tokens/s")),
        unit="short"))
    p.append(panel(lay, ts, "Prefix cache hit rate", targets(
        (f"sum(rate(vllm:prefix_cache_hits_total{{{M}}}[{RI}])) / "
         + f"clamp_min(sum(rate(vllm:prefix_cache_queries_total{{{M}}}[{RI}])), 1e-9)",
         "hit rate")), unit="percentunit"))
    p.append(panel(lay, ts, "Preemptions/s", targets(
        (f"sum(rate(vllm:num_preemptions_total{{{M}}}[{RI}]))", "preemptions/s"))))
    p.append(panel(lay, ts, "Tokens per engine step (p50/p95)", targets(
        *[(f"histogram_quantile({q}, sum by (le) "
           + f"(rate(vllm:iteration_tokens_total_bucket{{{M}}}[{RI}])))", f"p{int(q * 100)}")
          for q in (0.5, 0.95)])))
    p.append(panel(lay, ts, "Prompt / generation length per request (p50)", targets(
        *[("histogram_quantile(0.5, sum by (le) "
           + f"(rate(vllm:request_{k}_tokens_bucket{{{M}}}[{RI}])))", k)
          for k in ("prompt", "generation")])))

    p.append(row(lay, "Speculative decoding"))
    p.append(panel(lay, ts, "Speculative decoding acceptance rate", targets(
        (f"sum(rate(vllm:spec_decode_num_accepted_tokens_total{{{M}}}[{RI}])) / "
         + f"clamp_min(sum(rate(vllm:spec_decode_num_draft_tokens_total{{{M}}}[{RI}])), 1e-9)",
         "acceptance rate"),
        (f"sum by (position) (rate(vllm:spec_decode_num_accepted_tokens_per_pos_total{{{M}}}[{RI}])) / "
         + f"ignoring(position) group_left clamp_min(sum(rate(vllm:spec_decode_num_drafts_total{{{M}}}[{RI}])), 1e-9)",
         "position {{position}}")), unit="percentunit", field_config={"max": 1, "min": 0},
        description="Accepted / drafted tokens (--speculative-config), overall and per draft position."))
    p.append(panel(lay, ts, "Distinct experts per verify vs plain decode step", targets(
        (f"sum by (step) (rate(moe_decode_step_distinct_experts_total{{{M}}}[{RI}])) / "
         + f"clamp_min(sum by (step) (rate(moe_decode_steps_total{{{M}}}[{RI}])), 1e-9)", "{{step}}")),
        description="Experts touched per step summed over MoE layers: what a verify step streams "
                    "compared with a one-token decode step."))

    p.append(row(lay, "HTTP"))
    p.append(panel(lay, ts, "HTTP requests by status", targets(
        (f"sum by (status) (rate(moe_http_requests_total[{RI}]))", "{{status}}")),
        unit="reqps"))
    p.append(panel(lay, ts, "HTTP errors by status and route", targets(
        (f'sum by (status, route) (rate(moe_http_requests_total{{status=~"[45].."}}[{RI}]))',
         "{{status}} {{route}}")), unit="reqps"))
    p.append(panel(lay, ts, "HTTP 5xx share", targets(
        (f'sum(rate(moe_http_requests_total{{status=~"5.."}}[{RI}])) / '
         + f"clamp_min(sum(rate(moe_http_requests_total[{RI}])), 1e-9)", "5xx share")),
        unit="percentunit"))
    p.append(panel(lay, ts, "HTTP latency p95 by route", targets(
        ("histogram_quantile(0.95, sum by (le, route) "
         + f"(rate(moe_http_request_duration_seconds_bucket[{RI}])))", "{{route}}")), unit="s"))
    return dashboard("moe-serve-serving", "moe-serve / Serving", p,
                     [datasource_var(), MODEL_VAR],
                     "Request latency, queueing, KV cache and throughput (vLLM-compatible "
                     "series) plus HTTP status codes.")


# ---- MoE dashboard ---------------------------------------------------------------------------
def moe() -> dict:
    lay = Layout()
    ts = "timeseries"
    L = 'layer=~"$layer"'
    p = [row(lay, "Balance")]
    p.append(panel(lay, ts, "Load imbalance per layer (max/mean over window)", targets(
        (f"max by (layer) (moe_expert_load_imbalance{{{M}, {L}}})", "layer {{layer}}")),
        description="1 = perfectly balanced; num_experts = every token on one expert. "
                    "Computed by the server over a sliding window (default 60 s).",
        field_config={"min": 1}))
    p.append(panel(lay, "bargauge", "Current imbalance by layer", targets(
        (f"max by (layer) (moe_expert_load_imbalance{{{M}, {L}}})", "{{layer}}"),
        instant=True), options={"orientation": "vertical", "displayMode": "gradient"},
        field_config={"min": 1}))
    p.append(panel(lay, ts, "Expert tokens per device", targets(
        (f"sum by (device) (rate(moe_device_expert_tokens_total{{{M}}}[{RI}]))",
         "{{device}}")), unit="short",
        description="Token-to-expert assignments executed on each device per second."))
    p.append(panel(lay, ts, "Dropped tokens/s", targets(
        (f"sum(rate(moe_dropped_tokens_total{{{M}}}[{RI}]))", "dropped/s"))))

    p.append(row(lay, "Expert load heatmaps (one per layer)"))
    p.append(panel(lay, "heatmap", "Expert load, layer $layer", targets(
        (f'sum by (expert) (rate(moe_expert_tokens_total{{{M}, layer=~"$layer"}}[{RI}]))',
         "{{expert}}"), format="time_series"), w=12, h=9,
        description="Tokens/s routed to each logical expert (y) over time.",
        options={"calculate": False, "cellGap": 1, "color": {"mode": "scheme",
                 "scheme": "Oranges", "steps": 64}, "rowsFrame": {"layout": "auto"},
                 "yAxis": {"axisLabel": "expert"}, "legend": {"show": True},
                 "tooltip": {"show": True, "yHistogram": False}},
        repeat="layer", repeatDirection="h", maxPerRow=2))

    p.append(row(lay, "Placement"))
    p.append(panel(lay, "table", "Expert placement", targets(
        (f"sum by (layer, expert, device, replica) (moe_expert_placement{{{M}, {L}}})", ""),
        format="table", instant=True), w=12, h=10,
        transformations=[{"id": "organize", "options": {
            "excludeByName": {"Time": True, "Value": True},
            "indexByName": {"layer": 0, "expert": 1, "device": 2, "replica": 3}}}]))
    p.append(panel(lay, "bargauge", "Placed expert copies per device", targets(
        (f"count by (device) (moe_expert_placement{{{M}}})", "{{device}}"), instant=True),
        w=12, h=10, options={"orientation": "horizontal", "displayMode": "basic"}))
    p.append(panel(lay, "table", "Hottest experts (last 5m)", targets(
        (f"topk(10, sum by (layer, expert) (rate(moe_expert_tokens_total{{{M}}}[5m])))", ""),
        format="table", instant=True), w=24, h=8,
        transformations=[{"id": "organize", "options": {"excludeByName": {"Time": True}}}]))
    layer_var = query_var(
        "layer", "Layer", 'label_values(moe_expert_tokens_total{model_name=~"$model_name"}, layer)')
    return dashboard("moe-serve-moe", "moe-serve / MoE experts", p,
                     [datasource_var(), MODEL_VAR, layer_var],
                     "Expert routing load, imbalance, tokens per device and expert placement.")


DASHBOARDS = {"moe-serve-serving.json": serving, "moe-serve-moe.json": moe}


def render(build) -> str:
    return json.dumps(build(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the JSON files are stale")
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args(argv)
    stale = []
    for fname, build in DASHBOARDS.items():
        path = args.out / fname
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print("stale (run deploy/grafana/build_dashboards.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
