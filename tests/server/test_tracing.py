"""OpenTelemetry tracing (--otlp-traces-endpoint) against real OTLP receivers.

The receivers run in the test: an HTTP server on 127.0.0.1 decoding what the SDK's OTLP/HTTP
exporter POSTs (ExportTraceServiceRequest protobuf, opentelemetry-proto), and an OTLP/gRPC
TraceService; nothing of the exporter is replaced. A real `moe-serve` serves streamed requests
with and without a `traceparent` (sampled and not), one that times out, and is stopped with
SIGTERM, whose shutdown flushes what the batch processor holds.
"""

from __future__ import annotations

import gzip
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from server.cli import build_config
from server.config import ConfigError
from tests.conftest import skip_or_fail

from .conftest import ServerProcess, start_server

try:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2 as span_pb2
    from opentelemetry.sdk.trace import TracerProvider  # noqa: F401 - what the server needs
except ImportError as e:  # the otel extra (part of the test extra)
    trace_pb2 = span_pb2 = None
    MISSING = f"the otel extra is not installed ({e})"
else:
    MISSING = ""


@pytest.fixture(autouse=True)
def _needs_otel() -> None:
    if MISSING:
        skip_or_fail(MISSING)

MAX_TOKENS = 8


class Receiver:
    """An OTLP/HTTP traces endpoint: POST /v1/traces, protobuf (optionally gzip) bodies."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []  # (resource attributes, Span)
        self.posts = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                ok = self.path == "/v1/traces" and self.headers.get("Content-Type") == "application/x-protobuf"
                if ok:
                    req = trace_pb2.ExportTraceServiceRequest()
                    req.ParseFromString(body)
                    with receiver.lock:
                        receiver.posts += 1
                        for rs in req.resource_spans:
                            res = {a.key: value_of(a.value) for a in rs.resource.attributes}
                            for ss in rs.scope_spans:
                                receiver.spans.extend((res, s) for s in ss.spans)
                out = trace_pb2.ExportTraceServiceResponse().SerializeToString() if ok else b""
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/traces"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def of_trace(self, trace_id: bytes) -> list[Any]:
        with self.lock:
            return [s for _, s in self.spans if s.trace_id == trace_id]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def value_of(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def attrs(span: Any) -> dict[str, Any]:
    return {a.key: value_of(a.value) for a in span.attributes}


def traced_server(log_dir, schedule_delay_ms: int) -> tuple[Receiver, ServerProcess]:
    receiver = Receiver()
    env = {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": str(schedule_delay_ms),
           "OTEL_SERVICE_NAME": "moe-serve-under-test"}
    try:
        server = start_server(["--max-model-len", "128", "--num-kv-blocks", "64", "--seed", "0",
                               "--otlp-traces-endpoint", receiver.url], log_dir, env)
    except BaseException:
        receiver.close()
        raise
    return receiver, server


@pytest.fixture
def traced(tmp_path) -> Iterator[tuple[Receiver, ServerProcess]]:
    """A server exporting every 200 ms."""
    receiver, server = traced_server(tmp_path, 200)
    try:
        yield receiver, server
    finally:
        server.stop()
        receiver.close()


def stream(server: ServerProcess, headers: dict[str, str]) -> dict[str, int]:
    """One streamed completion; its usage (from the final chunk)."""
    client = server.client()
    chunks = list(client.completions.create(
        model=client.models.list().data[0].id, prompt="The quick brown fox", max_tokens=MAX_TOKENS,
        temperature=0.7, top_p=0.9, stream=True, stream_options={"include_usage": True},
        extra_headers=headers))
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens >= 1
    return {"prompt": usage.prompt_tokens, "completion": usage.completion_tokens}


def wait_for(receiver: Receiver, trace_id: bytes, n: int, timeout: float = 30) -> list[Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        spans = receiver.of_trace(trace_id)
        if len(spans) >= n:
            return spans
        time.sleep(0.1)
    raise AssertionError(f"{len(receiver.of_trace(trace_id))} of {n} spans of trace {trace_id.hex()} arrived "
                         f"within {timeout}s ({receiver.posts} exports received)")


def test_streamed_request_span_is_a_child_of_the_traceparent(traced):
    receiver, server = traced
    trace_id, parent_id = secrets.token_bytes(16), secrets.token_bytes(8)
    usage = stream(server, {"traceparent": f"00-{trace_id.hex()}-{parent_id.hex()}-01",
                            "tracestate": "vendor=abc"})
    spans = wait_for(receiver, trace_id, 4)  # exported while serving, not only at shutdown
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == ["decode", "llm_request", "prefill", "queue"], sorted(by_name)

    req = by_name["llm_request"]
    assert req.parent_span_id == parent_id
    assert req.kind == span_pb2.Span.SPAN_KIND_SERVER
    a = attrs(req)
    model = server.client().models.list().data[0].id
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == model
    assert a["gen_ai.request.max_tokens"] == MAX_TOKENS
    assert a["gen_ai.request.temperature"] == pytest.approx(0.7)
    assert a["gen_ai.request.top_p"] == pytest.approx(0.9)
    assert a["gen_ai.request.n"] == 1 and a["gen_ai.usage.num_sequences"] == 1
    assert a["gen_ai.usage.prompt_tokens"] == usage["prompt"]
    assert a["gen_ai.usage.completion_tokens"] == usage["completion"]
    assert a["gen_ai.request.id"]
    ttft, e2e, queue = (a["gen_ai.latency.time_to_first_token"], a["gen_ai.latency.e2e"],
                        a["gen_ai.latency.time_in_queue"])
    assert 0 <= queue <= ttft <= e2e
    assert 0 <= a["gen_ai.latency.time_in_model_prefill"] <= ttft
    assert 0 <= a["gen_ai.latency.time_in_model_decode"] <= e2e
    assert req.end_time_unix_nano - req.start_time_unix_nano == pytest.approx(e2e * 1e9, abs=2e6)

    # the phases: children of the request span, in order, inside it, the queue starting with it
    phases = [by_name[n] for n in ("queue", "prefill", "decode")]
    for p in phases:
        assert p.parent_span_id == req.span_id and p.trace_id == trace_id
        assert req.start_time_unix_nano <= p.start_time_unix_nano <= p.end_time_unix_nano <= req.end_time_unix_nano
    assert phases[0].start_time_unix_nano == req.start_time_unix_nano
    assert phases[0].end_time_unix_nano <= phases[1].start_time_unix_nano + 1000
    assert phases[1].end_time_unix_nano <= phases[2].start_time_unix_nano + 1000
    assert (phases[1].end_time_unix_nano - req.start_time_unix_nano) == pytest.approx(ttft * 1e9, abs=2e6)

    resource = next(res for res, s in receiver.spans if s.span_id == req.span_id)
    assert resource["service.name"] == "moe-serve-under-test"


@pytest.mark.parametrize("endpoint", ["localhost:4317", "ftp://collector:4317", "http://", ""])
def test_an_endpoint_that_is_not_an_http_url_is_refused(endpoint):
    if endpoint == "":  # empty: the flag is off, as unset
        assert build_config(["--otlp-traces-endpoint", endpoint], environ={}).engine.otlp_traces_endpoint in (None, "")
        return
    with pytest.raises(ConfigError, match="--otlp-traces-endpoint must be an http:// or https:// URL"):
        build_config(["--otlp-traces-endpoint", endpoint], environ={})


def test_the_dev_extra_installs_the_otel_extra():
    """CI installs `.[dev]` (test, lint, bench): the tracing tests need the otel extra's packages in
    the test extra too."""
    import tomllib

    from tests.conftest import REPO

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["otel"] and set(extras["otel"]) <= set(extras["test"])


def test_grpc_by_default_parent_based_sampling_and_the_shutdown_flush(tmp_path):
    """Without OTEL_EXPORTER_OTLP_TRACES_PROTOCOL the spans go over gRPC (vLLM's default), here to an
    in-test OTLP/gRPC TraceService. With a 10-minute batch delay nothing is exported until SIGTERM,
    whose shutdown flushes everything: the sampled trace, the root span of a request without
    `traceparent`, and nothing of the request whose caller did not sample it."""
    from concurrent import futures

    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    received: list[Any] = []
    exports = []

    class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            exports.append(time.monotonic())
            received.extend(s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans)
            return trace_pb2.ExportTraceServiceResponse()

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        server = start_server(["--max-model-len", "128", "--num-kv-blocks", "64",
                               "--otlp-traces-endpoint", f"http://127.0.0.1:{port}"], tmp_path,
                              {"OTEL_BSP_SCHEDULE_DELAY": "600000"})
        unsampled, sampled = secrets.token_bytes(16), secrets.token_bytes(16)
        parent = secrets.token_bytes(8)
        try:
            stream(server, {"traceparent": f"00-{unsampled.hex()}-{secrets.token_bytes(8).hex()}-00"})
            stream(server, {})  # no traceparent: a new trace
            stream(server, {"traceparent": f"00-{sampled.hex()}-{parent.hex()}-01"})
            time.sleep(0.5)
            assert exports == []  # the batch processor still holds them
        finally:
            assert server.stop() == 0  # SIGTERM: the provider's shutdown exports what the batch holds
        spans = {s.name: s for s in received if s.trace_id == sampled}
        assert sorted(spans) == ["decode", "llm_request", "prefill", "queue"]
        assert spans["llm_request"].parent_span_id == parent
        assert [s for s in received if s.trace_id == unsampled] == []  # parentbased_always_on
        roots = [s for s in received if s.name == "llm_request" and not s.parent_span_id]
        assert len(roots) == 1 and roots[0].trace_id not in (unsampled, sampled)
        assert len([s for s in received if s.trace_id == roots[0].trace_id]) == 4
    finally:
        grpc_server.stop(0)


def test_tracing_off_loads_no_opentelemetry_sdk():
    """No endpoint: nothing is set up and the SDK is never imported (the request path only checks
    for None)."""
    import subprocess
    import sys

    code = ("import sys; from server.api.tracing import Tracing; from server.api import serving; "
            "assert Tracing.create(None, 'm') is None and Tracing.create('', 'm') is None; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_a_request_that_times_out_ends_its_span_with_an_error(tmp_path):
    """--request-timeout 0.2 s against 400 tokens (ignore_eos): the request gets a 504 and its span
    an ERROR status saying why."""
    import openai

    receiver = Receiver()
    try:
        server = start_server(["--max-model-len", "512", "--num-kv-blocks", "64", "--request-timeout", "0.2",
                               "--otlp-traces-endpoint", receiver.url], tmp_path,
                              {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"})
        trace_id = secrets.token_bytes(16)
        try:
            client = server.client()
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(model=client.models.list().data[0].id, prompt="Once", max_tokens=400,
                                          extra_body={"ignore_eos": True},
                                          extra_headers={"traceparent": f"00-{trace_id.hex()}-{'1' * 16}-01"})
            assert e.value.status_code == 504
        finally:
            assert server.stop() == 0  # flushes
        (span,) = receiver.of_trace(trace_id)
        assert span.name == "llm_request"
        assert span.status.code == span_pb2.Status.STATUS_CODE_ERROR and span.status.message == "timed out"
        assert "gen_ai.usage.completion_tokens" not in attrs(span)  # unfinished: no usage
    finally:
        receiver.close()
