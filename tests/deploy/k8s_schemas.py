"""Schema validation of rendered Kubernetes manifests.

Built-in kinds: the OpenAPI-derived JSON schemas that the `kubernetes-validate` package ships
offline, in strict mode (unknown fields are errors, as with `kubectl apply --validate=strict`).

CRDs (ServiceMonitor, PodMonitor, PrometheusRule, ScaledObject, LeaderWorkerSet, HTTPRoute) are not in that
package. For them this module holds hand-written schemas, written from the field lists of the
upstream CRDs (prometheus-operator monitoring.coreos.com/v1, KEDA keda.sh/v1alpha1, LWS
leaderworkerset.x-k8s.io/v1): apiVersion, kind, required fields, types, enums, and — unlike the
API server, which prunes — no unknown fields at the levels the chart writes. Free-form parts
(relabel configs, HPA behavior, trigger metadata values) are typed but not exhaustively checked.
The pod templates inside a LeaderWorkerSet are validated with the real Kubernetes PodTemplate
schema, so they get the same strictness as a Deployment's.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate

LATEST_KUBERNETES = kubernetes_validate.latest_version()  # e.g. "1.37.0"

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_DURATION = {"type": "string",
             "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
         "maxLength": 253}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _NAME, "namespace": _STR, "labels": _STRMAP, "annotations": _STRMAP},
    "additionalProperties": False,
}
_LABEL_SELECTOR = {
    "type": "object",
    "properties": {
        "matchLabels": _STRMAP,
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"],
            "properties": {"key": _STR, "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": _STR}},
            "additionalProperties": False}},
    },
    "additionalProperties": False,
}
_RELABEL = {
    "type": "object",
    "properties": {
        "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod",
                            "labelmap", "LabelMap", "labeldrop", "LabelDrop", "labelkeep", "LabelKeep",
                            "lowercase", "Lowercase", "uppercase", "Uppercase", "keepequal", "KeepEqual",
                            "dropequal", "DropEqual"]},
        "modulus": {"type": "integer", "minimum": 0},
        "regex": _STR, "replacement": _STR, "separator": _STR,
        "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
        "targetLabel": _STR,
    },
    "additionalProperties": False,
}
_SCRAPE_ENDPOINT_COMMON = {
    "port": _STR, "path": _STR, "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": _BOOL, "honorTimestamps": _BOOL,
    "relabelings": {"type": "array", "items": _RELABEL},
    "metricRelabelings": {"type": "array", "items": _RELABEL},
    "params": {"type": "object"}, "tlsConfig": {"type": "object"}, "authorization": {"type": "object"},
    "bearerTokenSecret": {"type": "object"}, "basicAuth": {"type": "object"}, "followRedirects": _BOOL,
    "enableHttp2": _BOOL, "filterRunning": _BOOL,
}
_NAMESPACE_SELECTOR = {"type": "object", "properties": {"any": _BOOL, "matchNames": {"type": "array", "items": _STR}},
                       "additionalProperties": False}
_MONITOR_COMMON = {
    "namespaceSelector": _NAMESPACE_SELECTOR, "selector": _LABEL_SELECTOR, "jobLabel": _STR,
    "podTargetLabels": {"type": "array", "items": _STR}, "sampleLimit": {"type": "integer", "minimum": 0},
    "targetLimit": {"type": "integer", "minimum": 0}, "attachMetadata": {"type": "object"},
}


def _crd(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                       "metadata": _METADATA, "spec": spec},
        "additionalProperties": False,
    }


SERVICE_MONITOR = _crd("monitoring.coreos.com/v1", "ServiceMonitor", {
    "type": "object",
    "required": ["selector"],  # endpoints is optional in recent operator versions, required in older
    "properties": {
        **_MONITOR_COMMON,
        "targetLabels": {"type": "array", "items": _STR},
        "endpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "properties": {**_SCRAPE_ENDPOINT_COMMON, "targetPort": {"type": ["string", "integer"]},
                                             "bearerTokenFile": _STR},
            "additionalProperties": False}},
    },
    "additionalProperties": False,
})

POD_MONITOR = _crd("monitoring.coreos.com/v1", "PodMonitor", {
    "type": "object",
    "required": ["selector"],
    "properties": {
        **_MONITOR_COMMON,
        "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "properties": {**_SCRAPE_ENDPOINT_COMMON, "portNumber": {"type": "integer"}},
            "additionalProperties": False}},
    },
    "additionalProperties": False,
})

_RULE = {
    "type": "object",
    "required": ["expr"],
    "properties": {
        "alert": _STR, "record": _STR, "expr": {"type": ["string", "integer"]},
        "for": _DURATION, "keep_firing_for": _DURATION, "labels": _STRMAP, "annotations": _STRMAP,
    },
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "additionalProperties": False,
}
PROMETHEUS_RULE = _crd("monitoring.coreos.com/v1", "PrometheusRule", {
    "type": "object",
    "properties": {"groups": {"type": "array", "items": {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "minLength": 1}, "interval": _DURATION, "query_offset": _DURATION,
                       "limit": {"type": "integer"}, "labels": _STRMAP, "partial_response_strategy": _STR,
                       "rules": {"type": "array", "items": _RULE}},
        "additionalProperties": False}}},
    "additionalProperties": False,
})

_SCALE_TARGET = {"type": "object", "required": ["name"],
                 "properties": {"apiVersion": _STR, "kind": _STR, "name": _STR, "envSourceContainerName": _STR},
                 "additionalProperties": False}
SCALED_OBJECT = _crd("keda.sh/v1alpha1", "ScaledObject", {
    "type": "object",
    "required": ["scaleTargetRef", "triggers"],
    "properties": {
        "scaleTargetRef": _SCALE_TARGET,
        "pollingInterval": {"type": "integer", "minimum": 1},
        "cooldownPeriod": {"type": "integer", "minimum": 0},
        "initialCooldownPeriod": {"type": "integer", "minimum": 0},
        "idleReplicaCount": {"type": "integer", "minimum": 0},
        "minReplicaCount": {"type": "integer", "minimum": 0},
        "maxReplicaCount": {"type": "integer", "minimum": 1},
        "fallback": {"type": "object", "required": ["failureThreshold", "replicas"]},
        "advanced": {"type": "object", "properties": {
            "restoreToOriginalReplicaCount": _BOOL,
            "horizontalPodAutoscalerConfig": {"type": "object", "properties": {
                "name": _STR, "behavior": {"type": "object"}}, "additionalProperties": False},
            "scalingModifiers": {"type": "object"}}, "additionalProperties": False},
        "triggers": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["type", "metadata"],
            "properties": {
                "type": _STR, "name": _STR, "useCachedMetrics": _BOOL,
                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                # KEDA requires every metadata value to be a string
                "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
                "authenticationRef": {"type": "object", "required": ["name"], "properties": {
                    "name": _STR, "kind": {"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}},
                    "additionalProperties": False},
            },
            "additionalProperties": False}},
    },
    "additionalProperties": False,
})

_POD_TEMPLATE = {"type": "object", "required": ["metadata", "spec"],
                 "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}}}
LEADER_WORKER_SET = _crd("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet", {
    "type": "object",
    "required": ["leaderWorkerTemplate"],
    "properties": {
        "replicas": {"type": "integer", "minimum": 0},
        "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
        "networkConfig": {"type": "object", "required": ["subdomainPolicy"],
                          "properties": {"subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}},
                          "additionalProperties": False},
        "rolloutStrategy": {"type": "object"},
        "leaderWorkerTemplate": {
            "type": "object",
            "required": ["workerTemplate"],
            "properties": {
                "size": {"type": "integer", "minimum": 1},
                "restartPolicy": {"enum": ["Default", "RecreateGroupOnPodRestart", "RecreateGroupAfterStart", "None"]},
                "leaderTemplate": _POD_TEMPLATE,
                "workerTemplate": _POD_TEMPLATE,
                "subGroupPolicy": {"type": "object"},
                "volumeClaimTemplates": {"type": "array"},
                "persistentVolumeClaimRetentionPolicy": {"type": "object"},
            },
            "additionalProperties": False,
        },
    },
    "additionalProperties": False,
})

# Gateway API v1 (gateway.networking.k8s.io, standard channel): the HTTPRoute fields the chart
# writes, with the CRD's formats for hostnames, paths and durations.
_GW_DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
_GW_HOSTNAME = {"type": "string", "maxLength": 253,
                "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
_GW_MATCH = {
    "type": "object",
    "properties": {
        "path": {"type": "object", "properties": {
            "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
            "value": {"type": "string", "maxLength": 1024, "pattern": "^/"}}, "additionalProperties": False},
        "headers": {"type": "array", "maxItems": 16, "items": {"type": "object"}},
        "queryParams": {"type": "array", "maxItems": 16, "items": {"type": "object"}},
        "method": {"enum": ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]},
    },
    "additionalProperties": False,
}
HTTP_ROUTE = _crd("gateway.networking.k8s.io/v1", "HTTPRoute", {
    "type": "object",
    "properties": {
        "parentRefs": {"type": "array", "minItems": 1, "maxItems": 32, "items": {
            "type": "object", "required": ["name"],
            "properties": {"group": _STR, "kind": _STR, "namespace": _STR, "name": {"type": "string", "minLength": 1},
                           "sectionName": _STR, "port": {"type": "integer", "minimum": 1, "maximum": 65535}},
            "additionalProperties": False}},
        "hostnames": {"type": "array", "maxItems": 16, "items": _GW_HOSTNAME},
        "rules": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
            "type": "object",
            "properties": {
                "name": _STR,
                "matches": {"type": "array", "maxItems": 64, "items": _GW_MATCH},
                "filters": {"type": "array", "maxItems": 16, "items": {"type": "object"}},
                "backendRefs": {"type": "array", "items": {
                    "type": "object", "required": ["name"],
                    "properties": {"group": _STR, "kind": _STR, "name": {"type": "string", "minLength": 1},
                                   "namespace": _STR, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                   "weight": {"type": "integer", "minimum": 0, "maximum": 1000000}},
                    "additionalProperties": False}},
                "timeouts": {"type": "object", "properties": {"request": _GW_DURATION, "backendRequest": _GW_DURATION},
                             "additionalProperties": False},
            },
            "additionalProperties": False}},
    },
    "additionalProperties": False,
})

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): HTTP_ROUTE,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR,
    ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR,
    ("monitoring.coreos.com/v1", "PrometheusRule"): PROMETHEUS_RULE,
    ("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): LEADER_WORKER_SET,
}


def _k8s(doc: dict[str, Any], version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        raise AssertionError(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {e.message}") from None
    except kubernetes_validate.SchemaNotFoundError as e:
        raise AssertionError(f"no schema for {e.kind} {e.api_version} in Kubernetes {version}: "
                             "an API the cluster does not serve, or a CRD this module lacks") from None


def validate_manifest(doc: dict[str, Any], version: str = LATEST_KUBERNETES) -> None:
    """Raise AssertionError if `doc` is not a valid object of its kind in Kubernetes `version`."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    crd = CRD_SCHEMAS.get(key)
    if crd is None:
        _k8s(doc, version)
        return
    try:
        jsonschema.Draft202012Validator(crd).validate(doc)
    except jsonschema.ValidationError as e:
        path = ".".join(str(p) for p in e.absolute_path)
        raise AssertionError(f"{key[1]}/{doc.get('metadata', {}).get('name')}: {path}: {e.message}") from None
    if key[1] == "LeaderWorkerSet":
        tpl = doc["spec"]["leaderWorkerTemplate"]
        for role in ("leaderTemplate", "workerTemplate"):
            if role in tpl:
                pod_template = {"apiVersion": "v1", "kind": "PodTemplate",
                                "metadata": {"name": f"{doc['metadata']['name']}-{role.lower()}"},
                                "template": copy.deepcopy(tpl[role])}
                _k8s(pod_template, version)
