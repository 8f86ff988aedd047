"""The chart and the server agree: every env var and argument the chart renders is a `moe-serve`
flag, the rendered configuration parses into a valid ServerConfig, and a real `moe-serve` started
with the chart's default configuration answers the probe paths on the probe port, exposes the
metric the autoscalers use, and exits 0 on SIGTERM within the pod's grace period."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from .helpers import (
    CHART,
    CI_VALUES,
    IDS,
    VALUE_SETS,
    Rendered,
    env_to_flag,
    files,
    main_container,
)

AUTOSCALING_METRIC = "vllm:num_requests_waiting"


def server_argv(docs: Rendered) -> list[str]:
    """The arguments `moe-serve` gets in the serving container (after the executable)."""
    c = main_container(docs.server_pod_template())
    if c.get("command"):  # the LWS leader: a shell script that ends in `exec moe-serve ...`
        exec_line = c["args"][0].strip().splitlines()[-1]
        argv = shlex.split(exec_line)
        assert argv[:2] == ["exec", "moe-serve"], exec_line
        return argv[2:]
    return list(c.get("args", []))


def server_environ(docs: Rendered) -> dict[str, str]:
    """MOE_SERVE_* the serving container sees (ConfigMap via envFrom, plus its own env)."""
    env = dict(docs.config_env())
    for e in main_container(docs.server_pod_template()).get("env", []):
        if e["name"].startswith("MOE_SERVE_"):
            env[e["name"]] = e.get("value", "secret-from-" + str(e.get("valueFrom")))
    return env


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_rendered_env_and_args_are_cli_flags(render, cli_flags, values_file):
    docs = render(files(values_file))
    for name in server_environ(docs):
        assert env_to_flag(name) in cli_flags, f"{name}: `moe-serve --help` has no {env_to_flag(name)}"
    for arg in server_argv(docs):
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in cli_flags, f"`moe-serve --help` has no {arg}"


def test_every_server_value_is_a_flag(cli_flags):
    """Each key of `server:` in values.yaml becomes MOE_SERVE_<KEY>, so each must be a flag."""
    import yaml

    server = yaml.safe_load((CHART / "values.yaml").read_text())["server"]
    for key in server:
        flag = "--" + re.sub(r"(?<!^)(?=[A-Z])", "-", key).lower()
        assert flag in cli_flags, f"values.yaml server.{key}: `moe-serve --help` has no {flag}"


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_rendered_config_is_a_valid_server_config(render, values_file):
    """The server's own parser (flags over MOE_SERVE_* env) accepts what the chart renders."""
    from server.cli import build_config
    from server.config import BUNDLED_MODEL

    docs = render(files(values_file))
    env = server_environ(docs)
    config = build_config(server_argv(docs), environ=env)
    assert config.host == "0.0.0.0" and str(config.port) == env["MOE_SERVE_PORT"]
    assert config.drain_timeout == float(env["MOE_SERVE_DRAIN_TIMEOUT"])
    assert config.engine.model == env.get("MOE_SERVE_MODEL", BUNDLED_MODEL)
    assert config.engine.model_name == env["MOE_SERVE_SERVED_MODEL_NAME"]
    assert config.engine.engine == env["MOE_SERVE_ENGINE"]
    if "MOE_SERVE_API_KEY" in env:
        assert config.api_key
    for probe_path in ("/health", "/ready", "/metrics"):  # the kubelet and Prometheus send no key
        assert probe_path in config.auth_exempt_paths


def test_gpu_values_reach_the_engine_config(render):
    from server.cli import build_config

    docs = render([CHART / "ci" / "gpu-values.yaml"])
    engine = build_config(server_argv(docs), environ=server_environ(docs)).engine
    assert engine.device == "cuda" and engine.max_model_len == 8192 and engine.max_num_seqs == 128
    assert engine.kv_cache_memory == 16 * 2**30
    assert tuple(engine.expert_devices) == ("cuda:0", "cuda:1")
    assert engine.expert_placement == "balanced" and engine.num_redundant_experts == 2
    assert engine.enable_prefix_caching is True


