"""The chart's NetworkPolicies: on by default, valid Kubernetes, selecting exactly the serving pods,
opening the Service's target port and nothing else from outside the release; with multiNode, Ray's
ports (every port the rendered `ray start` commands listen on) are reachable only from the release's
own pods; egress stays open unless networkPolicy.egress is set."""

from __future__ import annotations

import json
import re

import pytest

from .helpers import CHART, FULLNAME, IDS, RELEASE, VALUE_SETS, files, main_container
from .k8s_schemas import LATEST_KUBERNETES, validate_manifest

MULTINODE = CHART / "ci" / "vllm-multinode-values.yaml"
RELEASE_PODS = {"app.kubernetes.io/name": "moe-serve", "app.kubernetes.io/instance": RELEASE}
GATEWAY = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
PROMETHEUS = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
              "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
OFFICE = {"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.5.0/24"]}}
# the `helm test` pod (helmTest.enabled, the default): let in next to the peers, and let out to the API
TEST_POD = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "moe-serve", "app.kubernetes.io/instance": RELEASE,
                                            "app.kubernetes.io/component": "test"}}}
TO_API = {"to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "moe-serve",
                                                  "app.kubernetes.io/instance": RELEASE,
                                                  "app.kubernetes.io/component": "server"}}}],
          "ports": [{"port": 8000, "protocol": "TCP"}]}
DNS = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
               "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
       "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors are expected: {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def policies_for(docs, labels: dict[str, str], direction: str = "Ingress") -> list[dict]:
    return [p for p in docs.all("NetworkPolicy")
            if selects(p["spec"]["podSelector"], labels) and direction in p["spec"]["policyTypes"]]


def port_ranges(ports: list[dict]) -> set[tuple[int, int]]:
    out = set()
    for p in ports:
        assert p.get("protocol", "TCP") == "TCP", p
        assert isinstance(p["port"], int), f"numeric ports only, not named ones: {p}"
        out.add((p["port"], p.get("endPort", p["port"])))
    return out


def is_release_only(peers: list[dict]) -> bool:
    """True if every peer is this release's pods in the policy's own namespace."""
    return all(set(peer) == {"podSelector"} and peer["podSelector"] == {"matchLabels": RELEASE_PODS}
               for peer in peers)


def open_from_outside(docs, labels: dict[str, str]) -> set[tuple[int, int]]:
    """Port ranges a pod with `labels` accepts from anything that is not one of the release's pods."""
    ranges: set[tuple[int, int]] = set()
    for policy in policies_for(docs, labels):
        for rule in policy["spec"].get("ingress", []):
            assert "ports" in rule, f"{policy['metadata']['name']}: a rule without ports opens every port"
            if "from" not in rule or not is_release_only(rule["from"]):
                ranges |= port_ranges(rule["ports"])
    return ranges


def allowed(ranges: set[tuple[int, int]], port: int) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


# ---- the API policy -----------------------------------------------------------------------------

@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_policy_is_on_by_default_valid_and_selects_exactly_the_serving_pods(render, values_file):
    docs = render(files(values_file))
    policy = docs.one("NetworkPolicy", FULLNAME)
    for version in ("1.27.0", LATEST_KUBERNETES):
        validate_manifest(policy, version)
    assert policy["spec"]["policyTypes"] == ["Ingress"], "egress stays open by default"
    roles = [role for role, tpl in docs.pod_templates()
             if selects(policy["spec"]["podSelector"], tpl["metadata"]["labels"])]
    assert roles in (["server"], ["leader"]), roles
    # only this release's pods: the selector names the release
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    assert not [p for p in docs.all("NetworkPolicy") if "Egress" in p["spec"]["policyTypes"]]


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_only_the_services_target_port_is_open_from_outside(render, values_file):
    docs = render(files(values_file))
    svc = docs.one("Service", FULLNAME)
    (svc_port,) = svc["spec"]["ports"]
    for role, tpl in docs.pod_templates():
        ports = {p["name"]: p["containerPort"] for p in main_container(tpl).get("ports", [])}
        outside = open_from_outside(docs, tpl["metadata"]["labels"])
        if role in ("server", "leader"):
            target = ports[svc_port["targetPort"]]
            assert outside == {(target, target)}, (role, outside)
            # everything else the container listens on (Ray's GCS on a leader) is closed to outsiders
            for name, port in ports.items():
                assert allowed(outside, port) == (port == target), (name, port)
        else:
            assert outside == set(), f"{role} pods must accept nothing from outside: {outside}"
            assert policies_for(docs, tpl["metadata"]["labels"]), f"{role} pods are not isolated"


