"""Summaries of one load point: percentiles, throughput, goodput under an SLO, errors by kind.

Percentiles use linear interpolation (numpy's default, as vLLM's benchmark does). Latencies are
reported in milliseconds. ITL pools every inter-chunk gap of every successful request; the SLO
on ITL is per request (its own p95 gap must be within the bound).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from loadtest.loadgen.client import RequestResult

PCTS = (50, 90, 95, 99)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    itl_p95_ms: float | None = None
    e2e_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.itl_p95_ms is None and self.e2e_ms is None

    def met(self, r: RequestResult) -> bool:
        if not r.ok:
            return False
        if self.ttft_ms is not None and (r.ttft is None or r.ttft * 1e3 > self.ttft_ms):
            return False
        if self.itl_p95_ms is not None and r.itl and float(np.percentile(r.itl, 95)) * 1e3 > self.itl_p95_ms:
            return False
        return self.e2e_ms is None or (r.e2e is not None and r.e2e * 1e3 <= self.e2e_ms)

    def describe(self) -> str:
        parts = []
        if self.ttft_ms is not None:
            parts.append(f"TTFT <= {self.ttft_ms:g} ms")
        if self.itl_p95_ms is not None:
            parts.append(f"ITL p95 <= {self.itl_p95_ms:g} ms")
        if self.e2e_ms is not None:
            parts.append(f"e2e <= {self.e2e_ms:g} ms")
        return " and ".join(parts) or "none"


def distribution(values_s: list[float]) -> dict[str, float | None]:
    """mean/min/max and percentiles, in ms (None when there are no values)."""
    keys = ["mean", "min", "max"] + [f"p{p}" for p in PCTS]
    if not values_s:
        return {k: None for k in keys} | {"count": 0}
    a = np.asarray(values_s, dtype=float) * 1e3
    out: dict[str, float | None] = {"mean": float(a.mean()), "min": float(a.min()), "max": float(a.max())}
    for p in PCTS:
        out[f"p{p}"] = float(np.percentile(a, p))
    out["count"] = int(a.size)
    return out


def summarize(results: list[RequestResult], duration_s: float, slo: SLO | None = None) -> dict[str, Any]:
    """One point's numbers. `duration_s`: first send to last answer (the measured window)."""
    slo = slo or SLO()
    ok = [r for r in results if r.ok]
    aborted = [r for r in results if r.aborted]
    cancelled = [r for r in results if r.error_kind == "cancelled"]
    failed = [r for r in results if not r.ok and not r.aborted and r.error_kind != "cancelled"]
    errors = Counter(r.error_kind or "unknown" for r in failed)
    samples: dict[str, str] = {}
    for r in failed:
        samples.setdefault(r.error_kind or "unknown", r.error or "")
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_len for r in ok)
    dur = max(duration_s, 1e-9)
    good = sum(1 for r in ok if slo.met(r)) if not slo.empty else len(ok)
    mismatched = sum(1 for r in ok if r.output_tokens != r.output_len)
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(failed),
        "aborted_by_client": len(aborted),
        "cancelled_at_limit": len(cancelled),
        "errors": dict(sorted(errors.items())),
        "error_samples": samples,
        "output_len_mismatch": mismatched,
        "duration_s": duration_s,
        "request_throughput": len(ok) / dur,
        "output_token_throughput": out_tokens / dur,
        "total_token_throughput": (out_tokens + prompt_tokens) / dur,
        "total_output_tokens": out_tokens,
        "total_prompt_tokens": prompt_tokens,
        "slo": slo.describe(),
        "good_requests": good,
        "goodput": good / dur,
        "goodput_fraction": good / len(results) if results else 0.0,
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": distribution([x for r in ok for x in r.itl]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "e2e_ms": distribution([r.e2e for r in ok if r.e2e is not None]),
    }


def summarize_records(records: list[dict[str, Any]], duration_s: float, slo: SLO | None = None) -> dict[str, Any]:
    """`summarize` over per-request JSON records (`RequestResult.to_json()`), e.g. of several runs."""
    names = set(RequestResult.__dataclass_fields__)
    return summarize([RequestResult(**{k: v for k, v in r.items() if k in names}) for r in records], duration_s, slo)
