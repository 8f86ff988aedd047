"""The chart's copies of the Grafana dashboards and Prometheus alert rules equal the repo's
originals (deploy/grafana/*.json, deploy/prometheus/alerts.yml) byte for byte. Helm can only read
files inside the chart, so the chart keeps copies; see helm/moe-serve/dashboards/README.md."""

from __future__ import annotations

import tarfile

from .helpers import CHART, REPO, run_helm

REFRESH_DASHBOARDS = "rm -f helm/moe-serve/dashboards/*.json && cp deploy/grafana/*.json helm/moe-serve/dashboards/"
REFRESH_ALERTS = "cp deploy/prometheus/alerts.yml helm/moe-serve/alerts/alerts.yml"


def test_dashboards_are_copies_of_deploy_grafana():
    originals = {p.name: p.read_bytes() for p in sorted((REPO / "deploy" / "grafana").glob("*.json"))}
    copies = {p.name: p.read_bytes() for p in sorted((CHART / "dashboards").glob("*.json"))}
    assert sorted(copies) == sorted(originals), f"the chart's dashboards differ from deploy/grafana: {REFRESH_DASHBOARDS}"
    stale = [name for name in originals if copies[name] != originals[name]]
    assert not stale, f"stale dashboard copies {stale}: {REFRESH_DASHBOARDS}"


def test_alert_rules_are_a_copy_of_deploy_prometheus():
    original = REPO / "deploy" / "prometheus" / "alerts.yml"
    copy = CHART / "alerts" / "alerts.yml"
    if not original.exists():
        assert not copy.exists(), "deploy/prometheus/alerts.yml is gone: remove the chart's copy too"
        return
    assert copy.exists() and copy.read_bytes() == original.read_bytes(), f"stale alert rules: {REFRESH_ALERTS}"


def test_copy_instructions_exist():
    for readme, command in ((CHART / "dashboards" / "README.md", "cp deploy/grafana/*.json"),
                            (CHART / "alerts" / "README.md", "cp deploy/prometheus/alerts.yml")):
        assert command in readme.read_text()


def test_packaged_chart_carries_the_copies_but_not_the_ci_values(helm, tmp_path):
    run_helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    (package,) = tmp_path.glob("moe-serve-*.tgz")
    with tarfile.open(package) as tar:
        names = set(tar.getnames())
    for path in (CHART / "dashboards").glob("*.json"):
        assert f"moe-serve/dashboards/{path.name}" in names
    assert ("moe-serve/alerts/alerts.yml" in names) == (CHART / "alerts" / "alerts.yml").exists()
    assert "moe-serve/values.schema.json" in names
    assert "moe-serve/README.md" in names  # the chart's own README ships (chart repositories show it)
    assert not [n for n in names if n.startswith("moe-serve/ci/")
                or (n.endswith("README.md") and n != "moe-serve/README.md")]


def test_chart_readme_covers_every_top_level_value():
    import yaml

    text = (CHART / "README.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [key for key in values if f"`{key}" not in text]
    assert not missing, f"helm/moe-serve/README.md does not mention {missing}"