def test_multinode_leader_runs_vllm_with_the_parallel_layout(render):
    from server.cli import build_config

    docs = render([CHART / "ci" / "vllm-multinode-values.yaml"])
    engine = build_config(server_argv(docs), environ=server_environ(docs)).engine
    assert engine.engine == "vllm"
    assert (engine.tensor_parallel_size, engine.data_parallel_size) == (8, 2)
    assert engine.enable_expert_parallel is True and engine.enable_eplb is True


def test_ci_value_sets_exist():
    assert CI_VALUES


# ---- a real server with the chart's configuration -----------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_server_started_with_the_chart_config_serves_probes_metrics_and_drains(render, moe_serve_bin):
    docs = render()
    tpl = docs.server_pod_template()
    c = main_container(tpl)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOE_SERVE_")}
    env.update(server_environ(docs))
    port = _free_port()
    # what the pod has, except the address: the test binds to localhost on a free port
    assert env["MOE_SERVE_HOST"] == "0.0.0.0"
    env.update(MOE_SERVE_HOST="127.0.0.1", MOE_SERVE_PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    named_ports = {p["name"]: p["containerPort"] for p in c["ports"]}

    proc = subprocess.Popen([moe_serve_bin, *server_argv(docs)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        # startup probe: what the kubelet would do, with a budget far below the chart's 10 minutes
        startup = c["startupProbe"]
        assert named_ports[startup["httpGet"]["port"]] == int(docs.config_env()["MOE_SERVE_PORT"])
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"moe-serve exited {proc.returncode}:\n{proc.stdout.read()[-4000:]}"
            try:
                if _get(base + startup["httpGet"]["path"], timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the startup probe never passed"
            time.sleep(0.25)
        assert _get(base + c["livenessProbe"]["httpGet"]["path"])[0] == 200
        deadline = time.monotonic() + 60
        while _get(base + c["readinessProbe"]["httpGet"]["path"])[0] != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.25)

        # the series the HPA (via prometheus-adapter) and the KEDA query scale on
        status, text = _get(base + "/metrics")
        assert status == 200
        served = docs.config_env()["MOE_SERVE_SERVED_MODEL_NAME"]
        pattern = re.escape(AUTOSCALING_METRIC) + r"\{[^}]*model_name=\"" + re.escape(served) + r"\"[^}]*\} "
        assert re.search(pattern, text), f"{AUTOSCALING_METRIC}{{model_name={served!r}}} not in /metrics"
        status, models = _get(base + "/v1/models")
        assert status == 200 and served in models

        # pod deletion: preStop sleep, then SIGTERM; the process must be gone within the grace period
        grace = tpl["spec"]["terminationGracePeriodSeconds"]
        pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=grace - pre_stop)
        assert rc == 0, proc.stdout.read()[-4000:]
        assert time.monotonic() - t0 < grace - pre_stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("size", ["16GiB", "512MiB", "1.5GiB", "2G", "4KB", "100", "16Gi", "lots", "2 GiB", "1e9"])
def test_kv_cache_sizes_the_schema_accepts_parse_in_the_server(size):
    """values.schema.json's kvCacheMemory pattern admits only sizes the server can parse."""
    import json

    import jsonschema

    from server.cli import build_config

    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["server"]["properties"]
    accepted_by_schema = jsonschema.Draft7Validator(schema["kvCacheMemory"]).is_valid(size)
    try:
        parsed = build_config([], environ={"MOE_SERVE_KV_CACHE_MEMORY": size}).engine.kv_cache_memory
    except SystemExit:
        parsed = None
    if accepted_by_schema:
        assert parsed and parsed > 0, f"the chart accepts kvCacheMemory={size!r}, the server does not"
    assert accepted_by_schema == (size in {"16GiB", "512MiB", "1.5GiB", "2G", "4KB", "100"})
