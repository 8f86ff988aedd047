"""CPU decode step of the engine: kernel variants interleaved step by step, or two checkouts' default plans.

    python -m loadtest decode-step [--batch 64] [--rounds 8]
        [--variants "auto/auto/1,cpu/onednn/1/loop,reference/auto/1"] [--profile]
    python -m loadtest decode-step --variants default           # the default plan, default threads
    python -m loadtest decode-step --b-repo /work/wt-base [--a-repo DIR] [--runs 4] [--rounds 8]
    python -m loadtest decode-step ... --expert-devices cpu:0,cpu:1 [--gpu-expert-budget 2]   # placed experts

The engine (the 140M benchmark checkpoint, loadtest/checkpoints.py, float32) prefills `--batch`
requests of 128 random tokens, then runs decode steps. `--expert-devices` / `--gpu-expert-budget`
place the experts as the server's flags do (virtual devices `cpu:N`; experts beyond the budget
in the CPU tier), in every variant and checkout.

Variants: attention / CPU linear layout / threads [/ MoE] (`KernelFlags.attention`,
`.cpu_linear`, torch threads, `.moe`: the choices of --attention-backend, --cpu-linear-layout
and --moe-backend, e.g. "cpu/onednn/1/loop"; "default" is every choice "auto" on the engine's
default threads). They run in one process, the plan switched (`model.plan_kernels`) before each
step, interleaved round by round (loadtest/harness.py), so that background load on a shared
machine hits them alike. Reported: each variant's median and best wall and process-CPU time per
step. `--profile` also prints the PyTorch ops of the first variant's steps (`torch.profiler`;
the C kernels appear by name, `moe_serve::*`).

Two checkouts (`--b-repo`, e.g. main before and after a change): each run is a fresh process
started in one checkout, with that checkout's models/ and server/ first on the path, measuring
--rounds decode steps of its default plan; runs alternate A-B, B-A for --runs rounds. Reported:
each checkout's median and best step over all its runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

from loadtest import output, results
from loadtest.harness import Clock, Samples, interleave, order

REPO = Path(__file__).resolve().parents[2]
HEADING = "### Decode step (CPU)"
PROMPT_LEN = 128


def parse_variant(spec: str):
    """(name, KernelFlags, threads or None) from "attention/linear/threads[/moe]" or "default"."""
    from models.kernels.flags import KernelFlags

    if spec == "default":
        return spec, KernelFlags(), None
    attn, linear, threads, *moe = spec.split("/")
    return spec, KernelFlags(attention=attn, cpu_linear=linear, moe=moe[0] if moe else "auto"), int(threads)


def placement_kwargs(args) -> dict:
    kw: dict = {}
    if args.expert_devices:
        kw["expert_devices"] = tuple(args.expert_devices.split(","))
    if args.gpu_expert_budget:
        kw["gpu_expert_budget"] = args.gpu_expert_budget
    return kw


def engine(model: str, batch: int, steps: int, **placement):
    """An EngineCore with `batch` requests prefilled and room for `steps` more decode steps. Uses
    only what both an older and a newer checkout offer (offline LLM, core.add_request, step)."""
    from server.engine import LLM, SamplingParams
    from server.engine.request import EngineRequest

    llm = LLM(model, dtype="float32", max_num_seqs=batch, max_num_batched_tokens=2048,
              max_model_len=PROMPT_LEN + 16 + 2 * steps, **placement)
    core = llm.core
    rng = random.Random(0)
    for i in range(batch):
        core.add_request(EngineRequest(f"r{i}", [rng.randrange(3, 30000) for _ in range(PROMPT_LEN)],
                                       SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)))
    while core.scheduler.waiting or any(s.num_computed < s.num_prompt_tokens for s in core.scheduler.running):
        core.step()
    return core


def run_variants(args, model: str) -> tuple[dict, list[dict]]:
    import torch

    variants = [parse_variant(v) for v in args.variants.split(",")]
    core = engine(model, args.batch, (args.rounds + 1) * len(variants) + 4, **placement_kwargs(args))
    default_threads = torch.get_num_threads()
    spec = {name: (flags, threads or default_threads) for name, flags, threads in variants}
    plans = {}

    def setup(name: str) -> None:
        flags, threads = spec[name]
        plans.setdefault(name, core.model.plan_kernels(flags).to_dict())
        torch.set_num_threads(threads)

    t = interleave({name: core.step for name in spec}, rounds=args.rounds, warmup=1, setup=setup)
    rows = []
    for name, s in t.items():
        sm = s.summary()
        rows.append({"variant": name, "threads": spec[name][1], "kernel_plan": plans[name], "samples": s.to_json(),
                     "summary": sm})
    if args.profile:
        profile(core, *spec[variants[0][0]])
    return {"default_threads": default_threads}, rows


def profile(core, flags, threads) -> None:
    import torch

    core.model.plan_kernels(flags)
    torch.set_num_threads(threads)
    with torch.profiler.profile() as prof:
        for _ in range(4):
            core.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def child(args) -> None:
    """One run of --b-repo mode: the default plan's decode steps, as JSON on the last line."""
    import torch

    core = engine(args.model, args.batch, args.rounds + 4, **placement_kwargs(args))
    core.step()  # warm-up: packs weights, builds the C kernels
    s = Samples()
    for _ in range(args.rounds):
        with Clock() as c:
            core.step()
        s.add(c)
    plan = getattr(core.model, "kernel_plan", None)
    print(json.dumps({"threads": torch.get_num_threads(), "samples": s.to_json(),
                      "kernel_plan": plan.table() if plan is not None else None}))