def test_ingress_from_restricts_the_api_port_to_the_given_peers(render):
    docs = render(set_json=[f"networkPolicy.ingressFrom={json.dumps([GATEWAY, PROMETHEUS, OFFICE])}"])
    policy = docs.one("NetworkPolicy", FULLNAME)
    validate_manifest(policy)
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [GATEWAY, PROMETHEUS, OFFICE, TEST_POD]
    # without the helm test pod: exactly the peers
    docs = render(set_values=["helmTest.enabled=false"],
                  set_json=[f"networkPolicy.ingressFrom={json.dumps([GATEWAY, PROMETHEUS, OFFICE])}"])
    (rule,) = docs.one("NetworkPolicy", FULLNAME)["spec"]["ingress"]
    assert rule["from"] == [GATEWAY, PROMETHEUS, OFFICE]
    assert "Pod" not in docs.kinds()
    assert port_ranges(rule["ports"]) == {(8000, 8000)}
    # the port follows server.port
    (rule,) = render(set_values=["server.port=9000"]).one("NetworkPolicy", FULLNAME)["spec"]["ingress"]
    assert port_ranges(rule["ports"]) == {(9000, 9000)} and "from" not in rule


def test_the_monitoring_example_admits_only_the_gateway_and_prometheus(render):
    docs = render([CHART / "ci" / "monitoring-values.yaml"])
    (rule,) = docs.one("NetworkPolicy", FULLNAME)["spec"]["ingress"]
    assert rule["from"] == [GATEWAY, PROMETHEUS, TEST_POD]
    # the ServiceMonitor scrapes the very port the policy opens to Prometheus
    (endpoint,) = docs.one("ServiceMonitor")["spec"]["endpoints"]
    svc_port = next(p for p in docs.one("Service")["spec"]["ports"] if p["name"] == endpoint["port"])
    container_ports = {p["name"]: p["containerPort"] for p in main_container(docs.server_pod_template())["ports"]}
    assert port_ranges(rule["ports"]) == {(container_ports[svc_port["targetPort"]],) * 2}


def test_disabled_renders_no_policy(render):
    for values_file in (None, MULTINODE):
        docs = render(files(values_file), set_values=["networkPolicy.enabled=false"],
                      set_json=[f"networkPolicy.egress={json.dumps([DNS])}"])
        assert "NetworkPolicy" not in docs.kinds()
        assert render(files(values_file)).all("NetworkPolicy"), "on by default"


# ---- multi-node: Ray between the release's pods only ----------------------------------------------

