"""Placement report: the simulator on a routing trace of the bundled model and on a Zipf trace, 2, 4 and 8 devices.

    python -m loadtest placement-report [--out-dir loadtest/results/placement]

1. Records a routing trace (`--record-routing`) while the bundled tiny-mixtral generates 32
   tokens for 48 real prompts (the first 200 characters of Python's `pydoc_data` topics).
2. Writes a synthetic trace with the same shape (4 MoE layers, 8 experts, top-2), expert
   popularity Zipf(1.2).
3. Replays both through the placement simulator (loadtest/benches/placement_sim.py) on 2, 4 and 8
   virtual devices: contiguous vs round_robin vs balanced with 0 and with R = K replicas
   (balancedness = mean / max device load).
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path

from loadtest import output, results
from loadtest.benches import placement_sim

HEADING = "## Placement report"


def record_bundled_trace(path: Path) -> None:
    import pydoc_data.topics

    from server.engine import LLM, SamplingParams

    topics = sorted(pydoc_data.topics.topics)[:48]
    prompts = [pydoc_data.topics.topics[t][:200] for t in topics]
    llm = LLM(dtype="float32", record_routing=str(path), max_num_seqs=16)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest placement-report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(results.RESULTS / "placement"))
    output.add_args(ap)
    args = ap.parse_args(argv)
    result = results.new_result("placement-report", argv, vars(args), heading=HEADING)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundled = out / "bundled-trace.jsonl"
    synthetic = out / "zipf-trace.jsonl"
    record_bundled_trace(bundled)
    with contextlib.redirect_stdout(io.StringIO()):
        placement_sim.simulate(["--synthetic", "zipf:1.2", "--layers", "4", "--experts", "8", "--top-k", "2",
                            "--steps", "200", "--tokens", "256", "--save-trace", str(synthetic),
                            "--no-progress"])
    tables = []
    for name, trace in (("bundled tiny-mixtral, real prompts", bundled), ("synthetic Zipf(1.2)", synthetic)):
        for k in (2, 4, 8):
            print(f"\n### {name}, {k} devices\n")
            caption, rows = placement_sim.simulate(["--trace", str(trace), "--devices", str(k), "--redundant", str(k),
                                                    "--no-progress"])
            tables.append({"trace": name, "devices": k, "caption": caption,
                           "results": [vars(r) for r in rows]})
            result["summary"]["blocks"] += [results.text(f"**{name}, {k} devices**: {caption}"),
                                            results.text(placement_sim.table(rows, 0))]
    result["measurements"] = {"tables": tables}
    output.finish(result, args)
    return result
