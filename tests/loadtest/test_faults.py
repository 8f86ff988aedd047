"""Faults against a real `moe-serve` process (random-weight tiny Mixtral, loopback):

- an exception inside an engine step (MOE_SERVE_FAULT_INJECT) fails only the requests of that
  step, with a 500 in the OpenAI error shape, and the server goes on serving;
- failing steps in a row kill the engine: /health fails and the process exits 1;
- KV-cache exhaustion (tiny --num-kv-blocks) preempts, never crashes: every request completes;
- a client that reads its stream very slowly does not stall anyone else.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from loadtest.loadgen.procs import ManagedServer, metric
from tests.loadtest.faults import ENV_VAR
from tests.loadtest.helpers import TOKEN_RANGE, completion, error_body, load, raw_stream_request, sse_events

pytestmark = pytest.mark.timeout(300)
POISON = 7  # prompts holding this token id fail their engine step
assert not TOKEN_RANGE[0] <= POISON < TOKEN_RANGE[1]


@pytest.fixture(scope="module")
def poison_server(tiny_mixtral, tmp_path_factory):
    import sys

    from tests.conftest import REPO

    log = tmp_path_factory.mktemp("faults") / "poison.log"
    server = ManagedServer([sys.executable, "-m", "tests.loadtest.fault_server", "--model", tiny_mixtral, "--host",
                            "127.0.0.1", "--port", "0"], log_path=log, cwd=REPO, env={ENV_VAR: f"token={POISON}"},
                           ready_path="/ready")
    server.start().wait_ready(120)
    yield server
    server.stop()


def _ok(r: httpx.Response, tokens: int) -> None:
    assert r.status_code == 200, r.text[:500]
    assert r.json()["usage"]["completion_tokens"] == tokens


def test_step_fault_fails_only_its_requests_and_serving_goes_on(poison_server: ManagedServer) -> None:
    url = poison_server.url
    assert "fault injection is ON" in poison_server.log_text()
    _ok(completion(url, [11, 12, 13], 8), 8)
    err = error_body(completion(url, [11, POISON, 13], 8), 500)
    assert err["type"] == "server_error"
    _ok(completion(url, [11, 12, 13], 8), 8)  # a healthy step in between resets the failure count
    # streaming: the first step fails before any token, so the answer is still a real 500
    error_body(completion(url, [POISON, 20, 21], 8, stream=True), 500)
    _ok(completion(url, [11, 12, 13], 8), 8)

    # a poison request in the middle of steady traffic: only its step-mates fail with it, as a 500
    # or, mid-stream, as an OpenAI error event; nothing hangs, and traffic after it is unaffected
    results: dict = {}
    bg = threading.Thread(target=lambda: results.update(load(url, concurrency=4, n=16, output_len=48)))
    bg.start()
    time.sleep(0.5)
    error_body(completion(url, [POISON] * 4, 4), 500)
    bg.join(120)
    assert not bg.is_alive()
    assert set(results["errors"]) <= {"http_500", "stream_error"}, results["errors"]
    assert results["failed"] <= 4 and results["completed"] + results["failed"] == 16
    for r in results["requests"]:
        if r["error_kind"] == "stream_error":
            assert "engine" in r["error"], r["error"]
    after = load(url, concurrency=4, n=8, output_len=16)
    assert after["completed"] == 8 and after["output_len_mismatch"] == 0
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    assert poison_server.proc.poll() is None


def test_mid_stream_fault_is_an_error_event(poison_server: ManagedServer) -> None:
    """A stream already under way when its step fails ends with an error event, then [DONE]."""
    url = poison_server.url
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=completion(url, [30, 31, 32], 200, stream=True)))
    t.start()
    time.sleep(0.3)
    error_body(completion(url, [POISON], 2), 500)
    t.join(60)
    r = out["r"]
    assert r.status_code == 200
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    if any("error" in e for e in events[:-1] if isinstance(e, dict)):  # it shared the failing step
        err = events[-2]["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
    else:  # it had finished before the poison request arrived (a very fast machine)
        assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_repeated_step_failures_kill_the_engine_and_the_process_exits_1(tiny_mixtral, start_server) -> None:
    server = start_server(tiny_mixtral, env={ENV_VAR: "every=1"}, name="dead")
    codes = [completion(server.url, [11, 12, 13], 4).status_code for _ in range(3)]
    assert codes[:2] == [500, 500] and codes[2] in (500, 503), codes
    try:  # dead: /health fails (or the server is already on its way out)
        health = httpx.get(server.url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        health = None
    assert health != 200
    code = server.wait(30)
    assert code == 1, f"exit code {code}:\n{server.log_tail()}"
    assert "dead" in server.log_text()


def test_kv_exhaustion_preempts_and_every_request_completes(tiny_mixtral, start_server) -> None:
    # 12 blocks x 16 tokens = 192 tokens of KV; 6 streams of 24 + 72 tokens need 576
    server = start_server(tiny_mixtral, "--num-kv-blocks", "12", "--block-size", "16", "--max-model-len", "128",
                          "--max-num-seqs", "8", name="kv")
    # healthy, this takes a few seconds; a scheduler that deadlocks shows up as timeouts
    summary = load(server.url, concurrency=6, n=18, prompt_len=24, output_len=72, timeout=30, max_duration=60)
    assert summary["completed"] == 18, (summary["errors"], summary["error_samples"], summary["cancelled_at_limit"])
    assert summary["output_len_mismatch"] == 0
    m = server.metrics()
    assert metric(m, "vllm:num_preemptions_total") > 0
    assert metric(m, "vllm:kv_cache_usage_perc") == 0
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    assert server.proc.poll() is None


def test_slow_stream_reader_does_not_stall_others(poison_server: ManagedServer) -> None:
    url = poison_server.url
    baseline = load(url, concurrency=4, n=12, output_len=16)
    assert baseline["completed"] == 12
    # a stream of ~1 MB (2 choices x 600 tokens with top-5 logprobs) read 64 bytes every 50 ms
    body = {"prompt": list(range(40, 56)), "max_tokens": 600, "n": 2, "logprobs": 5, "ignore_eos": True,
            "stream": True, "temperature": 0}
    sock = raw_stream_request(poison_server.port, body)
    received = [0]
    stop = threading.Event()

    def slow_read() -> None:
        while not stop.is_set():
            try:
                chunk = sock.recv(64)
            except OSError:
                return
            if not chunk:
                return
            received[0] += len(chunk)
            time.sleep(0.05)

    reader = threading.Thread(target=slow_read, daemon=True)
    reader.start()
    try:
        time.sleep(0.5)
        assert received[0] > 0  # the slow stream is under way
        during = load(url, concurrency=4, n=12, output_len=16, seed=1)
        assert during["completed"] == 12, during["errors"]
        assert reader.is_alive() and received[0] < 200_000  # still far from done: it overlapped
        limit = 4 * baseline["e2e_ms"]["p95"] + 1000
        assert during["e2e_ms"]["p95"] < limit, (during["e2e_ms"], baseline["e2e_ms"])
    finally:
        stop.set()
        sock.close()
        reader.join(5)
    # the abandoned stream is aborted: nothing stays running, its KV blocks come back
    completion(url, [11, 12], 2)  # one more step publishes fresh gauges
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = poison_server.metrics()
        if metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.2)
        completion(url, [11, 12], 2)
    else:
        pytest.fail(f"the abandoned stream was not cleaned up: {m}")
