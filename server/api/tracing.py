"""OpenTelemetry tracing of requests (`--otlp-traces-endpoint`, vLLM's flag; the `otel` extra).

Off (no endpoint): `Tracing.create` returns None and nothing here runs; `opentelemetry` is not
imported. On: one span `llm_request` (kind SERVER) per engine request, as vLLM names it, a child
of the W3C `traceparent` / `tracestate` the HTTP request carried (a root span otherwise), with
vLLM's `gen_ai.*` attributes, and three child spans from the engine's timings once the request
finishes: `queue` (arrival to first scheduled), `prefill` (to the first token) and `decode` (to
the last token). `queue` and `prefill` need the engine's scheduling time, which the native
engine reports; with the vllm engine, vLLM's own `llm_request` span (the endpoint is passed to
it) carries that breakdown as a child of ours.

Export: OTLP over gRPC (vLLM's default) or over HTTP with `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=
http/protobuf` (vLLM's variable), batched (the standard `OTEL_BSP_*` variables), flushed at
shutdown. Sampling: the standard `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default
`parentbased_always_on`: a `traceparent` whose sampled flag is off is not recorded).
`OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` set the resource (service.name: moe-serve).
The provider is this app's own, not the process-global one (vLLM sets that one itself).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from server.engine.request import EngineRequest, RequestMetrics

logger = logging.getLogger(__name__)

PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
PROTOCOLS = ("grpc", "http/protobuf")
TRACE_HEADERS = ("traceparent", "tracestate")


class Attr:
    """vLLM's span attribute names (vllm/tracing/utils.py SpanAttributes), plus the request model."""

    REQUEST_MODEL = "gen_ai.request.model"
    RESPONSE_MODEL = "gen_ai.response.model"
    REQUEST_ID = "gen_ai.request.id"
    REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
    REQUEST_TEMPERATURE = "gen_ai.request.temperature"
    REQUEST_TOP_P = "gen_ai.request.top_p"
    REQUEST_N = "gen_ai.request.n"
    USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
    USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
    USAGE_NUM_SEQUENCES = "gen_ai.usage.num_sequences"
    LATENCY_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
    LATENCY_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
    LATENCY_E2E = "gen_ai.latency.e2e"
    LATENCY_PREFILL = "gen_ai.latency.time_in_model_prefill"
    LATENCY_DECODE = "gen_ai.latency.time_in_model_decode"
    LATENCY_INFERENCE = "gen_ai.latency.time_in_model_inference"


def _exporter(endpoint: str) -> Any:
    protocol = os.environ.get(PROTOCOL_ENV, "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter,
        )

        return OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HTTPExporter,
        )

        return HTTPExporter(endpoint=endpoint)
    raise ValueError(f"{PROTOCOL_ENV}={protocol!r}: expected one of {', '.join(PROTOCOLS)}")


class Tracing:
    """The app's tracer provider and tracer; `start(...)` opens the spans of one HTTP request."""

    def __init__(self, endpoint: str, model_name: str) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import (
            TraceContextTextMapPropagator,
        )

        from server.api.health import server_version

        version = server_version()
        attrs = {"service.version": version}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attrs["service.name"] = "moe-serve"
        self.endpoint = endpoint
        self.model_name = model_name
        # sampler=None: the SDK reads OTEL_TRACES_SAMPLER (default parentbased_always_on)
        self.provider = TracerProvider(resource=Resource.create(attrs))
        self.provider.add_span_processor(BatchSpanProcessor(_exporter(endpoint)))
        self.tracer = self.provider.get_tracer("moe-serve", version)
        self.propagator = TraceContextTextMapPropagator()
        self.server_kind = SpanKind.SERVER
        logger.info("tracing: OTLP spans to %s (%s)", endpoint, os.environ.get(PROTOCOL_ENV, "grpc"))

    @classmethod
    def create(cls, endpoint: str | None, model_name: str) -> Tracing | None:
        return cls(endpoint, model_name) if endpoint else None

    def start(self, headers: Mapping[str, str], requests: list[EngineRequest]) -> RequestTrace:
        """Open one `llm_request` span per engine request, parented by the headers' trace
        context, and put the span's own context into each request's `trace_headers` (engines
        that trace themselves, vLLM, hang their spans under it)."""
        carrier = {k: headers[k] for k in TRACE_HEADERS if k in headers}
        parent = self.propagator.extract(carrier) if carrier else None
        clock = Clock()
        spans = []
        for req in requests:
            p = req.sampling_params
            attrs: dict[str, Any] = {
                Attr.REQUEST_ID: req.request_id, Attr.REQUEST_MODEL: self.model_name,
                Attr.RESPONSE_MODEL: self.model_name, Attr.REQUEST_N: p.n,
                Attr.REQUEST_TEMPERATURE: float(p.temperature), Attr.REQUEST_TOP_P: float(p.top_p)}
            if p.max_tokens is not None:
                attrs[Attr.REQUEST_MAX_TOKENS] = p.max_tokens
            span = self.tracer.start_span("llm_request", context=parent, kind=self.server_kind,
                                          attributes=attrs, start_time=clock.ns(req.arrival_time))
            if span.get_span_context().is_valid:
                from opentelemetry.trace import set_span_in_context

                out: dict[str, str] = {}
                self.propagator.inject(out, context=set_span_in_context(span))
                req.trace_headers = out
            spans.append(span)
        return RequestTrace(self, spans, clock)

    def shutdown(self) -> None:
        """Export what is buffered and stop (the app's shutdown)."""
        try:
            self.provider.shutdown()
        except Exception:  # never fail a shutdown over traces
            logger.exception("tracing shutdown failed")


