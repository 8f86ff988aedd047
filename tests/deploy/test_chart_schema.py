"""values.schema.json and the chart's guards reject bad values: `helm template` must fail, and say why."""

from __future__ import annotations

import json

import pytest

from .helpers import CHART

# (--set values, --set-json values, a fragment of the error helm must print)
BAD_VALUES = [
    (["replicaCount=-1"], [], "/replicaCount"),
    ([], ['replicaCount="two"'], "/replicaCount"),
    ([], ["replicaCount=1.5"], "/replicaCount"),
    (["server.engine=tgi"], [], "/server/engine"),
    (["server.dtype=int8"], [], "/server/dtype"),
    (["server.device=tpu"], [], "/server/device"),
    (["server.expertPlacement=random"], [], "/server/expertPlacement"),
    (["server.logFormat=xml"], [], "/server/logFormat"),
    (["server.port=70000"], [], "/server/port"),
    (["server.maxNumSeqs=0"], [], "/server/maxNumSeqs"),
    (["server.blockSize=12"], [], "/server/blockSize"),
    (["server.drainTimeout=-1"], [], "/server/drainTimeout"),
    (["server.gpuMemoryUtilization=1.5"], [], "/server/gpuMemoryUtilization"),
    ([], ['server={"kvCacheMemory": "lots"}'], "/server/kvCacheMemory"),
    ([], ['server={"maxNumSeqs": "64"}'], "/server/maxNumSeqs"),  # a string where an integer goes
    (["server.maxSeqs=8"], [], "maxSeqs"),  # a typo: unknown keys are errors
    (["bogus=1"], [], "bogus"),
    (["model.source=s3"], [], "/model/source"),
    (["model.download.url=ftp://host/model.tar"], [], "/model/download/url"),
    (["gpu.count=-1"], [], "/gpu/count"),
    (["autoscaling.kind=vpa"], [], "/autoscaling/kind"),
    (["autoscaling.maxReplicas=0"], [], "/autoscaling/maxReplicas"),
    (["autoscaling.targetWaitingRequests=0"], [], "/autoscaling/targetWaitingRequests"),
    (["autoscaling.hpa.metricName=vllm:num_requests_waiting"], [], "/autoscaling/hpa/metricName"),
    (["probes.startup.failureThreshold=0"], [], "/probes/startup/failureThreshold"),
    (["probes.liveness.path=/other"], [], "path"),  # probe paths are fixed, not configurable
    (["lifecycle.preStopSleepSeconds=-5"], [], "/lifecycle/preStopSleepSeconds"),
    (["service.type=Ingress"], [], "/service/type"),
    (["metrics.serviceMonitor.interval=often"], [], "/metrics/serviceMonitor/interval"),
    (["multiNode.size=0"], [], "/multiNode/size"),
    (["image.pullPolicy=Sometimes"], [], "/image/pullPolicy"),
    (["networkPolicy.enabled=yes"], [], "/networkPolicy/enabled"),
    ([], ['networkPolicy.ingressFrom=[{"namespaceSelecter": {}}]'], "/networkPolicy/ingressFrom/0"),
    ([], ['networkPolicy.ingressFrom=[{}]'], "/networkPolicy/ingressFrom/0"),  # {} would mean everyone
    ([], ['networkPolicy.ingressFrom=[{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]'],
     "/networkPolicy/ingressFrom/0"),  # Kubernetes: ipBlock excludes the selectors
    ([], ['networkPolicy.ingressFrom=[{"ipBlock": {"except": ["10.0.0.0/24"]}}]'], "/networkPolicy/ingressFrom/0/ipBlock"),
    ([], ['networkPolicy.groupPorts=[{"port": 70000}]'], "/networkPolicy/groupPorts/0/port"),
    ([], ['networkPolicy.groupPorts=[{"port": 100, "protocol": "ICMP"}]'], "/networkPolicy/groupPorts/0/protocol"),
    ([], ['networkPolicy.egress=[{"to": [], "port": [53]}]'], "/networkPolicy/egress/0"),
    (["multiNode.rayNodePorts.nodeManager=0"], [], "/multiNode/rayNodePorts/nodeManager"),
    (["multiNode.rayWorkerPorts.max=65536"], [], "/multiNode/rayWorkerPorts/max"),
    ([], ['model.download.checksums={"config.json": "abc"}'], "/model/download/checksums/config.json"),
    # guards in the templates (combinations a schema cannot express)
    (["model.source=pvc"], [], "model.pvc.claimName"),
    (["model.source=hostPath"], [], "model.hostPath.path"),
    (["model.source=download"], [], "model.download.url"),
    (["apiKey.value=k", "apiKey.existingSecret=s"], [], "not both"),
    (["autoscaling.enabled=true", "autoscaling.minReplicas=5", "autoscaling.maxReplicas=2"], [], "minReplicas"),
    (["metrics.serviceMonitor.enabled=true", "metrics.podMonitor.enabled=true"], [], "not both"),
    (["multiNode.enabled=true"], [], "server.engine=vllm"),
    (["lifecycle.terminationGracePeriodSeconds=10"], [], "terminationGracePeriodSeconds"),
    ([], ['networkPolicy.groupPorts=[{"port": 2000, "endPort": 1000}]'], "endPort 1000 is below port 2000"),
    ([], ['model.download={"baseUrl": "https://h/m", "files": ["a.json"], "checksums": {"b.json": "'
          + "0" * 64 + '"}}'], '"b.json", which is not in model.download.files'),
]


@pytest.mark.parametrize(("set_values", "set_json", "message"), BAD_VALUES,
                         ids=[" ".join(s + j) for s, j, _ in BAD_VALUES])
def test_bad_values_are_rejected(render_fails, set_values, set_json, message):
    err = render_fails(set_values=set_values, set_json=set_json)
    assert message in err, err


def test_schema_is_strict_at_every_level_the_chart_owns():
    """additionalProperties: false on every object whose keys the chart defines; free-form
    Kubernetes objects (resources, affinity, ...) and string maps are the exceptions."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    free_form = {"global", "resources", "updateStrategy", "affinity", "podSecurityContext", "securityContext",
                 "behavior", "workerResources"}
    loose = []

    def walk(node, path):
        if node.get("type") == "object" and "properties" in node:
            if node.get("additionalProperties") is not False:
                loose.append(path)
            for key, sub in node["properties"].items():
                walk(sub, f"{path}.{key}")
        elif (node.get("type") == "object" and path.rsplit(".", 1)[-1] not in free_form
              and "additionalProperties" not in node):
            loose.append(path)  # an object without properties must constrain its values (a string map)

    walk(schema, "$")
    assert not loose, f"objects that accept unknown keys: {loose}"
    server = schema["properties"]["server"]["properties"]
    assert server["engine"]["enum"] == ["native", "vllm"]
    assert set(server["dtype"]["enum"]) >= {"auto", "float32", "bfloat16", "float16"}
    assert set(server["expertPlacement"]["enum"]) >= {"contiguous", "round_robin", "balanced"}
    assert "pattern" in server["device"]["oneOf"][1]
