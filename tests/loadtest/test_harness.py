"""The benchmark harness: the timer's interleaving and statistics, the JSON result schema, the
docs renderer (round trip), and the `python -m loadtest` dispatcher. All fast: no model runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from loadtest import docs, harness, output, results
from loadtest.__main__ import first_line
from loadtest.benches import BENCHES
from tests.conftest import REPO


def test_order_alternates_a_b_then_b_a() -> None:
    assert harness.order(["A", "B"], 0) == ["A", "B"]
    assert harness.order(["A", "B"], 1) == ["B", "A"]
    assert harness.order(["A", "B", "C"], 2) == ["A", "B", "C"]
    assert harness.order(["A", "B", "C"], 3) == ["C", "B", "A"]


def test_interleave_calls_in_round_order_after_warmup() -> None:
    calls: list[str] = []
    setups: list[str] = []
    t = harness.interleave({"A": lambda: calls.append("A"), "B": lambda: calls.append("B")}, rounds=4, warmup=1,
                           setup=setups.append)
    assert calls == ["A", "B"] + ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert setups == calls  # setup runs before every call, warm-up included
    assert [t[k].summary()["n"] for k in "AB"] == [4, 4]


def test_interleave_number_and_min_time() -> None:
    count = {"n": 0}

    def work() -> None:
        count["n"] += 1

    t = harness.interleave({"w": work}, rounds=3, warmup=2, number=5)
    assert count["n"] == (2 + 3) * 5 and len(t["w"].wall) == 3
    slow = harness.interleave({"s": lambda: time.sleep(0.01)}, rounds=1, warmup=0, min_time=0.05)["s"]
    assert len(slow.wall) >= 4 and sum(slow.wall) >= 0.05
    capped = harness.interleave({"s": lambda: time.sleep(0.01)}, rounds=1, warmup=0, min_time=10, max_rounds=2)
    assert len(capped["s"].wall) == 2
    with pytest.raises(ValueError):
        harness.interleave({}, rounds=1)


def test_samples_summary_median_best_and_cpu() -> None:
    def burn() -> None:  # 10 ms of this process's CPU time, however long that takes on a busy machine
        end = time.process_time() + 0.01
        while time.process_time() < end:
            pass

    s = harness.interleave({"sleep": lambda: time.sleep(0.02), "burn": burn}, rounds=3, warmup=0)
    sleep, burn_s = s["sleep"].summary(), s["burn"].summary()
    assert sleep["wall_best_s"] >= 0.019 and sleep["wall_best_s"] <= sleep["wall_median_s"]
    assert sleep["cpu_median_s"] < 0.005 and burn_s["cpu_median_s"] >= 0.01  # sleeping takes no CPU, burning does
    assert burn_s["wall_median_s"] >= burn_s["cpu_median_s"] * 0.9
    assert sleep["gpu_median_s"] is None
    manual = harness.Samples(wall=[3.0, 1.0, 2.0], cpu=[1.0, 1.0, 1.0])
    assert manual.summary()["wall_median_s"] == 2.0 and manual.summary()["wall_best_s"] == 1.0


def _result(section: str = "synthetic") -> dict:
    r = results.new_result("synthetic", ["--size", "3"], {"size": 3, "json": "x.json"}, heading="## Synthetic",
                           section=section, packages=("numpy",))
    r["measurements"] = {"samples": harness.Samples(wall=[0.001, 0.002], cpu=[0.001, 0.001]).to_json()}
    r["summary"]["blocks"] = [
        results.text("What was measured."),
        results.table("Times:", [results.column("size", "d"), results.column("ms", ".3f"), results.column("ratio")],
                      [[1, 0.5, "1.00x"], [3, None, "-"]]),
        {"kind": "note"},
    ]
    return r


def test_result_schema(tmp_path) -> None:
    r = _result()
    assert results.validate(r) == []
    assert r["command"] == "python -m loadtest synthetic --size 3"
    assert "json" not in r["params"] and r["params"]["size"] == 3
    assert {"commit", "branch", "dirty"} <= set(r["git"]) and r["git"]["commit"]
    assert {"cores", "cpu_model", "cpu_flags", "mem_gib", "physical_cores", "loadavg_start"} <= set(r["machine"])
    assert {"python", "torch", "transformers", "numpy"} <= set(r["versions"])
    path = results.write(r, tmp_path / "r.json")
    again = results.load(path)
    assert again["path"] == str(path) and again["summary"] == r["summary"]
    assert results.default_path(r).name == f"synthetic-{r['stamp']}.json"
    bad = json.loads(path.read_text())
    bad["summary"]["blocks"][1]["rows"].append([1])
    del bad["machine"]
    assert results.validate(bad) == ["missing 'machine'"]
    bad["machine"] = {}
    assert results.validate(bad) == ["block 1: a row of 1 cells for 3 columns"]
    with pytest.raises(ValueError):
        results.table("t", [results.column("a")], [[1, 2]])


def test_docs_round_trip(tmp_path) -> None:
    doc = tmp_path / "benchmarks.md"
    before = "# Benchmarks\n\nIntro.\n\n## Synthetic\n\nHand-written history, 12.5 ms.\n\n## Later\n\nMore text.\n"
    doc.write_text(before)
    r = _result()
    block = docs.write_doc(r, doc, note="A note.")
    first = doc.read_text()
    assert block in first and first.count(docs.BEGIN.format("synthetic")) == 1
    assert "| 1 | 0.500 | 1.00x |" in block and "| 3 | - | - |" in block and "|---:|---:|---|" in block
    assert "A note." in block and "- Command: `python -m loadtest synthetic --size 3`" in block
    # untouched outside the markers: the text before the block and after it, in order
    start, end = first.index(docs.BEGIN.format("synthetic")), first.index(docs.END.format("synthetic"))
    outside = first[:start] + first[end + len(docs.END.format("synthetic")):]
    assert outside.replace("\n", "") == before.replace("\n", "")
    assert first.index("## Synthetic") < start < first.index("Hand-written history") < first.index("## Later")
    docs.write_doc(r, doc, note="A note.")
    assert doc.read_text() == first  # re-render: identical
    r2 = json.loads(json.dumps(r))
    r2["summary"]["blocks"][1]["rows"][0][1] = 0.75
    docs.write_doc(r2, doc, note="A note.")
    changed = doc.read_text()
    assert "| 1 | 0.750 | 1.00x |" in changed and "0.500" not in changed
    assert changed.replace("0.750", "0.500") == first
    other = _result("other")  # no heading of its own in the file: appended with it, the rest unchanged
    other["doc"]["heading"] = "## Other"
    docs.write_doc(other, doc)
    assert doc.read_text().startswith(changed.rstrip("\n")) and "## Other\n\n" + docs.BEGIN.format("other") in \
        doc.read_text()


def test_docs_command_and_finish(tmp_path, capsys) -> None:
    r = _result()
    path = results.write(r, tmp_path / "r.json")
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Synthetic\n\nold\n")
    assert docs.main([str(path), "--doc", str(doc), "--note", "Saved note."]) == 0
    assert results.load(path)["note"] == "Saved note."  # kept in the result for the next render
    text = doc.read_text()
    assert docs.main([str(path), "--doc", str(doc)]) == 0 and doc.read_text() == text
    args = type("A", (), {"json": str(tmp_path / "f.json"), "doc": True, "note": None})()
    doc2 = tmp_path / "b2.md"
    output.finish(_result(), args, doc=doc2)
    assert (tmp_path / "f.json").exists() and docs.BEGIN.format("synthetic") in doc2.read_text()
    assert "wrote" in capsys.readouterr().out


def test_dispatcher_lists_every_benchmark() -> None:
    out = subprocess.run([sys.executable, "-m", "loadtest", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for name, module in BENCHES.items():
        line = first_line(module)
        assert line and f"  {name} " in out.stdout and line in out.stdout
    assert "docs" in out.stdout and "loadgen" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "loadtest", "nope"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "unknown benchmark 'nope'" in bad.stderr


def test_no_sys_path_edits_in_loadtest() -> None:
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "loadtest").rglob("*.py") if "sys.path" in p.read_text()]
    assert offenders == []
