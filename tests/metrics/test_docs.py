"""docs/metrics.md lists every metric, label, bucket set and alert."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from server.metrics import names as n

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "metrics.md").read_text()


def table_rows() -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r"^\| `([^`]+)` \|.*$", DOC, re.MULTILINE)}


def test_every_metric_documented_with_type_and_labels():
    rows = table_rows()
    for spec in n.ALL_SPECS:
        assert spec.name in rows, spec.name
        row = rows[spec.name]
        assert f"| {spec.kind} |" in row, spec.name
        assert ", ".join(f"`{lbl}`" for lbl in spec.labels) in row, spec.name


def test_bucket_edges_documented():
    for attr in ("TTFT_BUCKETS", "INTER_TOKEN_BUCKETS", "REQUEST_LATENCY_BUCKETS",
                 "ITERATION_TOKENS_BUCKETS", "REQUEST_N_BUCKETS", "HTTP_LATENCY_BUCKETS",
                 "STEP_TIME_BUCKETS"):
        edges = ", ".join(f"{x:g}" for x in getattr(n, attr))
        assert f"`{attr}`" in DOC and edges in DOC, attr


def test_every_alert_and_runbook_documented():
    doc = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            assert f"`{rule['alert']}`" in DOC, rule["alert"]
            assert rule["annotations"]["runbook"] in DOC, rule["alert"]
