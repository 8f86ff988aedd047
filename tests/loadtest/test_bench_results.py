"""The result shape of the benchmarks ported onto the harness: schema-compile runs for real in its
--tiny mode (seconds); grammar-attacks and big-answer need a server for minutes, so their docs
blocks are built from a measurements dict of the shape they record."""

from __future__ import annotations

import argparse
import copy

import pytest

from loadtest import docs, results
from loadtest.benches import big_answer, grammar_attacks, schema_compile


def _side(label: str, commit: str | None, **extra) -> dict:
    return {"label": label, "url": "http://127.0.0.1:1", "server_args": [], "repo": "/x" if commit else None,
            "git": {"commit": commit} if commit else None, **extra}


def _request(status: int, seconds: float) -> dict:
    return {"status": status, "seconds": seconds, "answer": "{}", "health_worst_s": 0.005, "tokenize_worst_s": 0.01,
            "completion_worst_s": 0.03, "probe_rounds": 3,
            "probe_errors": 0}


def _rendered(name: str, heading: str, measurements: dict, blocks: list) -> str:
    r = results.new_result(name, [], {}, heading=heading)
    r["measurements"], r["summary"]["blocks"] = measurements, blocks
    assert results.validate(r) == []
    return docs.render_block(r, note="A note.")


def test_schema_compile_tiny_writes_a_result(tmp_path, capsys) -> None:
    out = tmp_path / "sc.json"
    r = schema_compile.main(["--tiny", "--json", str(out)])
    loaded = results.load(out)
    assert loaded["benchmark"] == "schema-compile" and loaded["doc"]["heading"] == schema_compile.HEADING
    rows = loaded["measurements"]["vocabularies"]["bundled"]["rows"]
    assert [x["measure"] for x in rows] == [f[0] for f in schema_compile.FAMILIES]
    assert all(not x["skipped"] and x["compile_s"] >= 0 and x["compile_cpu_s"] >= 0 for x in rows)
    assert set(loaded["measurements"]["transfer"]) >= {"compile_s", "serialize_s", "deserialize_s", "compiled_mb"}
    assert [b["kind"] for b in r["summary"]["blocks"]] == ["text", "table", "table", "note"]
    assert "| optional properties (one object) | 50 |" in capsys.readouterr().out


def test_schema_compile_skipped_sizes_render() -> None:
    row = {"measure": "m", "size": 1, "skipped": False, "convert_s": 0.1, "compile_s": 0.2, "compile_cpu_s": 0.2}
    report = {"max_seconds": 20.0, "transfer_vocabulary": "bundled",
              "vocabularies": {"bundled": {"tokens": 4096, "rows": [row, {**row, "size": 2}]},
                               "128k": {"tokens": 128000, "rows": [row, {"measure": "m", "size": 2, "skipped": True}]}},
              "transfer": {"alternatives": 21000, "schema_kb": 231, "compiled_mb": 48.4, "compile_s": 1.9,
                           "serialize_s": 2.7, "serialized_mb": 40.8, "deserialize_s": 1.2}}
    text = _rendered("schema-compile", schema_compile.HEADING, report, schema_compile.blocks(report))
    assert "| m | 2 | 0.100 | 0.200 | 0.200 | - | skipped | - |" in text
    assert "| `pattern`, 21,000 alternatives (231 KB) | 48.4 | 1.90 | 2.70 | 40.8 | 1.20 |" in text


def test_grammar_attacks_blocks_both_sides() -> None:
    now = {"model": "tiny", "pid": 1,
           "optional": {"schema_kb": 47, **_request(400, 0.06)},
           "ebnf": {"grammar_kb": 223, "first": _request(400, 13.9), "again": _request(400, 0.03)},
           "stream": {"tok_s_alone": [190.0, 188.0], "tok_s_during_compile": [130.0, 140.0], "median_alone": 189.0,
                      "median_during": 135.0},
           "rss": {"schema_kb": 231, "count": 20, "before": {"server_mb": 1000}, "after": {
               "server_mb": 1200, "children_rss_mb": 500, "children_uss_mb": 100},
               "progress": [{"requests": 1, "server_mb": 1050}, {"requests": 10, "server_mb": 1150},
                            {"requests": 20, "server_mb": 1200}],
               "requests": [{"status": 200, "seconds": 4.0}] * 19 + [{"status": 400, "seconds": 0.1}],
               "median_seconds": 4.0}}
    before = {"model": "tiny", "pid": 2, "optional": {"schema_kb": 47, **_request(200, 50.5)},
              "rss": {**copy.deepcopy(now["rss"]), "before": {}, "after": {}, "progress": [{"requests": 1}]}}
    report = {"server_args": grammar_attacks.SERVER_ARGS,
              "sides": [_side("abc1234", "abc1234", attacks=now), _side("old", "2eb9c1b", attacks=before)]}
    text = _rendered("grammar-attacks", grammar_attacks.HEADING, report, grammar_attacks.blocks(report))
    assert "**abc1234**: optional, ebnf, stream, rss" in text and "**old** (git 2eb9c1b): optional, rss" in text
    assert "| old | `guided_json`, 1,600 optional integer properties (47 KB) | 200 | 50.50 | 3 | 5 | 10 | 30 |" in text
    assert "| abc1234 | the same EBNF again | 400 | 0.03 |" in text
    assert "| abc1234 | 189.0 | 135.0 | 0.71 | 2 |" in text
    assert "| abc1234 | 20 | 231 | 19x 200, 1x 400 | 4.00 | 1,000 | 1,200 | 10.0 | 500 | 100 |" in text
    assert "| server | 1 | 10 | 20 |" in text and "| old | - | - | - |" in text  # no pid: no RSS
    assert text.rstrip().endswith(docs.END.format("grammar-attacks")) and "A note." in text


def test_grammar_attacks_parses_attack_lists() -> None:
    assert grammar_attacks._attacks("optional,rss") == ["optional", "rss"]
    with pytest.raises(argparse.ArgumentTypeError, match="nope"):
        grammar_attacks._attacks("optional,nope")


def test_big_answer_blocks() -> None:
    row = {"prompt_tokens": 1351, "n": 64, "max_tokens": 64, "stream": False, "status": 400, "bytes": 300,
           "seconds": 0.05, "health_worst_s": 0.004, "rss_before_mb": 1000, "rss_peak_growth_mb": 0,
           "rss_after_growth_mb": 0}
    old = {**row, "status": 200, "bytes": 126_000_000, "seconds": 40.0, "health_worst_s": 18.0,
           "rss_peak_growth_mb": 900, "rss_after_growth_mb": 300}
    report = {"server_args": big_answer.SERVER_ARGS,
              "sides": [_side("running server", None, probes=[row]), _side("2eb9c1b", "2eb9c1b", probes=[old])]}
    text = _rendered("big-answer", big_answer.HEADING, report, big_answer.blocks(report))
    assert "**running server** (a running server), **2eb9c1b**." in text
    assert "| running server | 64 | no | 400 | 0.0 | 0.05 | 0.004 | 0 | 0 |" in text
    assert "| 2eb9c1b | 64 | no | 200 | 126.0 | 40.00 | 18.000 | 900 | 300 |" in text


def test_big_answer_modes() -> None:
    assert big_answer._modes("whole,stream") == ["whole", "stream"]
    with pytest.raises(argparse.ArgumentTypeError):
        big_answer._modes("sideways")
