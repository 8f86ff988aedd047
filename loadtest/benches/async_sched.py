"""Async scheduling: engine step time with and without --async-scheduling, and the host time it hides.

    python -m loadtest async-scheduling [--models bundled,mixtral-140m] [--concurrency 1,16]
        [--rounds 12] [--steps-per-sample 4]

For each model (the bundled tiny checkpoint, the 140M benchmark checkpoint of
loadtest/checkpoints.py; float32) and concurrency, two engines are built in one process, one
synchronous and one with async scheduling, each holding `concurrency` requests of 32 random prompt
tokens that decode greedily past the measurement. Their decode steps are timed interleaved
(loadtest/harness.py, `--steps-per-sample` steps per sample), so background load hits both alike;
an async sample ends when the last step it launched is computed (`AsyncStepper.wait_device`), so
it holds as many forwards as steps and none of it runs during the other engine's sample.

Reported per engine: the wall time per step (median), the device time per step (the synchronous
engine's `ModelRunner.execute`, the async engine's device thread: forward and sampling), and so
the host time per step (wall - device, synchronous engine). `hidden` is the share of that host
time async scheduling took off the step: (wall sync - wall async) / (wall sync - device sync).
On the CPU the device is the host's own cores (the forward already uses every core), so expect
little; on a GPU the same engine loop is measured by `python -m loadtest gpu --async-scheduling`.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

from loadtest import output, results
from loadtest.harness import interleave

HEADING = "### Async scheduling (CPU)"
PROMPT_LEN = 32


def engine(model: str, concurrency: int, steps: int, async_scheduling: bool):
    """(core, device seconds so far: a callable): `concurrency` requests decoding for `steps` more steps."""
    from server.engine import LLM, SamplingParams
    from server.engine.request import EngineRequest

    llm = LLM(model, dtype="float32", max_num_seqs=max(concurrency, 2), max_model_len=PROMPT_LEN + steps + 32,
              async_scheduling=async_scheduling)
    core = llm.core
    rng = random.Random(0)
    vocab = core.vocab_size
    for i in range(concurrency):
        core.add_request(EngineRequest(f"r{i}", [rng.randrange(3, vocab) for _ in range(PROMPT_LEN)],
                                       SamplingParams(temperature=0.0, max_tokens=steps + 16, ignore_eos=True)))
    for _ in range(3):  # prefill, then the first decodes (and the async pipeline filled)
        core.step()
    if core.async_step is not None:
        stats = core.async_step.stats
        return core, lambda: stats.device
    spent = [0.0]
    execute = core.runner.execute

    def timed(batch):  # the synchronous engine's device part: forward and sampling
        t = time.perf_counter()
        try:
            return execute(batch)
        finally:
            spent[0] += time.perf_counter() - t

    core.runner.execute = timed
    return core, lambda: spent[0]


def measure(model: str, concurrency: int, rounds: int, per_sample: int) -> dict:
    steps = (rounds + 1) * per_sample + 8
    cores = {"sync": engine(model, concurrency, steps, False), "async": engine(model, concurrency, steps, True)}
    device: dict[str, list[float]] = {name: [] for name in cores}

    def run(name: str):
        core, spent = cores[name]
        before = spent()
        for _ in range(per_sample):
            core.step()
        if core.async_step is not None:  # the last step launched computes inside this sample, not the next one's
            core.async_step.wait_device()
        device[name].append((spent() - before) / per_sample)

    t = interleave({name: (lambda n=name: run(n)) for name in cores}, rounds=rounds, warmup=1)
    row: dict = {"concurrency": concurrency}
    for name, s in t.items():
        walls = [w / per_sample for w in s.wall]  # a sample is `per_sample` steps
        row[name] = {"wall_median_s": statistics.median(walls), "device_median_s": statistics.median(device[name][1:]),
                     "samples": s.to_json()}
    for core, _ in cores.values():
        core.close()
    cores.clear()
    gc.collect()  # two engines' weights, packed copies and KV caches: gone before the next pair
    sync, async_ = row["sync"], row["async"]
    host = sync["wall_median_s"] - sync["device_median_s"]
    row["ratio"] = async_["wall_median_s"] / sync["wall_median_s"]
    row["host_s"] = host
    row["hidden"] = (sync["wall_median_s"] - async_["wall_median_s"]) / host if host > 0 else None
    return row


def blocks(args, rows: list[dict]) -> list[dict]:
    col = results.column
    intro = (f"Decode steps of two engines in one process, synchronous and `--async-scheduling`, interleaved, "
             f"{args.rounds} samples of {args.steps_per_sample} steps each (after one warm-up sample); "
             f"prompts of {PROMPT_LEN} tokens, greedy. Device = forward and sampling (the synchronous engine's "
             "`ModelRunner.execute`, the async engine's device thread); host = sync wall - sync device; "
             "hidden = (sync wall - async wall) / host.")
    table = results.table(None, [col("model"), col("concurrency", "d"), col("sync wall ms", ".2f"),
                                 col("sync device ms", ".2f"), col("host ms", ".2f"), col("async wall ms", ".2f"),
                                 col("async device ms", ".2f"), col("async / sync", ".3f"), col("hidden", ".0%")],
                          [[r["model"], r["concurrency"], r["sync"]["wall_median_s"] * 1e3,
                            r["sync"]["device_median_s"] * 1e3, r["host_s"] * 1e3, r["async"]["wall_median_s"] * 1e3,
                            r["async"]["device_median_s"] * 1e3, r["ratio"],
                            r["hidden"] if r["hidden"] is not None else float("nan")] for r in rows])
    return [results.text(intro), table, {"kind": "note"}]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m loadtest async-scheduling", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="bundled,mixtral-140m", help="bundled and/or loadtest checkpoints")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps-per-sample", type=int, default=4)
    output.add_args(ap)
    args = ap.parse_args(argv)
    from loadtest.checkpoints import make_checkpoint
    from server.config import BUNDLED_MODEL

    result = results.new_result("async-scheduling", argv, vars(args), heading=HEADING, section="async-scheduling")
    rows = []
    for name in args.models.split(","):
        path = BUNDLED_MODEL if name == "bundled" else make_checkpoint(name)
        for conc in (int(c) for c in args.concurrency.split(",")):
            row = measure(path, conc, args.rounds, args.steps_per_sample)
            row["model"] = name
            rows.append(row)
            print(f"{name} c={conc}: sync {row['sync']['wall_median_s'] * 1e3:.2f} ms "
                  f"(device {row['sync']['device_median_s'] * 1e3:.2f}), async {row['async']['wall_median_s'] * 1e3:.2f}"
                  f" ms, ratio {row['ratio']:.3f}, hidden {row['hidden']}", flush=True)
    result["measurements"] = {"rows": rows}
    result["summary"]["blocks"] = blocks(args, rows)
    output.finish(result, args)
    return result
