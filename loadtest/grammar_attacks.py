"""The grammar attacks of hardening issue 25 (items 1 and 2), measured against one server.

Starts the server (the bundled model; extra server flags after `--`) or uses `--url`, and runs:
- `optional`: one request whose `guided_json` has 1,600 optional integer properties (42 KB;
  ~50 s of compile on main 2eb9c1b), while a probe thread measures /health, /tokenize and a
  4-token completion over and over: the request's time and each probe's worst latency;
- `ebnf`: the same compile written as EBNF (xgrammar's own conversion of that schema, 223 KB;
  EBNF has no size limits of ours, so only the time budget stops it), sent twice, same probes;
- `stream`: tokens/s of one running stream alone, then while the `ebnf` compile of another
  spec runs, 3 rounds (the issue: 132 -> 49 tok/s with xgrammar's 4 compile threads on 2 cores);
- `rss`: the server's RSS (and its compile processes') before and after 70 distinct big
  grammars: 240 KB `pattern` schemas of 21,000 alternatives each (~67 MB compiled on main).

    python loadtest/grammar_attacks.py                       # all, on a server it starts
    python loadtest/grammar_attacks.py --only rss --json /tmp/rss.json
    python loadtest/grammar_attacks.py -- --grammar-compile-timeout 5
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ATTACKS = ("optional", "ebnf", "stream", "rss")


def optional_schema(n: int, prefix: str = "p") -> dict:
    return {"type": "object", "properties": {f"{prefix}{i}": {"type": "integer"} for i in range(n)}}


def optional_ebnf(n: int, prefix: str = "p") -> str:
    import xgrammar as xgr

    return str(xgr.Grammar.from_json_schema(json.dumps(optional_schema(n, prefix)), any_whitespace=False))


def pattern_schema(seed: int, n: int = 21000, length: int = 10) -> dict:
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(length)) for _ in range(n)})
    return {"type": "string", "pattern": "^(" + "|".join(words) + ")$"}


class Probe:
    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.worst = {"health": 0.0, "tokenize": 0.0, "completion": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=600) as c:
            while not self._stop.is_set():
                for name, call in (("health", lambda: c.get("/health")),
                                   ("tokenize", lambda: c.post("/tokenize", json={"prompt": "The list data type"})),
                                   ("completion", lambda: c.post("/v1/completions", json={
                                       "model": self.model, "prompt": "The os module", "max_tokens": 4}))):
                    start = time.monotonic()
                    call()
                    self.worst[name] = max(self.worst[name], time.monotonic() - start)
                time.sleep(0.05)

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(600)


def _post(url: str, body: dict, timeout: float = 600) -> tuple[int, float, str]:
    start = time.monotonic()
    try:
        r = httpx.post(url + "/v1/completions", json=body, timeout=timeout)
        status, text = r.status_code, r.text[:200]
    except httpx.TimeoutException:
        status, text = 0, f"no answer within {timeout:g} s"
    return status, round(time.monotonic() - start, 2), text


def attack_optional(url: str, model: str) -> dict:
    with Probe(url, model) as probe:
        status, took, text = _post(url, {"model": model, "prompt": "x", "max_tokens": 5,
                                         "guided_json": optional_schema(1600)})
    return {"status": status, "seconds": took, "answer": text, "worst": _rounded(probe.worst)}


def attack_ebnf(url: str, model: str) -> dict:
    grammar = optional_ebnf(1600)
    with Probe(url, model) as probe:
        first = _post(url, {"model": model, "prompt": "x", "max_tokens": 5, "guided_grammar": grammar})
        again = _post(url, {"model": model, "prompt": "x", "max_tokens": 5, "guided_grammar": grammar})
    return {"grammar_chars": len(grammar), "first": first, "again": again[:2], "worst": _rounded(probe.worst)}


def _stream_tok_s(url: str, model: str, tokens: int = 200) -> float:
    start = time.monotonic()
    r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "The list data type", "max_tokens": tokens,
                                                  "ignore_eos": True, "temperature": 0}, timeout=600)
    return round(r.json()["usage"]["completion_tokens"] / (time.monotonic() - start), 1)


def attack_stream(url: str, model: str, rounds: int = 3) -> dict:
    """Alternating: one stream alone, then one while a long compile runs (its own spec each
    round); medians, since the machine may be shared."""
    alone, during = [], []
    for k in range(rounds):
        alone.append(_stream_tok_s(url, model))
        grammar = optional_ebnf(1600, f"s{k}")
        t = threading.Thread(target=_post, args=(url, {"model": model, "prompt": "x", "max_tokens": 5,
                                                       "guided_grammar": grammar}), daemon=True)
        t.start()
        time.sleep(0.5)
        during.append(_stream_tok_s(url, model))
        t.join(600)
    return {"tok_s_alone": alone, "tok_s_during_compile": during,
            "median_alone": statistics.median(alone), "median_during": statistics.median(during)}


def _family_rss(pid: int | None) -> dict:
    """RSS of the server and of its descendants (forkserver, compile processes), in MB."""
    if pid is None:
        return {}
    import psutil

    proc = psutil.Process(pid)
    kids = proc.children(recursive=True)
    return {"server_mb": round(proc.memory_info().rss / 1e6),
            # RSS counts the pages the compile processes share with their forkserver once per
            # process; USS is what each holds alone
            "children_rss_mb": round(sum(k.memory_info().rss for k in kids) / 1e6),
            "children_uss_mb": round(sum(k.memory_full_info().uss for k in kids) / 1e6), "children": len(kids)}


def attack_rss(url: str, model: str, pid: int | None, count: int = 70) -> dict:
    before = _family_rss(pid)
    rows = []
    for i in range(count):
        status, took, _text = _post(url, {"model": model, "prompt": "x", "max_tokens": 3,
                                          "guided_json": pattern_schema(1000 + i)})
        if i % 10 == 9 or i == 0:
            row = {"requests": i + 1, "status": status, "seconds": took, **_family_rss(pid)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    schema_kb = round(len(json.dumps(pattern_schema(1000))) / 1000)
    return {"schema_kb": schema_kb, "before": before, "after": _family_rss(pid), "progress": rows}


def _rounded(d: dict) -> dict:
    return {k: round(v, 3) for k, v in d.items()}


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="an already running server instead of starting one")
    p.add_argument("--only", choices=ATTACKS, action="append", help="run only these (repeatable)")
    p.add_argument("--json", help="write the report here")
    p.add_argument("--count", type=int, default=70, help="distinct big grammars for `rss`")
    args = p.parse_args(argv)
    server = None
    if args.url is None:
        from tests.server.conftest import start_server

        server = start_server(["--max-model-len", "512", "--seed", "0", *server_args], Path("/tmp"))
        url = server.url
    else:
        url = args.url
    report: dict = {}
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        pid = server.proc.pid if server is not None else None
        # one small constrained request first: what follows measures compiles, not start-ups
        print("warm-up", _post(url, {"model": model, "prompt": "x", "max_tokens": 2, "guided_choice": ["a", "b"]}))
        for name in args.only or ATTACKS:
            print(f"-- {name}", flush=True)
            fn = {"optional": attack_optional, "ebnf": attack_ebnf, "stream": attack_stream}.get(name)
            report[name] = fn(url, model) if fn is not None else attack_rss(url, model, pid, args.count)
            print(json.dumps(report[name], indent=2), flush=True)
    finally:
        if server is not None:
            server.stop(timeout=60)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
