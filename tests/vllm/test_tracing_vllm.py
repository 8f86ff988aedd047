"""--otlp-traces-endpoint with the vllm engine: our `llm_request` span (child of the request's
`traceparent`) and vLLM's own `llm_request` span (vLLM's tracing, the endpoint passed through),
which hangs under ours, both received by a real OTLP/HTTP receiver."""

from __future__ import annotations

import secrets
import time

import pytest

from tests.server.test_tracing import MISSING, Receiver, attrs, span_pb2

from .conftest import SERVER_ARGS, SERVER_ENV, VLLMServer

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def traced_vllm(vllm_python, vllm_model):
    if MISSING:
        pytest.fail(MISSING)
    receiver = Receiver()
    env = {**SERVER_ENV, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "200"}
    server = VLLMServer(vllm_python, vllm_model, [*SERVER_ARGS, "--otlp-traces-endpoint", receiver.url], env)
    try:
        server.wait_ready(600)
        yield receiver, server
    finally:
        server.stop()
        receiver.close()


def test_vllm_request_span_is_a_child_of_ours(traced_vllm):
    receiver, server = traced_vllm
    trace_id, parent_id = secrets.token_bytes(16), secrets.token_bytes(8)
    client = server.client()
    model = client.models.list().data[0].id
    chunks = list(client.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0.5, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_headers={"traceparent": f"00-{trace_id.hex()}-{parent_id.hex()}-01"}))
    usage = chunks[-1].usage
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        spans = receiver.of_trace(trace_id)
        if len([s for s in spans if s.name == "llm_request"]) >= 2:
            break
        time.sleep(0.2)
    requests = [s for s in receiver.of_trace(trace_id) if s.name == "llm_request"]
    ours = [s for s in requests if s.parent_span_id == parent_id]
    assert len(ours) == 1, [(s.name, s.parent_span_id.hex()) for s in receiver.of_trace(trace_id)]
    (ours,) = ours
    theirs = [s for s in requests if s.parent_span_id == ours.span_id]
    assert len(theirs) == 1, "vLLM's llm_request span did not arrive under ours"
    (theirs,) = theirs
    assert ours.kind == theirs.kind == span_pb2.Span.SPAN_KIND_SERVER
    a, v = attrs(ours), attrs(theirs)
    assert a["gen_ai.usage.prompt_tokens"] == v["gen_ai.usage.prompt_tokens"] == usage.prompt_tokens
    assert a["gen_ai.usage.completion_tokens"] == v["gen_ai.usage.completion_tokens"] == usage.completion_tokens
    assert v["gen_ai.request.max_tokens"] == a["gen_ai.request.max_tokens"] == 6
    assert "gen_ai.latency.time_in_queue" in v and "gen_ai.latency.time_in_model_prefill" in v
    # ours: the vLLM adapter does not see vLLM's scheduling, so only the decode phase is a child span
    children = {s.name for s in receiver.of_trace(trace_id) if s.parent_span_id == ours.span_id}
    assert children == {"llm_request", "decode"}, children
