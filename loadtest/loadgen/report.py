"""Write a run's results: `<out>.json` (config, summaries, per-request records), `<out>.md`
(one markdown table row per load point) and `<out>.png` (matplotlib; a sweep plots latency
percentiles and throughput against load, a single point plots latency CDFs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _f(x: Any, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def markdown_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        f"model `{cfg['model']}` at {cfg['url']} ({cfg['endpoint']}); prompt {cfg['prompt_len']} tokens, "
        f"output {cfg['output_len']} tokens (ignore_eos), {cfg['num_requests']} requests per point, "
        f"seed {cfg['seed']}; SLO: {cfg['slo']}",
        "",
        "| load | ok/sent | errors | req/s | output tok/s | goodput req/s | TTFT p50 / p95 / p99 ms "
        "| ITL p50 / p95 / p99 ms | TPOT p50 ms | e2e p50 / p95 / p99 ms |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        s = p["summary"]
        errs = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0"
        if s.get("cancelled_at_limit"):
            errs += f" (+{s['cancelled_at_limit']} cancelled at time limit)"
        t, i, e = s["ttft_ms"], s["itl_ms"], s["e2e_ms"]
        lines.append(
            f"| {p['label']} | {s['completed']}/{s['num_requests']} | {errs} | {s['request_throughput']:.2f} "
            f"| {s['output_token_throughput']:.1f} | {s['goodput']:.2f} "
            f"| {_f(t['p50'])} / {_f(t['p95'])} / {_f(t['p99'])} | {_f(i['p50'])} / {_f(i['p95'])} / {_f(i['p99'])} "
            f"| {_f(s['tpot_ms']['p50'])} | {_f(e['p50'])} / {_f(e['p95'])} / {_f(e['p99'])} |")
    return "\n".join(lines) + "\n"


def _x(points: list[dict[str, Any]]) -> tuple[list[float], str]:
    """x positions of load points; an infinite rate sits at twice the largest finite one."""
    kind = points[0]["kind"]
    finite = [float(p["value"]) for p in points if p["value"] != "inf"]
    inf_at = 2 * max(finite) if finite else 1.0
    xs = [inf_at if p["value"] == "inf" else float(p["value"]) for p in points]
    label = "concurrency (requests in flight)" if kind == "concurrency" else "request rate (req/s)"
    if len(finite) < len(points):
        label += f"; inf plotted at {inf_at:g}"
    return xs, label


def plot(result: dict[str, Any], path: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    points = result["points"]
    title = title or f"{result['config']['model']} @ {result['config']['url']}"
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    metrics = [("ttft_ms", "TTFT (ms)"), ("itl_ms", "inter-token latency (ms)"), ("e2e_ms", "end-to-end latency (ms)")]
    same_kind = len({p["kind"] for p in points}) == 1
    if len(points) > 1 and same_kind:
        xs, xlabel = _x(points)
        for ax, (key, name) in zip(axes.flat, metrics):
            for pct, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
                ax.plot(xs, [p["summary"][key][pct] or np.nan for p in points], style, label=pct)
            ax.set(xlabel=xlabel, ylabel=name, title=name)
            ax.grid(alpha=0.3)
            ax.legend()
        ax = axes.flat[3]
        ax.plot(xs, [p["summary"]["output_token_throughput"] for p in points], "o-", label="output tok/s")
        ax.set(xlabel=xlabel, ylabel="output tokens/s", title="throughput")
        ax2 = ax.twinx()
        ax2.plot(xs, [p["summary"]["request_throughput"] for p in points], "s--", color="tab:orange", label="req/s")
        ax2.plot(xs, [p["summary"]["goodput"] for p in points], "^:", color="tab:green", label="goodput req/s")
        ax2.set_ylabel("requests/s")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="best")
        ax.grid(alpha=0.3)
    else:  # latency CDFs per point
        for ax, (key, name) in zip(axes.flat, metrics):
            for p in points:
                reqs = [r for r in p["requests"] if r["ok"]]
                field = key[: -len("_ms")]  # ttft | itl | e2e, as in the per-request records
                vals = sorted(x * 1e3 for r in reqs for x in (r["itl"] if field == "itl" else [r[field]])
                              if x is not None)
                if vals:
                    ax.plot(vals, np.linspace(0, 1, len(vals)), label=p["label"])
            ax.set(xlabel=name, ylabel="fraction of samples", title=f"{name} CDF")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        ax = axes.flat[3]
        labels = [p["label"] for p in points]
        ax.bar(range(len(points)), [p["summary"]["output_token_throughput"] for p in points])
        ax.set_xticks(range(len(points)), labels, rotation=20, fontsize=8)
        ax.set(ylabel="output tokens/s", title="throughput")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict[str, Any], out: str | Path, chart: bool = True) -> dict[str, Path]:
    """Write `<out>.json`, `<out>.md` and (chart) `<out>.png`; returns the paths."""
    out = Path(out)
    if out.suffix in (".json", ".md", ".png"):
        out = out.with_suffix("")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": out.with_name(out.name + ".json"), "md": out.with_name(out.name + ".md")}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["md"].write_text(markdown_table(result))
    if chart:
        paths["png"] = out.with_name(out.name + ".png")
        plot(result, paths["png"])
    return paths
