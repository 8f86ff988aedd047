"""Every `moe-serve` flag is a chart value: `server.<flagInCamelCase>` in values.yaml and in
values.schema.json (with the flag's type, and exactly its choices), and a value set for each one
reaches the server's configuration through the ConfigMap. A new flag without a chart entry fails
here. Three flags are set elsewhere in the chart: --model (model.*), --api-key (apiKey.*, a Secret)
and --cache-dir (cache.mountPath, an emptyDir)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import yaml

from server.cli import ENGINE_FLAGS, SERVER_FLAGS, build_config

from .helpers import CHART
from .test_chart_server_contract import server_argv, server_environ

FLAGS = {f.field: f for f in ENGINE_FLAGS + SERVER_FLAGS}
SET_ELSEWHERE = {"model": "model.source / model.path", "api_key": "apiKey.value / apiKey.existingSecret",
                 "cache_dir": "cache.mountPath (an emptyDir under the read-only root)"}
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
SERVER_SCHEMA = SCHEMA["properties"]["server"]
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())["server"]

# JSON-schema types a flag's value may take in values.yaml (besides null)
TYPES = {"int": {"integer"}, "float": {"number"}, "bool": {"boolean"}, "str": {"string"},
         "list": {"string"}, "bytes": {"integer", "string"}, "choice": None}
TYPES_OF = {"gpu_expert_budget": {"integer", "string"}}  # a size ("4GiB") or a count of experts


def camel(field: str) -> str:
    head, *rest = field.split("_")
    return head + "".join(w.title() for w in rest)


def schema_types(entry: dict) -> set[str]:
    if "oneOf" in entry:
        return {t for alt in entry["oneOf"] for t in schema_types(alt)}
    if "enum" in entry and "type" not in entry:  # e.g. blockSize: the powers of two
        names = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
        return {names[type(v)] for v in entry["enum"]}
    t = entry.get("type", [])
    return set([t] if isinstance(t, str) else t)


# One non-default value per flag (helm value, what the server's config holds then); together they
# must form a valid configuration.
EVERY_OPTION = {
    "served_model_name": ("every-option", "every-option"),
    "tokenizer": ("/models/tokenizer", "/models/tokenizer"),
    "engine": ("native", "native"),
    "dtype": ("float32", "float32"),
    "device": ("cpu", "cpu"),
    "max_model_len": (256, 256),
    "max_num_seqs": (8, 8),
    "max_num_batched_tokens": (512, 512),
    "block_size": (32, 32),
    "kv_cache_memory": ("256MiB", 256 * 2**20),
    "kv_cache_dtype": ("fp8", "fp8"),
    "num_kv_blocks": (64, 64),
    "enable_prefix_caching": (False, False),
    "enable_chunked_prefill": (False, False),
    "enforce_eager": (True, True),
    "async_scheduling": (True, True),
    "attention_backend": ("reference", "reference"),
    "moe_backend": ("loop", "loop"),
    "cpu_linear_layout": ("plain", "plain"),
    "fused_ops": ("torch", "torch"),
    "cpu_kernels": ("off", "off"),
    "quantization": ("int4", "int4"),
    "scheduling_policy": ("priority", "priority"),
    "max_queue_len": (32, 32),
    "seed": (7, 7),
    "expert_placement": ("round_robin", "round_robin"),
    "expert_devices": ("cpu,cpu", ("cpu", "cpu")),
    "num_redundant_experts": (1, 1),
    "gpu_expert_budget": ("4GiB", "4GiB"),
    "cpu_expert_format": ("int8", "int8"),
    "rebalance_interval": (100, 100),
    "record_routing": ("/tmp/routing.jsonl", "/tmp/routing.jsonl"),
    "expert_capacity_factor": (1.25, 1.25),
    "engine_progress_timeout": (120, 120.0),
    "tensor_parallel_size": (2, 2),
    "data_parallel_size": (2, 2),
    "enable_expert_parallel": (True, True),
    "enable_eplb": (True, True),
    "eplb_config": ('{"window_size": 100}', '{"window_size": 100}'),
    "speculative_config": ('{"method": "ngram", "num_speculative_tokens": 3}',
                           '{"method": "ngram", "num_speculative_tokens": 3}'),
    "gpu_memory_utilization": (0.5, 0.5),
    "reasoning_parser": ("qwen3", "qwen3"),
    "otlp_traces_endpoint": ("http://otel-collector:4317", "http://otel-collector:4317"),
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": (8080, 8080),
    "auth_exempt_paths": ("/health,/ready,/metrics,/version,/docs", ("/health", "/ready", "/metrics", "/version",
                                                                       "/docs")),
    "request_timeout": (60, 60.0),
    "drain_timeout": (20, 20.0),
    "max_body_bytes": ("8MiB", 8 * 2**20),
    "max_header_bytes": (32768, 32768),
    "metrics_require_auth": (True, True),
    "allowed_hosts": ("moe.example.com,localhost", ("moe.example.com", "localhost")),
    "limit_concurrency": (512, 512),
    "body_read_timeout": (15.5, 15.5),
    "tool_call_parser": ("glm45", "glm45"),
    "legacy_reasoning_content": (True, True),
    "generation_config": ("vllm", "vllm"),
    "responses_store_max_entries": (10, 10),
    "responses_store_max_bytes": ("1MiB", 2**20),
    "responses_store_ttl": (60, 60.0),
    "enable_auto_tool_choice": (True, True),
    "chat_template": ("{{ messages[0]['content'] }}", "{{ messages[0]['content'] }}"),
    "grammar_compile_timeout": (5, 5.0),
    "grammar_cache_memory": ("128MiB", 128 * 2**20),
    "grammar_compile_workers": (2, 2),
    "log_format": ("text", "text"),
    "log_level": ("debug", "debug"),
    "ui": (False, False),
}


def test_the_model_and_the_api_key_are_set_elsewhere():
    for field, where in SET_ELSEWHERE.items():
        assert field in FLAGS and camel(field) not in SERVER_SCHEMA["properties"], (field, where)


@pytest.mark.parametrize("field", sorted(set(FLAGS) - set(SET_ELSEWHERE)))
def test_every_flag_has_a_schema_entry_and_a_value(field):
    flag = FLAGS[field]
    key = camel(field)
    props = SERVER_SCHEMA["properties"]
    assert key in props, f"{flag.flag} has no server.{key} in values.schema.json (add it, and to values.yaml)"
    assert key in VALUES, f"{flag.flag} has no server.{key} in values.yaml"
    entry = props[key]
    assert entry.get("description", "").startswith(flag.flag + ":"), f"server.{key}: describe it with its --help"
    if flag.kind == "choice":
        assert set(entry["enum"]) - {None} == set(flag.choices), f"server.{key}: the enum differs from {flag.flag}'s"
    else:
        types = schema_types(entry)
        assert types - {"null"} == TYPES_OF.get(field, TYPES[flag.kind]), f"server.{key}: types {types} for a {flag.kind} flag"
    validator = jsonschema.Draft7Validator(entry)
    assert validator.is_valid(VALUES[key]), f"values.yaml server.{key}={VALUES[key]!r} fails its own schema"
    assert validator.is_valid(EVERY_OPTION[field][0]), f"server.{key}: the schema refuses {EVERY_OPTION[field][0]!r}"


def test_no_schema_entry_without_a_flag():
    keys = {camel(f) for f in FLAGS}
    assert set(SERVER_SCHEMA["properties"]) <= keys
    assert set(VALUES) <= keys
    assert set(EVERY_OPTION) == set(FLAGS) - set(SET_ELSEWHERE), "give the new flag a value in EVERY_OPTION"


def test_every_option_set_in_the_chart_reaches_the_server_config(render):
    values = {camel(field): helm_value for field, (helm_value, _) in EVERY_OPTION.items()}
    docs = render(set_json=[f"server={json.dumps(values)}"])
    config = build_config(server_argv(docs), environ=server_environ(docs))
    for field, (_, expected) in EVERY_OPTION.items():
        holder = config.engine if hasattr(config.engine, field) else config
        got = getattr(holder, field)
        assert got == expected, f"server.{camel(field)}={values[camel(field)]!r} gave {field}={got!r}"


@pytest.mark.parametrize(("key", "bad"), [
    ("toolCallParser", "json"), ("reasoningParser", "r1"), ("logLevel", "trace"), ("attentionBackend", "flash"),
    ("otlpTracesEndpoint", "otel-collector:4317"), ("maxBodyBytes", 100), ("limitConcurrency", 0),
    ("bodyReadTimeout", 0), ("expertCapacityFactor", 0), ("ui", "yes"), ("seed", 1.5),
])
def test_bad_option_values_are_refused_by_the_schema(render_fails, key, bad):
    err = render_fails(set_json=[f"server.{key}={json.dumps(bad)}"])
    assert f"/server/{key}" in err, err


def test_the_otlp_pattern_matches_the_server_check():
    from server.config import ConfigError, check_otlp_endpoint

    pattern = re.compile(SERVER_SCHEMA["properties"]["otlpTracesEndpoint"]["pattern"])
    for endpoint in ("http://c:4317", "https://c.example.com/v1/traces", "c:4317", "http://", "ftp://c"):
        try:
            check_otlp_endpoint(endpoint)
            ok = True
        except ConfigError:
            ok = False
        assert bool(pattern.fullmatch(endpoint)) == ok, endpoint
