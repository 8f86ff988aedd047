"""The Helm chart lints, renders with every value set in helm/moe-serve/ci/, and what it renders is
valid Kubernetes and wired together: selectors match pods, ports and probes line up, the grace
period covers the drain, autoscalers point at the workload and at vllm:num_requests_waiting."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml

from .helpers import (
    CHART,
    CI_VALUES,
    FULLNAME,
    IDS,
    NAMESPACE,
    RELEASE,
    VALUE_SETS,
    files,
    main_container,
    run_helm,
)
from .k8s_schemas import LATEST_KUBERNETES, validate_manifest

DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest schemas we have.
KUBE_VERSIONS = ["1.27.0", LATEST_KUBERNETES]


def values_of(values_file) -> dict:
    """The chart's defaults merged with a ci/ file (maps merge, everything else replaces)."""

    def merge(base, over):
        if isinstance(base, dict) and isinstance(over, dict):
            out = dict(base)
            for k, v in over.items():
                out[k] = merge(base.get(k), v)
            return out
        return over

    return merge(DEFAULTS, {} if values_file is None else yaml.safe_load(values_file.read_text()))


def ci(name: str):
    return CHART / "ci" / f"{name}.yaml"


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ---- lint and schema validity -------------------------------------------------------------------

@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_helm_lint_strict(helm, values_file):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values_file)] if values_file else [])
    proc = run_helm(helm, *args, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_chart_declares_the_oldest_kubernetes_checked(helm):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == ">=" + KUBE_VERSIONS[0] + "-0"
    run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", KUBE_VERSIONS[0])
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--kube-version", "1.26.0", check=False)
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_install_notes_render(helm, values_file):
    args = ["install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
    proc = run_helm(helm, *args, *(["-f", str(values_file)] if values_file else []))
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"svc/{FULLNAME}" in notes and "terminationGracePeriodSeconds" in notes


def test_ci_value_sets_cover_the_documented_scenarios():
    names = {p.stem for p in CI_VALUES}
    for required in ("gpu-values", "vllm-multinode-values", "autoscaling-hpa-values",
                     "autoscaling-keda-values", "monitoring-values"):
        assert required in names


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_every_manifest_is_valid_kubernetes(render, values_file, kube_version):
    # The templates do not look at .Capabilities, so one render serves every version checked.
    docs = render(files(values_file))
    assert docs, "nothing rendered"
    for doc in docs:
        validate_manifest(doc, kube_version)
        assert "namespace" not in doc["metadata"] or doc["kind"] == "ConfigMap", \
            "leave the namespace to `helm install --namespace`"
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]


def test_kinds_per_value_set(render):
    base = {"ServiceAccount", "ConfigMap", "Service", "PodDisruptionBudget", "NetworkPolicy", "Pod"}  # Pod: helm test
    assert render().kinds() == base | {"Deployment"}
    assert render([ci("gpu-values")]).kinds() == base | {"Deployment"}
    assert render([ci("vllm-multinode-values")]).kinds() == base | {"LeaderWorkerSet"}
    assert render([ci("autoscaling-hpa-values")]).kinds() == base | {
        "Deployment", "HorizontalPodAutoscaler", "ServiceMonitor"}
    assert render([ci("autoscaling-keda-values")]).kinds() == base | {"Deployment", "ScaledObject", "PodMonitor"}
    assert render([ci("monitoring-values")]).kinds() == base | {
        "Deployment", "ServiceMonitor", "PrometheusRule", "Secret"}


# ---- the workload ------------------------------------------------------------------------------

@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_pods_are_wired_together(render, values_file):
    docs = render(files(values_file))
    values = values_of(values_file)
    config = docs.config_env()
    port = values["server"]["port"]
    assert config["MOE_SERVE_PORT"] == str(port) and config["MOE_SERVE_HOST"] == "0.0.0.0"

    for role, tpl in docs.pod_templates():
        spec = tpl["spec"]
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{role}/{c['name']} mounts unknown volume {m['name']}"
            for src in c.get("envFrom", []):
                if "configMapRef" in src:
                    assert docs.get("ConfigMap", src["configMapRef"]["name"]), src
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["name"].startswith(FULLNAME):  # a Secret the chart must render itself
                    secret = docs.one("Secret", ref["name"])
                    assert ref["key"] in secret["data"]
        # non-root everywhere
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert spec["serviceAccountName"] == docs.one("ServiceAccount")["metadata"]["name"]
        # Service links would inject MOE_SERVE_PORT=tcp://... for a Service named moe-serve
        assert spec["enableServiceLinks"] is False
        assert "checksum/config" in tpl["metadata"]["annotations"]

    server = docs.server_pod_template()
    c = main_container(server)
    assert {"name": "http", "containerPort": port, "protocol": "TCP"} in c["ports"]
    # the model the server loads is on a mounted volume (or the bundled one: no MOE_SERVE_MODEL)
    model = config.get("MOE_SERVE_MODEL")
    if values["model"]["source"] == "bundled":
        assert model is None
    else:
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert model == mounts["model"] or model.startswith(mounts["model"] + "/")
    assert config["MOE_SERVE_SERVED_MODEL_NAME"]


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_probes_and_graceful_drain(render, values_file):
    docs = render(files(values_file))
    values = values_of(values_file)
    tpl = docs.server_pod_template()
    c = main_container(tpl)
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "give the model minutes to load"
    for dep in docs.all("Deployment"):
        assert dep["spec"]["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]

    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    sleep_s = int(pre_stop[1])
    drain_s = float(docs.config_env()["MOE_SERVE_DRAIN_TIMEOUT"])
    assert drain_s == float(values["server"]["drainTimeout"])
    grace = tpl["spec"]["terminationGracePeriodSeconds"]
    assert grace >= sleep_s + math.ceil(drain_s) + 1, (grace, sleep_s, drain_s)
    assert grace == sleep_s + math.ceil(drain_s) + values["lifecycle"]["terminationGraceMarginSeconds"]


def test_grace_period_is_computed_from_the_drain_timeout(render, render_fails):
    tpl = render(set_json=['server={"drainTimeout": 12.5}']).server_pod_template()
    assert tpl["spec"]["terminationGracePeriodSeconds"] == 5 + 13 + 10
    tpl = render(set_values=["lifecycle.terminationGracePeriodSeconds=120"]).server_pod_template()
    assert tpl["spec"]["terminationGracePeriodSeconds"] == 120
    err = render_fails(set_values=["lifecycle.terminationGracePeriodSeconds=20"])
    assert "in-flight requests would be killed" in err


def test_config_changes_roll_the_pods(render):
    a = render().server_pod_template()["metadata"]["annotations"]["checksum/config"]
    b = render(set_values=["server.maxNumSeqs=7"]).server_pod_template()["metadata"]["annotations"]["checksum/config"]
    assert a != b


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_caches_go_to_an_emptydir_under_the_read_only_root(render, values_file):
    """Every container that runs moe-serve code (server, LWS leader and Ray workers) has a writable
    emptyDir at MOE_SERVE_CACHE_DIR (CPU kernels, Triton, inductor, HF caches), the root being read-only."""
    docs = render(files(values_file))
    cache_dir = docs.config_env()["MOE_SERVE_CACHE_DIR"]
    assert cache_dir == values_of(values_file).get("cache", {}).get("mountPath", "/var/cache/moe-serve")
    for _, tpl in docs.pod_templates():
        volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
        c = main_container(tpl)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == cache_dir)
        assert not mount.get("readOnly")
        assert "emptyDir" in volumes[mount["name"]] and volumes[mount["name"]]["emptyDir"]["sizeLimit"]


def test_cache_dir_values(render, render_fails):
    docs = render(set_values=["cache.mountPath=/cache", "cache.medium=Memory", "cache.sizeLimit=512Mi"])
    assert docs.config_env()["MOE_SERVE_CACHE_DIR"] == "/cache"
    tpl = docs.server_pod_template()
    assert {"name": "cache", "mountPath": "/cache"} in main_container(tpl)["volumeMounts"]
    assert {"name": "cache", "emptyDir": {"medium": "Memory", "sizeLimit": "512Mi"}} in tpl["spec"]["volumes"]
    assert "mountPath" in render_fails(set_values=["cache.mountPath=relative/dir"])


def test_unset_flags_are_left_to_the_server(render):
    """null / "" values render no env var, so server/config.py stays the one source of defaults."""
    env = render().config_env()
    assert set(env) == {"MOE_SERVE_HOST", "MOE_SERVE_PORT", "MOE_SERVE_ENGINE", "MOE_SERVE_DRAIN_TIMEOUT",
                        "MOE_SERVE_LOG_FORMAT", "MOE_SERVE_SERVED_MODEL_NAME", "MOE_SERVE_CACHE_DIR"}
    assert env["MOE_SERVE_SERVED_MODEL_NAME"] == "tiny-mixtral"
    env = render([ci("gpu-values")]).config_env()
    assert env["MOE_SERVE_MAX_MODEL_LEN"] == "8192" and env["MOE_SERVE_ENABLE_PREFIX_CACHING"] == "true"
    assert env["MOE_SERVE_KV_CACHE_MEMORY"] == "16GiB"
    assert env["MOE_SERVE_EXPERT_DEVICES"] == "cuda:0,cuda:1"
    assert env["MOE_SERVE_MODEL"] == "/models/Mixtral-8x7B-Instruct-v0.1"
    assert env["MOE_SERVE_SERVED_MODEL_NAME"] == "Mixtral-8x7B-Instruct-v0.1"
    for value in env.values():  # large integers must not come out as 1.6e+10
        assert not re.fullmatch(r"[0-9.]+e\+[0-9]+", value), value


def test_service_selects_the_serving_pods(render):
    for values_file in VALUE_SETS:
        docs = render(files(values_file))
        svc = docs.one("Service", FULLNAME)
        assert svc["spec"]["ports"][0]["targetPort"] == "http"
        served = [(role, t) for role, t in docs.pod_templates()
                  if matches(svc["spec"]["selector"], t["metadata"]["labels"])]
        if docs.all("LeaderWorkerSet"):
            # LWS labels pods with worker-index itself; only the leader (index 0) serves HTTP
            assert svc["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
            sel = {k: v for k, v in svc["spec"]["selector"].items() if not k.startswith("leaderworkerset")}
            roles = [r for r, t in docs.pod_templates() if matches(sel, t["metadata"]["labels"])]
            assert roles == ["leader"]
        else:
            assert [r for r, _ in served] == ["server"]
        for pdb in docs.all("PodDisruptionBudget"):
            for _, t in docs.pod_templates():
                assert matches(pdb["spec"]["selector"]["matchLabels"], t["metadata"]["labels"])


def test_deployment_selector_matches_its_pods(render):
    for values_file in VALUE_SETS:
        for d in render(files(values_file)).all("Deployment"):
            assert matches(d["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])


def test_gpu_values(render):
    docs = render([ci("gpu-values")])
    dep = docs.one("Deployment")
    spec = dep["spec"]["template"]["spec"]
    c = main_container(dep["spec"]["template"])
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert c["image"].endswith(":0.1.0-cuda")
    assert spec["nodeSelector"] and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert spec["affinity"]["podAntiAffinity"]
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["model"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
    assert dep["spec"]["replicas"] == 2
    key_env = next(e for e in c["env"] if e["name"] == "MOE_SERVE_API_KEY")
    assert key_env["valueFrom"]["secretKeyRef"] == {"name": "moe-serve-api-key", "key": "key"}
    assert not docs.all("Secret"), "existingSecret: the chart must not create one"


def test_default_is_cpu_and_bundled(render):
    docs = render()
    c = main_container(docs.server_pod_template())
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert c["image"].endswith(":0.1.0-cpu")
    assert "args" not in c and "command" not in c, "the image's ENTRYPOINT (moe-serve) runs as is"
    assert not [e for e in c["env"] if e["name"] == "MOE_SERVE_API_KEY"]


def test_download_init_container(render):
    docs = render([ci("model-download-values")])
    spec = docs.server_pod_template()["spec"]
    init = spec["initContainers"][0]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["MODEL_URL"].endswith(".tar.gz") and len(env["MODEL_SHA256"]) == 64
    assert env["MODEL_DIR"] == docs.config_env()["MOE_SERVE_MODEL"] == "/models/tiny-model"
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["model"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
    mounts = {m["name"]: m for m in main_container(docs.server_pod_template())["volumeMounts"]}
    assert mounts["model"]["readOnly"] is True
    assert main_container(docs.server_pod_template())["args"] == ["--max-queue-len", "64"]


# ---- multi-node vLLM (LeaderWorkerSet + Ray) ------------------------------------------------------

def test_leader_worker_set(render):
    docs = render([ci("vllm-multinode-values")])
    lws = docs.one("LeaderWorkerSet", FULLNAME)
    tpl = lws["spec"]["leaderWorkerTemplate"]
    assert tpl["size"] == 2 and tpl["restartPolicy"] == "RecreateGroupOnPodRestart"
    leader, worker = main_container(tpl["leaderTemplate"]), main_container(tpl["workerTemplate"])
    for c in (leader, worker):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert c["command"] == ["/bin/sh", "-c"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    leader_script, worker_script = leader["args"][0], worker["args"][0]
    assert "ray start --head --port=6379" in leader_script
    assert "LWS_GROUP_SIZE" in leader_script
    exec_line = leader_script.strip().splitlines()[-1]
    assert exec_line.startswith("exec 'moe-serve' '--engine' 'vllm'")
    for flag in ("'--tensor-parallel-size' '8'", "'--data-parallel-size' '2'", "'--enable-expert-parallel'"):
        assert flag in exec_line
    assert 'ray start --address="${LWS_LEADER_ADDRESS}:6379" --node-manager-port=6380' in worker_script
    assert worker_script.rstrip().endswith("--block --disable-usage-stats")
    assert {"name": "ray-gcs", "containerPort": 6379, "protocol": "TCP"} in leader["ports"]
    assert "readinessProbe" in leader and "readinessProbe" not in worker
    # every pod of the group fetches the model itself (vLLM workers load their shard locally)
    for role in ("leaderTemplate", "workerTemplate"):
        assert tpl[role]["spec"]["initContainers"][0]["name"] == "fetch-model"


def test_multinode_guards(render_fails):
    mn = ci("vllm-multinode-values")
    assert "needs server.engine=vllm" in render_fails([mn], set_values=["server.engine=native"])
    err = render_fails([mn], set_values=["server.tensorParallelSize=4"])
    assert "must equal multiNode.size (2) x gpu.count (8)" in err
    assert "needs gpu.count >= 1" in render_fails([mn], set_values=["gpu.count=0"])
    # Ray's fixed ports must not collide (with each other, the API port or the worker port range)
    err = render_fails([mn], set_values=["multiNode.rayNodePorts.metricsExport=6379"])
    assert "metrics-export port 6379 is also Ray's gcs port" in err
    err = render_fails([mn], set_values=["multiNode.rayNodePorts.nodeManager=8000"])
    assert "node-manager port 8000 is also server.port" in err
    err = render_fails([mn], set_values=["multiNode.rayNodePorts.objectManager=12000"])
    assert "object-manager port 12000 lies in multiNode.rayWorkerPorts (10002-19999)" in err
    assert "min (30000) must be <= max" in render_fails([mn], set_values=["multiNode.rayWorkerPorts.min=30000"])


# ---- autoscaling -----------------------------------------------------------------------------

def test_hpa_scales_the_deployment_on_waiting_requests(render):
    docs = render([ci("autoscaling-hpa-values")])
    hpa = docs.one("HorizontalPodAutoscaler", FULLNAME)
    dep = docs.one("Deployment", FULLNAME)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    # prometheus-adapter's rename of vllm:num_requests_waiting (":" is not allowed in its API)
    assert metric["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300

    ext = render([ci("autoscaling-hpa-external-values")]).one("HorizontalPodAutoscaler")
    (metric,) = ext["spec"]["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"]["selector"]["matchLabels"] == {"model_name": "tiny-mixtral"}
    assert metric["external"]["target"]["averageValue"] == "2.5"


def test_keda_scaled_object(render):
    docs = render([ci("autoscaling-keda-values")])
    so = docs.one("ScaledObject", FULLNAME)
    assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert "replicas" not in docs.one("Deployment")["spec"]
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    served = docs.config_env()["MOE_SERVE_SERVED_MODEL_NAME"]
    assert trigger["metadata"]["query"] == (
        f'sum(vllm:num_requests_waiting{{namespace="{NAMESPACE}",model_name="{served}"}})')
    assert trigger["metadata"]["threshold"] == "8"
    assert so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleUp"]


def test_autoscaling_a_leader_worker_set(render):
    mn = ci("vllm-multinode-values")
    for kind, doc_kind in (("hpa", "HorizontalPodAutoscaler"), ("keda", "ScaledObject")):
        docs = render([mn], set_values=["autoscaling.enabled=true", f"autoscaling.kind={kind}"])
        ref = docs.one(doc_kind)["spec"]["scaleTargetRef"]
        assert ref == {"apiVersion": "leaderworkerset.x-k8s.io/v1", "kind": "LeaderWorkerSet", "name": FULLNAME}
        assert "replicas" not in docs.one("LeaderWorkerSet")["spec"]


# ---- monitoring ---------------------------------------------------------------------------------

def test_service_monitor_scrapes_the_service(render):
    docs = render([ci("monitoring-values")])
    sm = docs.one("ServiceMonitor", FULLNAME)
    svc = docs.one("Service", FULLNAME)
    assert matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["spec"]["namespaceSelector"]["matchNames"] == [NAMESPACE]
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["path"] == "/metrics"
    # the alert rules and dashboards select job="moe-serve"
    assert {"action": "replace", "targetLabel": "job", "replacement": "moe-serve"} in ep["relabelings"]
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_pod_monitor_scrapes_the_serving_pods(render):
    docs = render([ci("autoscaling-keda-values")])
    pm = docs.one("PodMonitor", FULLNAME)
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    tpl = docs.server_pod_template()
    assert matches(pm["spec"]["selector"]["matchLabels"], tpl["metadata"]["labels"])
    assert ep["port"] in {p["name"] for p in main_container(tpl)["ports"]}
    assert ep["relabelings"][0]["replacement"] == "moe-serve"


def test_prometheus_rule_carries_the_repo_alerts(render):
    docs = render([ci("monitoring-values")])
    rule = docs.one("PrometheusRule", FULLNAME)
    chart_alerts = CHART / "alerts" / "alerts.yml"
    expected = yaml.safe_load(chart_alerts.read_text())["groups"] if chart_alerts.exists() else []
    extra = values_of(ci("monitoring-values"))["metrics"]["prometheusRule"]["additionalGroups"]
    assert rule["spec"]["groups"] == expected + extra
    # templating in annotations reaches Prometheus untouched, not expanded by Helm
    summaries = [r["annotations"]["summary"] for g in rule["spec"]["groups"] for r in g["rules"]
                 if "summary" in r.get("annotations", {})]
    assert any("{{ $labels.instance }}" in s for s in summaries)


def test_grafana_dashboard_config_maps(render):
    docs = render([ci("monitoring-values")])
    dashboards = sorted((CHART / "dashboards").glob("*.json"))
    cms = [d for d in docs.all("ConfigMap") if d["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert len(cms) == len(dashboards)
    by_key = {k: v for cm in cms for k, v in cm["data"].items()}
    for path in dashboards:
        text = path.read_text()
        assert by_key[path.name].rstrip("\n") == text.rstrip("\n")  # the content, byte for byte
        json.loads(by_key[path.name])
    for cm in cms:
        assert cm["metadata"]["annotations"]["grafana_folder"] == "moe-serve"
        assert cm["metadata"]["namespace"] == NAMESPACE
