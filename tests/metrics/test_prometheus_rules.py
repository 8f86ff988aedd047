"""deploy/prometheus: promtool check config/rules, rule unit tests, names, annotations."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from server.metrics.names import known_series_names

from .promql import metric_names

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
REQUIRED_ALERTS = {
    "MoeServeTargetDown", "MoeServeTTFTHigh", "MoeServeQueueBacklog",
    "MoeServeKVCacheNearlyFull", "MoeServeHighErrorRate", "MoeExpertImbalanceHigh",
}


def promtool(tools: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([tools["promtool"], *args], cwd=PROM, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r


def rules() -> list[dict]:
    doc = yaml.safe_load((PROM / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_check_rules(prometheus_tools):
    out = promtool(prometheus_tools, "check", "rules", "alerts.yml").stdout
    assert f"{len(rules())} rules found" in out


def test_promtool_check_config(prometheus_tools):
    promtool(prometheus_tools, "check", "config", "prometheus.yml")


def test_promtool_rule_unit_tests(prometheus_tools):
    out = promtool(prometheus_tools, "test", "rules", "alerts_test.yml")
    assert "SUCCESS" in out.stdout + out.stderr


def test_alerts_have_runbook_summary_severity():
    alerts = {r["alert"]: r for r in rules()}
    assert REQUIRED_ALERTS <= set(alerts)
    for name, r in alerts.items():
        ann = r["annotations"]
        assert ann.get("summary") and ann.get("description"), name
        assert ann.get("runbook") and "\n" not in ann["runbook"].strip(), name
        assert r["labels"]["severity"] in {"warning", "critical"}, name
        assert r.get("for"), name


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    doc = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    fired, quiet = set(), set()
    for case in doc["tests"]:
        for t in case["alert_rule_test"]:
            (fired if t["exp_alerts"] else quiet).add(t["alertname"])
    assert REQUIRED_ALERTS <= fired
    assert REQUIRED_ALERTS <= quiet


def test_alert_exprs_use_known_metric_names():
    known = known_series_names()
    for r in rules():
        names = metric_names(r["expr"])
        assert names and names <= known, (r["alert"], names - known)


def test_scrape_config_targets_metrics_endpoint():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert jobs["moe-serve"]["metrics_path"] == "/metrics"
    assert "alerts.yml" in cfg["rule_files"]
