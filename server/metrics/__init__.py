"""Prometheus metrics for moe-serve: one `ServerMetrics` per app, with its own registry.

    metrics = ServerMetrics("my-model", "0", num_layers=16, num_experts=64)
    engine.add_stat_logger(metrics.stat_logger)        # record() once per engine step
    metrics.observe_http("/v1/chat/completions", "POST", 200, 0.42)
    body, content_type = metrics.render()              # GET /metrics
    metrics.routing_snapshot()                         # GET /v1/moe/routing

Names, labels and buckets live in `server.metrics.names`; docs/metrics.md lists them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from server.engine.stats import (
    FinishedRequestStats,
    IterationStats,
    PlacementInfo,
    RoutingStats,
)

from . import names
from .names import DEFAULT_MAX_MODEL_LEN
from .grammar import GrammarMetrics
from .prometheus import CONTENT_TYPE, CoreMetrics, HttpMetrics, render_registry
from .routing import ExpertLoadTracker, RoutingExposition, load_imbalance, snapshot_to_json

__all__ = ["CONTENT_TYPE", "MetricsStatLogger", "ServerMetrics", "load_imbalance", "names"]

logger = logging.getLogger(__name__)


class MetricsStatLogger:
    """The `StatLogger` handed to the engine. Never raises into the engine thread."""

    def __init__(self, core: CoreMetrics, routing: ExpertLoadTracker) -> None:
        self._core = core
        self._routing = routing
        self._failed = False

    def record(self, iteration: IterationStats, finished: list[FinishedRequestStats],
               routing: RoutingStats | None) -> None:
        try:
            self._core.record_iteration(iteration)
            for req in finished:
                self._core.record_finished(req)
            if routing is not None:
                self._routing.record(routing)
        except Exception:  # metrics must not take the engine down; log the first failure
            if not self._failed:
                self._failed = True
                logger.exception("metrics: recording engine stats failed")


class ServerMetrics:
    def __init__(self, model_name: str, engine_name: str, num_layers: int | None = None,
                 num_experts: int | None = None, *,
                 max_model_len: int = DEFAULT_MAX_MODEL_LEN,
                 imbalance_window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 kv_cache_dtype: str = "auto", block_size: int = 16) -> None:
        """`engine_name` is the value of vLLM's `engine` label; `max_model_len` sets the
        token-count histogram buckets (vLLM's 1-2-5 series up to it); `clock` drives the
        imbalance window (injectable for tests)."""
        self.model_name = model_name
        self.engine_name = engine_name
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._core = CoreMetrics(self.registry, model_name, engine_name, max_model_len)
        self._core.set_cache_config(kv_cache_dtype, block_size)  # the engine defaults until the app sets them
        self._http = HttpMetrics(self.registry)
        self.grammar = GrammarMetrics(self.registry)  # bound to the app's grammar compile service
        self._routing = ExpertLoadTracker(num_layers, num_experts,
                                          window_seconds=imbalance_window_s, clock=clock)
        self._routing_text = RoutingExposition(self._routing, model_name)
        self.stat_logger = MetricsStatLogger(self._core, self._routing)

    def set_cache_config(self, cache_dtype: str, block_size: int) -> None:
        """vllm:cache_config_info: the KV cache's dtype (--kv-cache-dtype) and block size."""
        self._core.set_cache_config(cache_dtype, block_size)

    def observe_http(self, route: str, method: str, status: int, seconds: float) -> None:
        """`route` must be the route template (e.g. "/v1/models/{model}"), never the raw path."""
        self._http.observe(route, method, status, seconds)

    def set_placement(self, info: PlacementInfo) -> None:
        """Replace the exposed expert placement (raises ValueError on malformed rows)."""
        self._routing.set_placement(info)

    def routing_snapshot(self) -> dict:
        return snapshot_to_json(self._routing.snapshot(), self.model_name)

    def render(self) -> tuple[bytes, str]:
        """Prometheus text exposition (format 0.0.4) and its content type.

        `registry` holds the core, HTTP and process series; the MoE series (layers x experts)
        are appended by a dedicated fast formatter."""
        body, content_type = render_registry(self.registry)
        return body + self._routing_text.render().encode(), content_type
