"""Placement report: simulator tables on a routing trace recorded from the bundled model on real
prompts, and on a synthetic Zipf-skewed trace, for 2, 4 and 8 devices.

    python loadtest/placement_report.py [--out-dir loadtest/results/placement]

1. Records a routing trace (`--record-routing`) while the bundled tiny-mixtral generates 32
   tokens for 48 real prompts (the first 200 characters of Python's `pydoc_data` topics).
2. Writes a synthetic trace with the same shape (4 MoE layers, 8 experts, top-2), expert
   popularity Zipf(1.2).
3. Replays both through loadtest/placement_sim.py on 2, 4 and 8 virtual devices: contiguous vs
   round_robin vs balanced with 0 and with R = K replicas (balancedness = mean / max device load).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def record_bundled_trace(path: Path) -> None:
    import pydoc_data.topics

    from server.engine import LLM, SamplingParams

    topics = sorted(pydoc_data.topics.topics)[:48]
    prompts = [pydoc_data.topics.topics[t][:200] for t in topics]
    llm = LLM(dtype="float32", record_routing=str(path), max_num_seqs=16)
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=str(HERE / "results" / "placement"))
    args = ap.parse_args()
    import placement_sim

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bundled = out / "bundled-trace.jsonl"
    synthetic = out / "zipf-trace.jsonl"
    record_bundled_trace(bundled)
    with contextlib.redirect_stdout(io.StringIO()):
        placement_sim.main(["--synthetic", "zipf:1.2", "--layers", "4", "--experts", "8", "--top-k", "2",
                            "--steps", "200", "--tokens", "256", "--save-trace", str(synthetic),
                            "--no-progress"])
    for name, trace in (("bundled tiny-mixtral, real prompts", bundled), ("synthetic Zipf(1.2)", synthetic)):
        for k in (2, 4, 8):
            print(f"\n### {name}, {k} devices\n")
            placement_sim.main(["--trace", str(trace), "--devices", str(k), "--redundant", str(k),
                                "--no-progress"])


if __name__ == "__main__":
    main()
