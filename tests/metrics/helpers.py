"""Shared helpers for the metrics tests: synthetic engine stats and exposition parsing."""

from __future__ import annotations

import math
import re

from prometheus_client.parser import text_string_to_metric_families

from server.engine.stats import FinishedRequestStats, IterationStats, RoutingStats

Key = tuple[str, frozenset]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def iteration(**kw) -> IterationStats:
    kw.setdefault("timestamp", 0.0)
    return IterationStats(**kw)


def finished(reason: str = "stop", **kw) -> FinishedRequestStats:
    base = {"e2e_latency": 1.0, "queued_time": 0.1, "prefill_time": 0.2, "decode_time": 0.7,
            "inference_time": 0.9, "num_prompt_tokens": 10, "num_generation_tokens": 8}
    base.update(kw)
    return FinishedRequestStats(finish_reason=reason, **base)


def routing(loads: list[list[int]], devices: dict[str, int] | None = None,
            dropped: list[int] | None = None, zero: list[int] | None = None) -> RoutingStats:
    return RoutingStats(num_layers=len(loads), num_experts=len(loads[0]), expert_tokens=loads,
                        device_tokens=devices or {}, dropped_tokens=dropped, zero_expert_tokens=zero)


def samples(body: bytes | str) -> dict[Key, float]:
    """{(sample name, frozenset(labels)): value} via prometheus_client's parser."""
    text = body.decode() if isinstance(body, bytes) else body
    out: dict[Key, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


def value(smp: dict[Key, float], name: str, **labels) -> float:
    """The one sample of `name` whose labels include `labels`."""
    hits = [v for (n, ls), v in smp.items() if n == name and set(labels.items()) <= ls]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} matches"
    return hits[0]


def series(smp: dict[Key, float], name: str) -> dict[frozenset, float]:
    return {ls: v for (n, ls), v in smp.items() if n == name}


def declared_types(body: bytes) -> dict[str, str]:
    """Exposed family name -> type, from the raw `# TYPE` lines (names exactly as scraped)."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", body.decode(), flags=re.MULTILINE))


def bucket_edges(smp: dict[Key, float], name: str) -> list[float]:
    les = {dict(ls)["le"] for (n, ls) in smp if n == f"{name}_bucket"}
    return sorted(float(x) for x in les if not math.isinf(float(x)))
