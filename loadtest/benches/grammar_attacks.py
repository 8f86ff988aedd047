"""Issue 25's grammar attacks on a live server: a 1,600-optional-property schema, its EBNF, a stream during a compile, RSS over 70 big grammars.

The attacks of hardening issue 25 (items 1 and 2), each against one server: this checkout's
(`--a-repo`: the bundled model, `--max-model-len 512 --seed 0`, extra server flags after `--`)
or a running one (`--url`, with `--pid` for its RSS), then, with `--b-repo`, the same command in
another checkout (e.g. main before the hardening, 2eb9c1b), with the same attacks or those of
`--b-only`. The servers run one after the other (an attack takes up to minutes, so they are not
interleaved); the attacks, in order:
- `optional`: one request whose `guided_json` has 1,600 optional integer properties (42 KB),
  while a probe thread requests /health, /tokenize and a 4-token completion over and over: the
  request's status and time, and each probe's worst latency;
- `ebnf`: the same compile written as EBNF (xgrammar's own conversion of that schema, 223 KB;
  EBNF has no size limits of ours, so only the compile budget stops it), sent twice, same probes;
- `stream`: tokens/s of one 200-token completion alone, then while the `ebnf` compile of another
  spec runs, `--stream-rounds` rounds alternating (medians; the machine may be shared);
- `rss`: the server's RSS (and its compile processes': RSS, and USS, what each holds alone)
  before, during and after `--count` distinct big grammars: 231 KB `pattern` schemas of 21,000
  alternatives each.

    python -m loadtest grammar-attacks                              # all four on this checkout
    python -m loadtest grammar-attacks --only rss --count 20
    python -m loadtest grammar-attacks --b-repo ../wt-base --b-only optional,rss   # and on main before
    python -m loadtest grammar-attacks -- --grammar-compile-timeout 5            # server A's flags
    python -m loadtest grammar-attacks --url http://127.0.0.1:8000 --pid 1234    # a running server
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
from typing import Any

import httpx

from loadtest import output, results
from loadtest.benches import checkout
from loadtest.harness import Clock

HEADING = "### Grammar attacks (issue 25): a server under big grammars"
ATTACKS = ("optional", "ebnf", "stream", "rss")
SERVER_ARGS = ["--max-model-len", "512", "--seed", "0"]
PROBES = ("health", "tokenize", "completion")


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
    """A thread requesting /health, /tokenize and a 4-token completion in turn until the block ends,
    in whole rounds and at least one (so a request that ends before the first probe still gets one
    round, right after it); `worst[name]`: the longest of each (seconds)."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.worst = dict.fromkeys(PROBES, 0.0)
        self.errors = self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=600, trust_env=False) as c:
            calls = {"health": lambda: c.get("/health"),
                     "tokenize": lambda: c.post("/tokenize", json={"prompt": "The list data type"}),
                     "completion": lambda: c.post("/v1/completions", json={
                         "model": self.model, "prompt": "The os module", "max_tokens": 4})}
            while True:
                for name in PROBES:
                    with Clock(cpu=False) as clock:
                        try:
                            calls[name]()
                        except httpx.HTTPError:
                            self.errors += 1
                    self.worst[name] = max(self.worst[name], clock.wall)
                self.rounds += 1
                if self._stop.wait(0.05):
                    break

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(600)

    def report(self) -> dict[str, Any]:
        return {**{f"{k}_worst_s": round(v, 3) for k, v in self.worst.items()}, "probe_rounds": self.rounds,
                "probe_errors": self.errors}


def post(url: str, body: dict, timeout: float = 600) -> dict[str, Any]:
    """One completion: its status (0: no answer in time), seconds and the answer's start."""
    with Clock(cpu=False) as clock:
        try:
            r = httpx.post(url + "/v1/completions", json=body, timeout=timeout, trust_env=False)
            status, text = r.status_code, r.text[:200]
        except httpx.TimeoutException:
            status, text = 0, f"no answer within {timeout:g} s"
    return {"status": status, "seconds": round(clock.wall, 3), "answer": text}


def attack_optional(url: str, model: str) -> dict:
    schema = optional_schema(1600)
    with Probe(url, model) as probe:
        r = post(url, {"model": model, "prompt": "x", "max_tokens": 5, "guided_json": schema})
    return {"schema_kb": round(len(json.dumps(schema)) / 1000), **r, **probe.report()}


def attack_ebnf(url: str, model: str) -> dict:
    grammar = optional_ebnf(1600)
    body = {"model": model, "prompt": "x", "max_tokens": 5, "guided_grammar": grammar}
    out: dict[str, Any] = {"grammar_kb": round(len(grammar) / 1000)}
    for key in ("first", "again"):
        with Probe(url, model) as probe:
            r = post(url, body)
        out[key] = {**r, **probe.report()}
    return out