def ray_listen_ports(script: str) -> tuple[set[int], tuple[int, int]]:
    """The fixed ports and the worker port range a rendered `ray start` line makes Ray listen on."""
    (line,) = [ln for ln in script.splitlines() if "ray start" in ln]
    flags = dict(re.findall(r"--([a-z-]+)=(\d+)", line))
    worker_range = (int(flags.pop("min-worker-port")), int(flags.pop("max-worker-port")))
    for name in ("node-manager-port", "object-manager-port", "runtime-env-agent-port",
                 "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "metrics-export-port"):
        assert name in flags, f"Ray would pick a random {name}, which no policy can name: {line}"
    return {int(v) for v in flags.values()}, worker_range


@pytest.mark.parametrize("extra", [[], ["multiNode.rayPort=7000", "multiNode.rayNodePorts.objectManager=7100",
                                        "multiNode.rayWorkerPorts.min=20000", "multiNode.rayWorkerPorts.max=20100"]],
                         ids=["default-ports", "custom-ports"])
def test_ray_ports_are_open_only_between_the_releases_pods(render, extra):
    docs = render([MULTINODE], set_values=extra)
    tpl = docs.one("LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    leader, worker = tpl["leaderTemplate"], tpl["workerTemplate"]
    leader_fixed, leader_range = ray_listen_ports(main_container(leader)["args"][0])
    worker_fixed, worker_range = ray_listen_ports(main_container(worker)["args"][0])
    gcs = int(re.search(r"--port=(\d+)", main_container(leader)["args"][0]).group(1))
    assert f':{gcs}"' in main_container(worker)["args"][0], "workers join the GCS port the leader opened"
    assert leader_fixed - {gcs} == worker_fixed and leader_range == worker_range

    group = docs.one("NetworkPolicy", f"{FULLNAME}-group")
    validate_manifest(group)
    for role_tpl in (leader, worker):
        assert selects(group["spec"]["podSelector"], role_tpl["metadata"]["labels"])
    (rule,) = group["spec"]["ingress"]
    assert is_release_only(rule["from"]) and rule["from"], "Ray's ports: from the release's pods only"
    ranges = port_ranges(rule["ports"])
    for port in leader_fixed | {leader_range[0], leader_range[1], (leader_range[0] + leader_range[1]) // 2}:
        assert allowed(ranges, port), f"Ray listens on {port}, the group policy does not open it"
    # nothing beyond Ray's ports and networkPolicy.groupPorts (vLLM's collectives: ephemeral ports)
    assert ranges == {(p, p) for p in leader_fixed} | {leader_range, (32768, 60999)}
    for role_tpl in (leader, worker):  # and none of them from outside the release
        outside = open_from_outside(docs, role_tpl["metadata"]["labels"])
        assert not [p for p in leader_fixed | set(leader_range) if allowed(outside, p)], outside
    # a policy from another release does not select these pods
    assert not selects(group["spec"]["podSelector"],
                       {**leader["metadata"]["labels"], "app.kubernetes.io/instance": "other"})


def test_group_policy_only_in_multinode_mode(render):
    assert render().get("NetworkPolicy", f"{FULLNAME}-group") is None
    assert render([MULTINODE]).get("NetworkPolicy", f"{FULLNAME}-group") is not None


def test_group_ports_are_configurable(render):
    docs = render([MULTINODE], set_json=['networkPolicy.groupPorts=[{"port": 29500, "endPort": 29600}, {"port": 5555}]'])
    (rule,) = docs.one("NetworkPolicy", f"{FULLNAME}-group")["spec"]["ingress"]
    ranges = port_ranges(rule["ports"])
    assert (29500, 29600) in ranges and (5555, 5555) in ranges and (32768, 60999) not in ranges


# ---- egress -------------------------------------------------------------------------------------

def test_egress_is_restricted_only_when_rules_are_given(render):
    docs = render(set_json=[f"networkPolicy.egress={json.dumps([DNS])}"])
    egress = docs.one("NetworkPolicy", f"{FULLNAME}-egress")
    validate_manifest(egress)
    assert egress["spec"]["policyTypes"] == ["Egress"] and egress["spec"]["egress"] == [DNS, TO_API]
    docs = render(set_values=["helmTest.enabled=false"], set_json=[f"networkPolicy.egress={json.dumps([DNS])}"])
    assert docs.one("NetworkPolicy", f"{FULLNAME}-egress")["spec"]["egress"] == [DNS]
    assert selects(egress["spec"]["podSelector"], docs.server_pod_template()["metadata"]["labels"])
    # multi-node: the group's own ports are added, so restricting egress cannot cut the group apart
    docs = render([MULTINODE], set_json=[f"networkPolicy.egress={json.dumps([DNS])}"])
    egress = docs.one("NetworkPolicy", f"{FULLNAME}-egress")
    validate_manifest(egress)
    (group_rule,) = docs.one("NetworkPolicy", f"{FULLNAME}-group")["spec"]["ingress"]
    assert egress["spec"]["egress"] == [DNS, {"to": group_rule["from"], "ports": group_rule["ports"]}, TO_API]
    for _, tpl in docs.pod_templates():
        assert selects(egress["spec"]["podSelector"], tpl["metadata"]["labels"])
