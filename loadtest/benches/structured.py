"""Structured outputs over HTTP: 16 concurrent schema-constrained requests vs 16 unconstrained of the same lengths.

One server (the bundled model by default), driven with the openai client. Each round sends the
constrained batch (RECORD_SCHEMA from loadtest/schemas.py, temperature 1.0, a seed per request),
then an unconstrained batch whose requests generate exactly as many tokens as their constrained
twins did (`ignore_eos`, `max_tokens` = the twin's count), so both batches have the same shape
step by step and only the grammar differs. Output tok/s = completion tokens / batch wall time;
when the script starts the server it also reports tokens per CPU-second of the server process
(user + system time of all its threads), which other load on a shared machine disturbs far less
than wall time. Rounds alternate and repeat: the report gives each round and medians.

    python -m loadtest structured [--rounds 5] [--concurrency 16] [--model DIR | --url URL]

Goal (issue 18): constrained >= 0.9x unconstrained.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
from pathlib import Path

from loadtest import output, results
from loadtest.harness import Clock
from loadtest.loadgen.procs import ManagedServer
from loadtest.schemas import RECORD_SCHEMA

HEADING = "### Constrained vs unconstrained throughput"

PROMPT = [{"role": "user", "content": "Describe one module of the standard library as a JSON record."}]


def _cpu(proc) -> float:
    if proc is None:
        return float("nan")
    t = proc.cpu_times()
    return t.user + t.system


async def _batch(client, model: str, n: int, constrained: bool, seed0: int, lengths: list[int] | None, proc=None):
    async def one(i: int):
        kw: dict = dict(model=model, messages=PROMPT, temperature=1.0, seed=seed0 + i)
        if constrained:
            kw.update(max_tokens=400, response_format={"type": "json_schema", "json_schema": {
                "name": "record", "schema": RECORD_SCHEMA}})
        else:
            kw.update(max_tokens=lengths[i], extra_body={"ignore_eos": True})
        r = await client.chat.completions.create(**kw)
        return r.usage.completion_tokens, r.choices[0].message.content

    cpu = _cpu(proc)
    with Clock(cpu=False) as clock:  # the server's CPU time is what counts here, read from its process
        outs = await asyncio.gather(*(one(i) for i in range(n)))
    wall, cpu = clock.wall, _cpu(proc) - cpu
    tokens = [r[0] for r in outs]
    if constrained:
        for _, text in outs:
            json.loads(text)  # every constrained output parses
    return sum(tokens) / wall, tokens, wall, sum(tokens) / cpu


async def run(url: str, model: str, rounds: int, n: int, pid: int | None = None) -> dict:
    import openai
    import psutil

    proc = psutil.Process(pid) if pid else None
    rows = []
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600) as client:
        await _batch(client, model, n, True, 10_000, None)  # warm-up: compile the schema, touch every path
        for k in range(rounds):
            c_tps, lengths, c_wall, c_cpu = await _batch(client, model, n, True, 1000 * k, None, proc)
            u_tps, _, u_wall, u_cpu = await _batch(client, model, n, False, 1000 * k, lengths, proc)
            rows.append({"round": k, "constrained_tok_s": round(c_tps, 1), "unconstrained_tok_s": round(u_tps, 1),
                         "ratio": round(c_tps / u_tps, 3), "tokens": sum(lengths),
                         "constrained_tok_per_cpu_s": round(c_cpu, 1), "unconstrained_tok_per_cpu_s": round(u_cpu, 1),
                         "cpu_ratio": round(c_cpu / u_cpu, 3),
                         "constrained_wall_s": round(c_wall, 2), "unconstrained_wall_s": round(u_wall, 2)})
            print(f"[bench] round {k}: constrained {c_tps:.1f} tok/s, unconstrained {u_tps:.1f} tok/s, "
                  f"ratio {c_tps / u_tps:.3f}; per CPU-second {c_cpu:.1f} vs {u_cpu:.1f}, ratio {c_cpu / u_cpu:.3f} "
                  f"({sum(lengths)} tokens each)")
    return {"concurrency": n, "rounds": rows,
            "median_ratio": round(statistics.median(r["ratio"] for r in rows), 3),
            "median_cpu_ratio": round(statistics.median(r["cpu_ratio"] for r in rows), 3),
            "median_constrained_tok_s": round(statistics.median(r["constrained_tok_s"] for r in rows), 1),
            "median_unconstrained_tok_s": round(statistics.median(r["unconstrained_tok_s"] for r in rows), 1)}


def start_server(model: str | None, concurrency: int, log: Path) -> ManagedServer:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "server.cli", "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "1024",
            "--max-num-seqs", str(max(32, concurrency)), "--seed", "0", *(["--model", model] if model else [])]
    server = ManagedServer(argv, log_path=log, port=port, cwd=results.REPO, ready_path="/ready",
                           env={"TOKENIZERS_PARALLELISM": "false"})
    return server.start().wait_ready(300)


def blocks(report: dict) -> list[dict]:
    col = results.column
    rows = [[r["round"], r["constrained_tok_s"], r["unconstrained_tok_s"], r["ratio"], r["cpu_ratio"]]
            for r in report["rounds"]]
    rows.append(["**median**", report["median_constrained_tok_s"], report["median_unconstrained_tok_s"],
                 report["median_ratio"], report["median_cpu_ratio"]])
    return [results.text(f"Model `{report['model']}` on the native engine; per round {report['concurrency']} "
                         "concurrent chat requests constrained by `loadtest/schemas.py` RECORD_SCHEMA at temperature "
                         f"1.0, then {report['concurrency']} unconstrained requests generating exactly as many tokens "
                         "each. Every constrained output parsed (the benchmark checks it)."),
            results.table(None, [col("round"), col("constrained tok/s", ".1f"), col("unconstrained tok/s", ".1f"),
                                 col("ratio", ".2f"), col("ratio per server CPU-second", ".2f")], rows),
            {"kind": "note"}]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m loadtest structured", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model directory (default: the bundled checkpoint)")
    p.add_argument("--url", help="an already running server instead of starting one")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--concurrency", type=int, default=16)
    output.add_args(p)
    args = p.parse_args(argv)
    result = results.new_result("structured", argv, vars(args), heading=HEADING, packages=("xgrammar", "openai"))
    server = None
    if args.url is None:
        server = start_server(args.model, args.concurrency, results.default_path(result).with_suffix(".log"))
        url = server.url
    else:
        url = args.url
    try:
        import httpx

        model = httpx.get(url + "/v1/models", trust_env=False).json()["data"][0]["id"]
        report = asyncio.run(run(url, model, args.rounds, args.concurrency,
                                 server.pid if server is not None else None))
    finally:
        if server is not None:
            server.stop()
    report["model"] = model
    result["measurements"] = report
    result["summary"]["blocks"] = blocks(report)
    output.finish(result, args)
    return result