def stream_tok_s(url: str, model: str, tokens: int = 200) -> float:
    with Clock(cpu=False) as clock:
        r = httpx.post(url + "/v1/completions", timeout=600, trust_env=False, json={
            "model": model, "prompt": "The list data type", "max_tokens": tokens, "ignore_eos": True,
            "temperature": 0})
    return round(r.json()["usage"]["completion_tokens"] / clock.wall, 1)


def attack_stream(url: str, model: str, rounds: int = 3) -> dict:
    """Alternating: one stream alone, then one while a long compile runs (its own spec each round)."""
    alone, during = [], []
    for k in range(rounds):
        alone.append(stream_tok_s(url, model))
        body = {"model": model, "prompt": "x", "max_tokens": 5, "guided_grammar": optional_ebnf(1600, f"s{k}")}
        t = threading.Thread(target=post, args=(url, body), daemon=True)
        t.start()
        time.sleep(0.5)
        during.append(stream_tok_s(url, model))
        t.join(600)
    return {"tok_s_alone": alone, "tok_s_during_compile": during,
            "median_alone": statistics.median(alone), "median_during": statistics.median(during)}


def family_rss(pid: int | None) -> dict:
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
    before = family_rss(pid)
    requests, progress = [], []
    for i in range(count):
        r = post(url, {"model": model, "prompt": "x", "max_tokens": 3, "guided_json": pattern_schema(1000 + i)})
        requests.append({"status": r["status"], "seconds": r["seconds"]})
        if i % 10 == 9 or i == 0:
            row = {"requests": i + 1, **requests[-1], **family_rss(pid)}
            progress.append(row)
            print(f"[bench] rss: {json.dumps(row)}", flush=True)
    return {"schema_kb": round(len(json.dumps(pattern_schema(1000))) / 1000), "count": count, "before": before,
            "after": family_rss(pid), "progress": progress, "requests": requests,
            "median_seconds": statistics.median(r["seconds"] for r in requests)}


def run_side(url: str, pid: int | None, attacks: list[str], args: argparse.Namespace) -> dict[str, Any]:
    model = checkout.served_model(url)
    # one small constrained request first: what follows measures compiles, not start-ups
    warm = post(url, {"model": model, "prompt": "x", "max_tokens": 2, "guided_choice": ["a", "b"]})
    print(f"[bench] warm-up: {warm['status']} in {warm['seconds']} s", flush=True)
    out: dict[str, Any] = {"model": model, "pid": pid}
    for name in attacks:
        print(f"[bench] -- {name}", flush=True)
        if name == "optional":
            out[name] = attack_optional(url, model)
        elif name == "ebnf":
            out[name] = attack_ebnf(url, model)
        elif name == "stream":
            out[name] = attack_stream(url, model, args.stream_rounds)
        else:
            out[name] = attack_rss(url, model, pid, args.count)
        print(json.dumps({k: v for k, v in out[name].items() if k not in ("requests", "progress")}), flush=True)
    return out


# -- the docs block ---------------------------------------------------------------------------
def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1e3


def _request_row(label: str, what: str, r: dict) -> list:
    return [label, what, r["status"], r["seconds"], r.get("probe_rounds"), _ms(r.get("health_worst_s")),
            _ms(r.get("tokenize_worst_s")), _ms(r.get("completion_worst_s"))]


