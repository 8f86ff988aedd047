"""One big completion (n=64, prompt_logprobs=20, logprobs=20): its answer, the worst /health latency and the RSS growth during it.

Hardening issue 25, item 3: one completion of ~1,350 prompt tokens with `n` choices,
`prompt_logprobs` 20 and `logprobs` 20 (vLLM's completions API repeats the prompt logprobs in
each choice), while /health is requested every 50 ms and the server's RSS sampled every 20 ms.
Reports the status, the answer's size and time, the worst /health latency and the RSS growth
(peak and 0.5 s after). Against this checkout's server (`--a-repo`; `--max-model-len 2048
--max-num-seqs 64`, extra flags after `--`), a running one (`--url`, `--pid` for its RSS), and
with `--b-repo` the same in another checkout after it (e.g. main before the cap, 2eb9c1b).

    python -m loadtest big-answer                              # n 64: now a 400 (the cap)
    python -m loadtest big-answer --n 9 --stream               # n 9, just under the cap, streamed
    python -m loadtest big-answer --n 64,9 --modes whole,stream   # each n, whole and streamed
    python -m loadtest big-answer --b-repo ../wt-base          # and the same on another checkout
    python -m loadtest big-answer --url http://127.0.0.1:8000 --pid <server pid>
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from loadtest import output, results
from loadtest.benches import checkout
from loadtest.harness import Clock

HEADING = "### One big answer (prompt logprobs): /health and RSS"
SERVER_ARGS = ["--max-model-len", "2048", "--max-num-seqs", "64"]
WORDS = "The list data type has some more methods. Here are all of the methods of list objects. "


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return None


def prompt_of(client: httpx.Client, tokens: int) -> tuple[str, int]:
    """The shortest repetition of WORDS over `tokens` tokens, and its token count."""
    text = ""
    while client.post("/tokenize", json={"prompt": text + WORDS}).json()["count"] <= tokens:
        text += WORDS
    return text, client.post("/tokenize", json={"prompt": text}).json()["count"]


def probe(url: str, pid: int | None, n: int, max_tokens: int, stream: bool, prompt_tokens: int) -> dict[str, Any]:
    client = httpx.Client(base_url=url, timeout=600, trust_env=False)
    text, count = prompt_of(client, prompt_tokens)
    body = {"prompt": text, "n": n, "prompt_logprobs": 20, "logprobs": 20, "max_tokens": max_tokens, "stream": stream}
    before = rss_mb(pid)
    worst, peak, done = [0.0], [before], threading.Event()

    def poll() -> None:
        while not done.is_set():
            with Clock(cpu=False) as clock:
                httpx.get(url + "/health", timeout=120, trust_env=False)
            worst[0] = max(worst[0], clock.wall)
            time.sleep(0.05)

    def sample() -> None:
        while not done.is_set() and pid is not None:
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.02)

    threads = [threading.Thread(target=poll), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    try:
        with Clock(cpu=False) as clock:
            if stream:
                with client.stream("POST", "/v1/completions", json=body) as r:
                    status, size = r.status_code, sum(len(b) for b in r.iter_bytes())
            else:
                r = client.post("/v1/completions", json=body)
                status, size = r.status_code, len(r.content)
        time.sleep(0.5)
    finally:
        done.set()
        for t in threads:
            t.join()
        client.close()
    after = rss_mb(pid)
    row = {"prompt_tokens": count, "n": n, "max_tokens": max_tokens, "stream": stream, "status": status,
           "bytes": size, "seconds": round(clock.wall, 2), "health_worst_s": round(worst[0], 3),
           "rss_before_mb": None if before is None else round(before),
           "rss_peak_growth_mb": None if before is None else round(peak[0] - before),
           "rss_after_growth_mb": None if before is None else round(after - before)}
    print(f"[bench] {row}", flush=True)
    return row


def blocks(report: dict) -> list[dict]:
    col = results.column
    rows = [[s["label"], r["n"], "yes" if r["stream"] else "no", r["status"], r["bytes"] / 1e6, r["seconds"],
             r["health_worst_s"], r["rss_peak_growth_mb"], r["rss_after_growth_mb"]]
            for s in report["sides"] for r in s["probes"]]
    first = report["sides"][0]["probes"][0]
    return [results.text(
                f"One `/v1/completions` request of {first['prompt_tokens']} prompt tokens, `prompt_logprobs` 20, "
                f"`logprobs` 20, `max_tokens` {first['max_tokens']}, `n` as below, to a server started with "
                f"`{' '.join(SERVER_ARGS)}` (and the flags in the command), while /health is requested every 50 ms and "
                "the server's RSS sampled every 20 ms; the servers one after the other: "
                + ", ".join(map(checkout.describe, report["sides"])) + "."),
            results.table(None, [col("server"), col("n", "d"), col("streamed"), col("status", "d"),
                                 col("answer (MB)", ",.1f"), col("seconds", ".2f"), col("/health worst (s)", ".3f"),
                                 col("RSS peak growth (MB)", ",d"), col("RSS growth after (MB)", ",d")], rows),
            {"kind": "note"}]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _modes(text: str) -> list[str]:
    modes = [x for x in text.split(",") if x]
    if not modes or any(m not in ("whole", "stream") for m in modes):
        raise argparse.ArgumentTypeError(f"modes are whole and stream, not {text!r}")
    return modes


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, server_args = checkout.split_argv(argv)
    ap = argparse.ArgumentParser(prog="python -m loadtest big-answer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=_ints, default=[64], help="choices per request; comma-separated: one request each")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=1350)
    ap.add_argument("--modes", type=_modes, default=["whole"], help="whole, stream or both (comma-separated): "
                    "one request per n and mode")
    ap.add_argument("--stream", dest="modes", action="store_const", const=["stream"], help="= --modes stream")
    checkout.add_server_args(ap, "for RSS")
    output.add_args(ap)
    args = ap.parse_args(own)
    args.server_args = server_args
    result = results.new_result("big-answer", argv, vars(args), heading=HEADING, packages=("httpx",))
    stem = Path(args.json).with_suffix("") if args.json else results.default_path(result).with_suffix("")
    plan = checkout.plan_sides(args, ap, SERVER_ARGS, server_args)

    def measure(i: int, url: str, pid: int | None) -> dict[str, Any]:
        return {"probes": [probe(url, pid, n, args.max_tokens, mode == "stream", args.prompt_tokens)
                           for n in args.n for mode in args.modes]}

    report: dict[str, Any] = {"server_args": SERVER_ARGS, "sides": checkout.run_sides(plan, args, stem, measure)}
    result["measurements"] = report
    result["summary"]["blocks"] = blocks(report)
    output.finish(result, args)
    return result
