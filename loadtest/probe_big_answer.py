"""The hardening round 2 (item 3) probe: one completion of ~1,350 prompt tokens with n choices,
prompt_logprobs 20 and logprobs 20, while /health is polled every 50 ms and the server's RSS is
sampled every 20 ms. Reports the status, the answer's size and time, the worst /health latency
and the RSS growth (peak and after).

    python loadtest/probe_big_answer.py                      # starts a server (max-model-len 2048)
    python loadtest/probe_big_answer.py --n 9 --stream       # just under the prompt logprob cap
    python loadtest/probe_big_answer.py --url http://127.0.0.1:8000 --pid <server pid>

With the defaults (the issue's request: n 64, max_tokens 64) the server now answers 400 (the
prompt logprob entries of one answer are capped); before, the answer was 126 MB and /health
stalled 15-21 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = "The list data type has some more methods. Here are all of the methods of list objects. "


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


def prompt_of(client: httpx.Client, tokens: int) -> tuple[str, int]:
    text = ""
    while client.post("/tokenize", json={"prompt": text + WORDS}).json()["count"] <= tokens:
        text += WORDS
    return text, client.post("/tokenize", json={"prompt": text}).json()["count"]


def probe(url: str, pid: int, n: int, max_tokens: int, stream: bool, prompt_tokens: int) -> dict:
    client = httpx.Client(base_url=url, timeout=600)
    text, count = prompt_of(client, prompt_tokens)
    body = {"prompt": text, "n": n, "prompt_logprobs": 20, "logprobs": 20, "max_tokens": max_tokens, "stream": stream}
    before = rss_mb(pid)
    worst, peak, done = [0.0], [before], threading.Event()

    def poll() -> None:
        while not done.is_set():
            start = time.perf_counter()
            httpx.get(url + "/health", timeout=120)
            worst[0] = max(worst[0], time.perf_counter() - start)
            time.sleep(0.05)

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.02)

    threads = [threading.Thread(target=poll), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    start = time.perf_counter()
    if stream:
        with client.stream("POST", "/v1/completions", json=body) as r:
            status, size = r.status_code, sum(len(b) for b in r.iter_bytes())
    else:
        r = client.post("/v1/completions", json=body)
        status, size = r.status_code, len(r.content)
    elapsed = time.perf_counter() - start
    time.sleep(0.5)
    done.set()
    for t in threads:
        t.join()
    return {"prompt_tokens": count, "n": n, "stream": stream, "status": status, "bytes": size,
            "seconds": round(elapsed, 2), "health_worst_s": round(worst[0], 3),
            "rss_peak_growth_mb": round(peak[0] - before), "rss_after_growth_mb": round(rss_mb(pid) - before)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server (else one is started)")
    ap.add_argument("--pid", type=int, help="the running server's pid (for RSS)")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=1350)
    ap.add_argument("--stream", action="store_true")
    args = ap.parse_args()
    proc = None
    if args.url is None:
        from tests.server.conftest import start_server

        proc = start_server(["--max-model-len", "2048", "--max-num-seqs", "64"], Path(tempfile.mkdtemp()))
        url, pid = proc.url, proc.proc.pid
    else:
        if args.pid is None:
            ap.error("--pid is needed with --url")
        url, pid = args.url, args.pid
    try:
        print(probe(url, pid, args.n, args.max_tokens, args.stream, args.prompt_tokens))
    finally:
        if proc is not None:
            proc.stop()


if __name__ == "__main__":
    main()