def blocks(report: dict) -> list[dict]:
    col, sides = results.column, report["sides"]
    out = [results.text(
        f"Model `{sides[0]['attacks']['model']}`, servers started with `{' '.join(SERVER_ARGS)}` (and the flags in "
        "the command), one after the other: " + ", ".join(
            f"{checkout.describe(s)}: {', '.join(a for a in ATTACKS if a in s['attacks'])}" for s in sides)
        + ". During the `guided_json` and EBNF requests a probe thread requests /health, /tokenize and a 4-token "
        "completion in turn, over and over (one round at least, finished after a request that ended first); "
        "status 0 is no answer within 600 s.")]
    rows = []
    for s in sides:
        a = s["attacks"]
        if "optional" in a:
            rows.append(_request_row(s["label"], f"`guided_json`, 1,600 optional integer properties "
                                                 f"({a['optional']['schema_kb']} KB)", a["optional"]))
        if "ebnf" in a:
            rows.append(_request_row(s["label"], f"the same as EBNF (`guided_grammar`, {a['ebnf']['grammar_kb']} KB)",
                                     a["ebnf"]["first"]))
            rows.append(_request_row(s["label"], "the same EBNF again", a["ebnf"]["again"]))
    if rows:
        out.append(results.table("Requests during each attack, and the probes' worst latencies:", [
            col("server"), col("request"), col("status", "d"), col("seconds", ".2f"), col("probe rounds", ",d"),
            col("/health worst (ms)", ",.0f"),
            col("/tokenize worst (ms)", ",.0f"), col("completion worst (ms)", ",.0f")], rows))
    rows = [[s["label"], s["attacks"]["stream"]["median_alone"], s["attacks"]["stream"]["median_during"],
             s["attacks"]["stream"]["median_during"] / s["attacks"]["stream"]["median_alone"],
             len(s["attacks"]["stream"]["tok_s_alone"])] for s in sides if "stream" in s["attacks"]]
    if rows:
        out.append(results.table("One 200-token completion, alone and while an EBNF compile (the attack's, a new "
                                 "spec each round) runs; medians of the rounds:", [
                                     col("server"), col("tok/s alone", ".1f"), col("tok/s during a compile", ".1f"),
                                     col("during / alone", ".2f"), col("rounds", "d")], rows))
    rss = [(s["label"], s["attacks"]["rss"]) for s in sides if "rss" in s["attacks"]]
    if rss:
        rows = []
        for label, r in rss:
            before, after = r["before"].get("server_mb"), r["after"].get("server_mb")
            per = None if before is None or after is None else (after - before) / r["count"]
            statuses = ", ".join(f"{n}x {k}" for k, n in sorted(_count(x["status"] for x in r["requests"]).items()))
            rows.append([label, r["count"], r["schema_kb"], statuses, r["median_seconds"], before, after, per,
                         r["after"].get("children_rss_mb"), r["after"].get("children_uss_mb")])
        out.append(results.table(f"RSS over {rss[0][1]['count']} distinct `pattern` schemas of 21,000 alternatives:", [
            col("server"), col("requests", "d"), col("schema (KB)", "d"), col("statuses"),
            col("seconds per request (median)", ".2f"), col("server RSS before (MB)", ",d"),
            col("after (MB)", ",d"), col("growth per request (MB)", ".1f"), col("compile processes' RSS (MB)", ",d"),
            col("their USS (MB)", ",d")], rows))
        steps = [p["requests"] for p in rss[0][1]["progress"]]
        rows = [[label] + [next((p.get("server_mb") for p in r["progress"] if p["requests"] == k), None) for k in steps]
                for label, r in rss]
        out.append(results.table("Server RSS (MB) after so many of those requests:",
                                 [col("server")] + [col(str(k), ",d") for k in steps], rows))
    out.append({"kind": "note"})
    return out


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def _attacks(text: str) -> list[str]:
    names = [x for x in text.split(",") if x]
    bad = [x for x in names if x not in ATTACKS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown attack(s) {bad}: choose from {', '.join(ATTACKS)}")
    return names


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, server_args = checkout.split_argv(argv)
    p = argparse.ArgumentParser(prog="python -m loadtest grammar-attacks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", type=_attacks, action="extend", help=f"run only these: {','.join(ATTACKS)} "
                   "(comma-separated or repeated)")
    p.add_argument("--count", type=int, default=70, help="distinct big grammars for `rss`")
    p.add_argument("--stream-rounds", type=int, default=3, help="rounds of `stream`")
    srv = checkout.add_server_args(p, "for `rss`")
    srv.add_argument("--b-only", type=_attacks, action="extend", help="--b-repo: B's attacks (default: A's)")
    output.add_args(p)
    args = p.parse_args(own)
    args.server_args = server_args
    result = results.new_result("grammar-attacks", argv, vars(args), heading=HEADING,
                                packages=("xgrammar", "httpx", "psutil"))
    stem = Path(args.json).with_suffix("") if args.json else results.default_path(result).with_suffix("")
    plan = checkout.plan_sides(args, p, SERVER_ARGS, server_args)
    attacks = [args.only or list(ATTACKS), args.b_only or args.only or list(ATTACKS)]

    def measure(i: int, url: str, pid: int | None) -> dict[str, Any]:
        print(f"\n=== {plan[i][0]}: {', '.join(attacks[i])}", flush=True)
        return {"attacks": run_side(url, pid, attacks[i], args)}

    report: dict[str, Any] = {"server_args": SERVER_ARGS, "sides": checkout.run_sides(plan, args, stem, measure)}
    result["measurements"] = report
    result["summary"]["blocks"] = blocks(report)
    output.finish(result, args)
    return result
