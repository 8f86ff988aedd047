"""CLI: `python -m loadtest.loadgen --help`."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys

from loadtest.loadgen.dists import DistError, LengthDist
from loadtest.loadgen.runner import ConfigError, LoadPoint, RunConfig, run

EXAMPLES = """examples:
  # 16 clients back to back, 64 requests of 128 prompt + 128 output tokens
  python -m loadtest.loadgen --url http://127.0.0.1:8000 --profile concurrency --concurrency 16 \\
      --num-requests 64 --prompt-len 128 --output-len 128 --out results/c16
  # open loop: Poisson arrivals at 2 req/s, SLO TTFT <= 500 ms and per-request ITL p95 <= 100 ms
  python -m loadtest.loadgen --profile rate --rate 2 --slo-ttft-ms 500 --slo-itl-ms 100 --out results/r2
  # sweep concurrency (or --sweep-rate 0.5,1,2,inf), variable lengths
  python -m loadtest.loadgen --profile sweep --sweep-concurrency 1,4,16 \\
      --prompt-len uniform:64:256 --output-len normal:128:32 --out results/sweep
length specs: N | fixed:N | uniform:LOW:HIGH | normal:MEAN:STD[:LO:HI]
"""


def _floats(text: str) -> list[float]:
    try:
        return [math.inf if v.strip().lower() == "inf" else float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, not {text!r}") from None


def _rate(text: str) -> float:
    return _floats(text)[0] if text.strip() else 0.0


def _length(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except DistError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
        return lo, hi
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW:HIGH, not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.loadgen", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load generator for OpenAI-compatible servers: streamed requests, TTFT / ITL / e2e "
                    "percentiles, throughput, goodput, errors by kind.")
    t = ap.add_argument_group("target")
    t.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    t.add_argument("--model", help="model name (default: the first one /v1/models lists)")
    t.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer key (env OPENAI_API_KEY)")
    p = ap.add_argument_group("load")
    p.add_argument("--profile", choices=["concurrency", "rate", "sweep"], default="concurrency")
    p.add_argument("--concurrency", type=int, default=1, help="clients for --profile concurrency")
    p.add_argument("--rate", type=_rate, default=1.0, help="requests/s for --profile rate (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, help="rate profiles: cap on requests in flight")
    p.add_argument("--sweep-concurrency", type=_floats, help="sweep: comma-separated concurrencies")
    p.add_argument("--sweep-rate", type=_floats, help="sweep: comma-separated rates (req/s; inf allowed)")
    p.add_argument("--num-requests", type=int, default=64, help="requests per load point")
    p.add_argument("--max-duration", type=float, default=600.0, help="seconds per load point, at most")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the first point")
    w = ap.add_argument_group("workload")
    w.add_argument("--prompt-len", type=_length, default=LengthDist("fixed", 128), help="prompt tokens")
    w.add_argument("--output-len", type=_length, default=LengthDist("fixed", 128), help="output tokens")
    w.add_argument("--prompt-kind", choices=["ids", "text"], default="ids",
                   help="token-id lists (exact lengths) or text (completions only; chat always text)")
    w.add_argument("--token-range", type=_range, default=(10, 1000), help="prompt token ids LOW:HIGH")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    w.add_argument("--seed", type=int, default=0)
    s = ap.add_argument_group("SLO (goodput)")
    s.add_argument("--slo-ttft-ms", type=float)
    s.add_argument("--slo-itl-ms", type=float, help="bound on each request's own p95 inter-token latency")
    s.add_argument("--slo-e2e-ms", type=float)
    o = ap.add_argument_group("output")
    o.add_argument("--out", help="write OUT.json, OUT.md and OUT.png")
    o.add_argument("--no-chart", action="store_true")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--fail-on-errors", action="store_true", help="exit 1 when any request failed")
    return ap


def config_from_args(args: argparse.Namespace, ap: argparse.ArgumentParser) -> RunConfig:
    from loadtest.loadgen.stats import SLO

    if args.profile == "concurrency":
        points = [LoadPoint("concurrency", args.concurrency)]
    elif args.profile == "rate":
        points = [LoadPoint("rate", args.rate, args.max_concurrency)]
    else:
        if bool(args.sweep_concurrency) == bool(args.sweep_rate):
            ap.error("--profile sweep needs exactly one of --sweep-concurrency and --sweep-rate")
        if args.sweep_concurrency:
            points = [LoadPoint("concurrency", int(v)) for v in args.sweep_concurrency]
        else:
            points = [LoadPoint("rate", v, args.max_concurrency) for v in args.sweep_rate]
    return RunConfig(url=args.url, model=args.model, endpoint=args.endpoint, points=tuple(points),
                     num_requests=args.num_requests, max_duration=args.max_duration, timeout=args.timeout,
                     prompt_len=args.prompt_len, output_len=args.output_len, prompt_kind=args.prompt_kind,
                     token_range=args.token_range, seed=args.seed, temperature=args.temperature,
                     extra_body=args.extra_body, api_key=args.api_key, warmup=args.warmup,
                     slo=SLO(args.slo_ttft_ms, args.slo_itl_ms, args.slo_e2e_ms), progress=not args.no_progress)


def main(argv: list[str] | None = None) -> int:
    from loadtest.loadgen import report

    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        cfg = config_from_args(args, ap)
        result = asyncio.run(run(cfg))
    except ConfigError as e:
        print(f"loadgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("loadgen: interrupted", file=sys.stderr)
        return 130
    print()
    print(report.markdown_table(result))
    for p in result["points"]:
        for kind, msg in p["summary"]["error_samples"].items():
            print(f"{p['label']}: {kind}: {msg}", file=sys.stderr)
    if args.out:
        paths = report.write(result, args.out, chart=not args.no_chart)
        print("wrote " + ", ".join(str(v) for v in paths.values()))
    failed = sum(p["summary"]["failed"] for p in result["points"])
    return 1 if args.fail_on_errors and failed else 0


if __name__ == "__main__":
    sys.exit(main())