def run_checkouts(args, model: str) -> tuple[dict, list[dict]]:
    checkouts = {args.a_label: Path(args.a_repo).resolve(), args.b_label: Path(args.b_repo).resolve()}
    runs: dict[str, list[dict]] = {label: [] for label in checkouts}
    for r in range(args.runs):
        for label in order(list(checkouts), r):
            repo = checkouts[label]
            # that checkout's models/ and server/ first; this loadtest package after them (an older
            # checkout's loadtest/ has no __init__.py, and a regular package wins over it); no
            # bytecode written into the other checkout
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(REPO)]), "PYTHONDONTWRITEBYTECODE": "1"}
            cmd = [sys.executable, "-m", "loadtest", "decode-step", "--child", "--model", model,
                   "--batch", str(args.batch), "--rounds", str(args.rounds)]
            cmd += ["--expert-devices", args.expert_devices] if args.expert_devices else []
            cmd += ["--gpu-expert-budget", args.gpu_expert_budget] if args.gpu_expert_budget else []
            proc = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{label} ({repo}): the run failed (exit {proc.returncode})")
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            got["git"] = results.git_info(repo)
            runs[label].append(got)
            w = sorted(got["samples"]["wall_s"])
            print(f"run {r + 1} {label}: median step {w[len(w) // 2] * 1e3:.1f} ms", flush=True)
    rows = []
    for label, rs in runs.items():
        s = Samples(wall=[x for g in rs for x in g["samples"]["wall_s"]],
                    cpu=[x for g in rs for x in g["samples"]["cpu_s"]])
        rows.append({"variant": label, "repo": str(checkouts[label]), "git": rs[0]["git"], "threads": rs[0]["threads"],
                     "kernel_plan": rs[0]["kernel_plan"], "runs": rs, "summary": s.summary(),
                     "run_medians_s": [sorted(g["samples"]["wall_s"])[len(g["samples"]["wall_s"]) // 2] for g in rs]})
    return {"checkouts": {k: str(v) for k, v in checkouts.items()}}, rows


def blocks(args, rows: list[dict]) -> list[dict]:
    col = results.column
    if args.b_repo:
        intro = (f"The default kernel plan of two checkouts, decode steps at batch {args.batch} (context ~"
                 f"{PROMPT_LEN} tokens), {args.runs} runs each in fresh processes alternating A-B, B-A, "
                 f"{args.rounds} timed steps per run after one warm-up step; median and best over all steps, "
                 "and each run's median.")
        table = results.table(None, [col("checkout"), col("git"), col("threads", "d"), col("wall ms median", ".1f"),
                                     col("best", ".1f"), col("CPU ms median", ".1f"), col("run medians (ms)")],
                              [[r["variant"], r["git"]["commit"], r["threads"], r["summary"]["wall_median_s"] * 1e3,
                                r["summary"]["wall_best_s"] * 1e3, r["summary"]["cpu_median_s"] * 1e3,
                                ", ".join(f"{x * 1e3:.1f}" for x in r["run_medians_s"])] for r in rows])
    else:
        intro = (f"Decode steps at batch {args.batch} (context ~{PROMPT_LEN} tokens), variants interleaved step by "
                 f"step in one process, {args.rounds} steps each. A variant is attention / CPU linear layout / "
                 "threads [/ MoE] (the choices of --attention-backend, --cpu-linear-layout, --moe-backend; "
                 "\"default\": all auto); the kernels the plan resolved are in the result's JSON.")
        table = results.table(None, [col("variant"), col("threads", "d"), col("wall ms median", ".1f"),
                                     col("best", ".1f"), col("CPU ms median", ".1f")],
                              [[r["variant"], r["threads"], r["summary"]["wall_median_s"] * 1e3,
                                r["summary"]["wall_best_s"] * 1e3, r["summary"]["cpu_median_s"] * 1e3] for r in rows])
    return [results.text(intro), table, {"kind": "note"}]


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(prog="python -m loadtest decode-step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=8, help="timed steps per variant (per run with --b-repo)")
    ap.add_argument("--variants", default="default,cpu/onednn/1/loop,reference/auto/1")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--a-repo", default=str(REPO), help="--b-repo mode: checkout A (default: this one)")
    ap.add_argument("--b-repo", help="compare the default plan of this checkout against --a-repo's")
    ap.add_argument("--a-label", default="A")
    ap.add_argument("--b-label", default="B")
    ap.add_argument("--runs", type=int, default=4, help="--b-repo mode: alternating runs per checkout")
    ap.add_argument("--expert-devices", help="place the experts on these devices (e.g. cpu:0,cpu:1)")
    ap.add_argument("--gpu-expert-budget", help="experts per layer per device (the rest: the CPU tier)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    output.add_args(ap)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return None
    from loadtest.checkpoints import make_checkpoint

    model = make_checkpoint("mixtral-140m")
    result = results.new_result("decode-step", argv, vars(args), heading=HEADING,
                                section="decode-step-ab" if args.b_repo else "decode-step")
    extra, rows = run_checkouts(args, model) if args.b_repo else run_variants(args, model)
    result["measurements"] = {**extra, "rows": rows}
    result["summary"]["blocks"] = blocks(args, rows)
    output.finish(result, args)
    return result
