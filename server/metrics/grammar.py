"""The grammar-compile series: backlog (waiting, running), compile time by outcome, cache bytes.

The gauges read the compile service when /metrics is scraped (`bind`); the histogram is fed by
the compile pool's threads (`observe`, thread-safe like every prometheus_client metric).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from . import names as n
from .prometheus import make_metric

class GrammarMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def make(spec: n.MetricSpec) -> Any:
            return make_metric(spec, registry, n.DEFAULT_MAX_MODEL_LEN)

        self.waiting = make(n.GRAMMAR_COMPILES_WAITING)
        self.running = make(n.GRAMMAR_COMPILES_RUNNING)
        self.cache_bytes = make(n.GRAMMAR_CACHE_BYTES)
        duration = make(n.GRAMMAR_COMPILE_DURATION)
        self.duration = {o: duration.labels(o) for o in n.GRAMMAR_OUTCOMES}

    def bind(self, service: Any) -> None:
        """Read `service.waiting`, `.running` and `.cache.nbytes` on each scrape, and take its
        compile times (`service.on_compile`)."""
        self.waiting.set_function(lambda: service.waiting)
        self.running.set_function(lambda: service.running)
        self.cache_bytes.set_function(lambda: service.cache.nbytes)
        service.on_compile = self.observe

    def observe(self, outcome: str, seconds: float) -> None:
        child = self.duration.get(outcome, self.duration["failed"])
        child.observe(max(0.0, seconds))