class Clock:
    """time.monotonic() readings as nanoseconds since the epoch (what spans carry), with one
    offset for all the spans of a request, so that they line up exactly."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def ns(self, monotonic_s: float) -> int:
        return self.offset_ns + int(monotonic_s * 1e9)


class RequestTrace:
    """The spans of one HTTP request's engine requests; each ends once (finish or fail)."""

    def __init__(self, tracing: Tracing, spans: list[Any], clock: Clock) -> None:
        self._tracing = tracing
        self._clock = clock
        self._spans: list[Any | None] = list(spans)

    def finish(self, i: int, metrics: RequestMetrics | None, num_sequences: int) -> None:
        """Engine request `i` finished: its usage and latency attributes and the queue / prefill /
        decode child spans from its metrics (monotonic readings), then end it."""
        span = self._spans[i]
        if span is None:
            return
        self._spans[i] = None
        if not span.is_recording():
            span.end()
            return
        if metrics is None:
            span.set_attribute(Attr.USAGE_NUM_SEQUENCES, num_sequences)
            span.end()
            return
        m = metrics
        end = m.finished_time if m.finished_time is not None else time.monotonic()
        attrs: dict[str, Any] = {
            Attr.USAGE_PROMPT_TOKENS: m.num_prompt_tokens, Attr.USAGE_COMPLETION_TOKENS: m.num_generation_tokens,
            Attr.USAGE_NUM_SEQUENCES: num_sequences, Attr.LATENCY_E2E: end - m.arrival_time}
        if m.first_token_time is not None:
            attrs[Attr.LATENCY_TIME_TO_FIRST_TOKEN] = m.first_token_time - m.arrival_time
        scheduled = None if m.queued_time is None else m.arrival_time + m.queued_time
        if scheduled is not None:
            attrs[Attr.LATENCY_TIME_IN_QUEUE] = m.queued_time
            if m.first_token_time is not None:
                attrs[Attr.LATENCY_PREFILL] = m.first_token_time - scheduled
            attrs[Attr.LATENCY_INFERENCE] = (m.last_token_time or end) - scheduled
        if m.first_token_time is not None and m.last_token_time is not None:
            attrs[Attr.LATENCY_DECODE] = m.last_token_time - m.first_token_time
        span.set_attributes(attrs)
        from opentelemetry.trace import set_span_in_context

        ctx = set_span_in_context(span)
        phases = []
        if scheduled is not None:
            phases.append(("queue", m.arrival_time, scheduled))
            if m.first_token_time is not None:
                phases.append(("prefill", scheduled, m.first_token_time))
        if m.first_token_time is not None and m.last_token_time is not None:
            phases.append(("decode", m.first_token_time, m.last_token_time))
        tracer = self._tracing.tracer
        for name, t0, t1 in phases:
            child = tracer.start_span(name, context=ctx, start_time=self._clock.ns(t0))
            child.end(end_time=self._clock.ns(max(t0, t1)))
        span.end(end_time=self._clock.ns(end))

    def fail(self, description: str) -> None:
        """End every span still open with an error status (error, abort, disconnect, timeout)."""
        from opentelemetry.trace import Status, StatusCode

        for i, span in enumerate(self._spans):
            if span is not None:
                self._spans[i] = None
                if span.is_recording():
                    span.set_status(Status(StatusCode.ERROR, description))
                span.end()
