"""The load generator against an in-process mock OpenAI server (httpx MockTransport): profiles,
timing, error kinds, bounds, SLO goodput and the report files."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time

import httpx
import pytest

from loadtest.loadgen import LengthDist, LoadPoint, RequestResult, RunConfig, SLO, build_workload, run, summarize
from loadtest.loadgen import report
from loadtest.loadgen.__main__ import main as cli_main
from loadtest.loadgen.dists import DistError
from loadtest.loadgen.runner import ConfigError, poisson_arrivals


class MockServer:
    """Streams `max_tokens` chunks `token_delay` apart; behaviour per request picked by `mode(body)`."""

    def __init__(self, token_delay: float = 0.002, mode=lambda body: "ok") -> None:
        self.token_delay = token_delay
        self.mode = mode
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "mock-model"}]})
        body = json.loads(request.content)
        self.bodies.append(body)
        mode = self.mode(body)
        if mode == "429":
            return httpx.Response(429, json={"error": {"message": "queue full", "type": "x", "param": None,
                                                       "code": 429}})
        if mode == "connect":
            raise httpx.ConnectError("refused", request=request)
        chat = request.url.path.endswith("/chat/completions")

        self.in_flight += 1  # counted from the request until its last chunk is produced
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        left = [True]

        def leave() -> None:
            if left[0]:
                left[0] = False
                self.in_flight -= 1

        async def stream():
            try:
                if chat:
                    yield _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                for i in range(body["max_tokens"]):
                    await asyncio.sleep(self.token_delay if mode != "slow" else 1.0)
                    if mode == "error_event" and i == 1:
                        leave()
                        yield _event({"error": {"message": "engine step failed", "type": "server_error",
                                                "param": None, "code": 500}})
                        break
                    text = f"t{i}\u2028\x85\r"  # line breaks for str.splitlines, not for SSE
                    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                    choice["finish_reason"] = "length" if i == body["max_tokens"] - 1 else None
                    yield _event({"choices": [choice]})
                    if mode == "truncated" and i == 1:
                        leave()
                        return
                yield _event({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
                leave()
                yield b"data: [DONE]\n\n"
            finally:
                leave()

        return httpx.Response(200, content=stream(), headers={"content-type": "text/event-stream"})

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _cfg(**kw) -> RunConfig:
    base = dict(url="http://127.0.0.1:9", num_requests=12, prompt_len=LengthDist("fixed", 8),
                output_len=LengthDist("fixed", 5), warmup=0, progress=False, timeout=10)
    return RunConfig(**(base | kw))


# -- distributions and workload --------------------------------------------------------------
def test_length_specs() -> None:
    rng = random.Random(0)
    assert LengthDist.parse("128").sample(rng) == 128
    assert str(LengthDist.parse("fixed:7")) == "7"
    u = LengthDist.parse("uniform:10:20")
    assert {u.sample(rng) for _ in range(500)} == set(range(10, 21))
    n = LengthDist.parse("normal:100:50:60:120")
    samples = [n.sample(rng) for _ in range(2000)]
    assert min(samples) == 60 and max(samples) == 120
    assert 90 < sum(samples) / len(samples) < 100  # clipped above more than below
    assert LengthDist.parse("normal:10:3").hi == 22
    for bad in ("0", "uniform:5:2", "normal:10", "gauss:1:2", "x", "uniform:a:b"):
        with pytest.raises(DistError):
            LengthDist.parse(bad)


def test_workload_is_seeded_and_points_get_their_own_prompts() -> None:
    a = build_workload(20, LengthDist.parse("uniform:4:40"), LengthDist.parse("normal:16:4"), seed=3, salt="p1")
    b = build_workload(20, LengthDist.parse("uniform:4:40"), LengthDist.parse("normal:16:4"), seed=3, salt="p1")
    c = build_workload(20, LengthDist.parse("uniform:4:40"), LengthDist.parse("normal:16:4"), seed=3, salt="p2")
    assert a == b
    assert [(s.prompt_len, s.output_len) for s in a] == [(s.prompt_len, s.output_len) for s in c]
    assert [s.prompt for s in a] != [s.prompt for s in c]
    assert all(len(s.prompt) == s.prompt_len and all(10 <= t < 1000 for t in s.prompt) for s in a)
    text = build_workload(3, LengthDist("fixed", 12), LengthDist("fixed", 4), seed=0, kind="text")
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == 12 for s in text)
    body = a[0].body("m", "completions", temperature=0.0, extra={"seed": 1})
    assert body["prompt"] == a[0].prompt and body["ignore_eos"] is True and body["stream"] is True
    assert body["max_tokens"] == a[0].output_len and body["seed"] == 1
    assert body["stream_options"] == {"include_usage": True}


def test_poisson_arrivals_are_seeded_at_the_asked_rate() -> None:
    a = poisson_arrivals(4000, 8.0, seed=1)
    assert a == poisson_arrivals(4000, 8.0, seed=1) and a != poisson_arrivals(4000, 8.0, seed=2)
    assert a[0] == 0.0 and all(x <= y for x, y in zip(a, a[1:]))
    assert 7.5 < (len(a) - 1) / a[-1] < 8.5
    assert poisson_arrivals(3, math.inf, seed=0) == [0.0, 0.0, 0.0]


def test_config_bounds() -> None:
    for kw in (dict(url="ftp://x"), dict(num_requests=0), dict(num_requests=10**6), dict(max_duration=0),
               dict(points=(LoadPoint("concurrency", 0),)), dict(points=(LoadPoint("rate", 0),)),
               dict(points=()), dict(endpoint="embeddings")):
        with pytest.raises(ConfigError):
            _cfg(**kw)


# -- profiles against the mock ---------------------------------------------------------------
def test_concurrency_profile_holds_concurrency_and_times_every_token() -> None:
    mock = MockServer(token_delay=0.01)
    result = asyncio.run(run(_cfg(points=(LoadPoint("concurrency", 4),)), transport=mock.transport))
    assert mock.max_in_flight == 4
    (point,) = result["points"]
    s = point["summary"]
    assert s["completed"] == 12 and s["failed"] == 0 and s["errors"] == {} and s["output_len_mismatch"] == 0
    assert s["total_output_tokens"] == 60
    assert result["config"]["model"] == "mock-model"  # picked from /v1/models
    for r in point["requests"]:
        assert r["ok"] and r["output_tokens"] == 5 and r["chunks"] == 5 and len(r["itl"]) == 4
        assert 0.005 < r["ttft"] < r["e2e"] and all(0.005 < x < 0.2 for x in r["itl"])
    assert 5 < s["itl_ms"]["p50"] < 100 and s["ttft_ms"]["p50"] <= s["e2e_ms"]["p50"]
    assert s["output_token_throughput"] == pytest.approx(60 / s["duration_s"])
    assert s["goodput"] == s["request_throughput"]  # no SLO: every success counts


def test_rate_profile_spaces_arrivals_and_caps_in_flight() -> None:
    mock = MockServer(token_delay=0.02)
    cfg = _cfg(points=(LoadPoint("rate", 1000.0, max_concurrency=2),), num_requests=6)
    result = asyncio.run(run(cfg, transport=mock.transport))
    assert mock.max_in_flight == 2
    assert result["points"][0]["summary"]["completed"] == 6
    mock = MockServer(token_delay=0.001)
    t0 = time.monotonic()
    asyncio.run(run(_cfg(points=(LoadPoint("rate", 20.0),), num_requests=8, seed=5), transport=mock.transport))
    assert time.monotonic() - t0 >= poisson_arrivals(8, 20.0, seed=5)[-1]


def test_sweep_runs_every_point_with_distinct_prompts() -> None:
    mock = MockServer()
    points = (LoadPoint("concurrency", 1), LoadPoint("concurrency", 3))
    result = asyncio.run(run(_cfg(points=points, num_requests=4, warmup=2), transport=mock.transport))
    assert [p["label"] for p in result["points"]] == ["concurrency=1", "concurrency=3"]
    assert len(mock.bodies) == 2 + 4 + 4
    prompts = [tuple(b["prompt"]) for b in mock.bodies]
    assert len(set(prompts)) == len(prompts)


def test_chat_endpoint_skips_the_role_chunk() -> None:
    mock = MockServer()
    result = asyncio.run(run(_cfg(endpoint="chat", num_requests=2), transport=mock.transport))
    assert all(b["messages"][0]["role"] == "user" for b in mock.bodies)
    for r in result["points"][0]["requests"]:
        assert r["ok"] and r["chunks"] == 5 and len(r["itl"]) == 4


def test_errors_are_reported_by_kind() -> None:
    kinds = {0: "429", 1: "connect", 2: "error_event", 3: "truncated", 4: "slow"}
    mock = MockServer()
    cfg = _cfg(num_requests=6, timeout=0.5, points=(LoadPoint("concurrency", 6),))
    specs = cfg.workload("concurrency=6")
    marker = {tuple(s.prompt): s.index for s in specs}
    mock.mode = lambda body: kinds.get(marker[tuple(body["prompt"])], "ok")
    result = asyncio.run(run(cfg, transport=mock.transport))
    s = result["points"][0]["summary"]
    assert s["errors"] == {"connection": 1, "http_429": 1, "stream_error": 2, "timeout": 1}
    assert s["completed"] == 1 and s["failed"] == 5
    assert s["error_samples"]["http_429"] == "queue full"
    assert "engine step failed" in s["error_samples"]["stream_error"] or "[DONE]" in s["error_samples"]["stream_error"]
    by_index = {r["index"]: r for r in result["points"][0]["requests"]}
    assert by_index[0]["status"] == 429 and by_index[3]["error"] == "the stream ended without [DONE]"


def test_max_duration_bounds_a_point() -> None:
    mock = MockServer(mode=lambda body: "slow")
    cfg = _cfg(num_requests=50, max_duration=0.5, timeout=60, points=(LoadPoint("concurrency", 2),))
    t0 = time.monotonic()
    result = asyncio.run(run(cfg, transport=mock.transport))
    assert time.monotonic() - t0 < 5
    s = result["points"][0]["summary"]
    assert s["cancelled_at_limit"] + s["completed"] + s["failed"] == 50
    assert s["cancelled_at_limit"] >= 48 and "cancelled" not in s["errors"]


def test_client_abort_is_not_an_error() -> None:
    from loadtest.loadgen import send

    mock = MockServer()
    spec = build_workload(1, LengthDist("fixed", 4), LengthDist("fixed", 10), seed=0)[0]

    async def go() -> RequestResult:
        async with httpx.AsyncClient(transport=mock.transport) as client:
            return await send(client, "http://x", spec, spec.body("m", "completions", temperature=0, extra=None),
                              abort_after=3)

    r = asyncio.run(go())
    assert r.aborted and r.chunks == 3 and not r.ok and r.error_kind is None
    assert summarize([r], 1.0)["aborted_by_client"] == 1 and summarize([r], 1.0)["failed"] == 0


# -- stats and reports -----------------------------------------------------------------------
def _result(i: int, ttft: float, itl: list[float], ok: bool = True) -> RequestResult:
    r = RequestResult(i, 8, len(itl) + 1, ok=ok, ttft=ttft, itl=itl, output_tokens=len(itl) + 1,
                      e2e=ttft + sum(itl), error_kind=None if ok else "http_500")
    return r


def test_summary_percentiles_and_goodput() -> None:
    results = [_result(i, ttft=0.1 * (i + 1), itl=[0.01] * 9) for i in range(10)]
    results.append(_result(10, ttft=0.05, itl=[0.01] * 8 + [0.5]))  # one slow gap: p95 of its ITL is high
    results.append(_result(11, 0.0, [], ok=False))
    s = summarize(results, duration_s=2.0, slo=SLO(ttft_ms=500, itl_p95_ms=100))
    assert s["completed"] == 11 and s["failed"] == 1 and s["errors"] == {"http_500": 1}
    assert s["ttft_ms"]["p50"] == pytest.approx(500.0) and s["ttft_ms"]["count"] == 11
    assert s["ttft_ms"]["p99"] == pytest.approx(990.0)
    assert s["good_requests"] == 5  # ttft 0.1..0.5 s; the 0.05 s one fails its ITL p95
    assert s["goodput"] == pytest.approx(2.5) and s["request_throughput"] == pytest.approx(5.5)
    assert s["tpot_ms"]["p50"] == pytest.approx(10.0)
    assert s["slo"] == "TTFT <= 500 ms and ITL p95 <= 100 ms"
    empty = summarize([], 1.0)
    assert empty["ttft_ms"]["p50"] is None and empty["request_throughput"] == 0


def test_report_files(tmp_path) -> None:
    mock = MockServer()
    points = (LoadPoint("rate", 50.0), LoadPoint("rate", math.inf))
    result = asyncio.run(run(_cfg(points=points, num_requests=4, slo=SLO(ttft_ms=1000)), transport=mock.transport))
    paths = report.write(result, tmp_path / "sub" / "run")
    assert sorted(p.name for p in paths.values()) == ["run.json", "run.md", "run.png"]
    assert json.loads(paths["json"].read_text())["points"][1]["value"] == "inf"
    md = paths["md"].read_text()
    assert "| rate=50/s | 4/4 | 0 |" in md and "| rate=inf/s |" in md and "TTFT <= 1000 ms" in md
    assert paths["png"].stat().st_size > 10_000
    single = asyncio.run(run(_cfg(num_requests=3), transport=mock.transport))
    assert report.write(single, tmp_path / "one.json")["png"].name == "one.png"


def test_cli_rejects_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["--prompt-len", "uniform:9:1"])
    with pytest.raises(SystemExit):
        cli_main(["--profile", "sweep"])
    assert cli_main(["--url", "gopher://x"]) == 2
    assert "http(s)" in capsys.readouterr().err


def test_parse_metrics() -> None:
    from loadtest.loadgen.procs import metric, parse_metrics

    text = ('# HELP vllm:num_requests_running x\n# TYPE vllm:num_requests_running gauge\n'
            'vllm:num_requests_running{engine="native",model_name="m"} 2.0\n'
            'vllm:num_requests_running{engine="native",model_name="n"} 1.0\n'
            'vllm:kv_cache_usage_perc{model_name="m"} 0.0\nplain_total 3\nbad_line\n')
    m = parse_metrics(text)
    assert m['vllm:num_requests_running{engine="native",model_name="m"}'] == 2.0 and m["plain_total"] == 3
    assert metric(m, "vllm:num_requests_running") == 3.0 and metric(m, "vllm:kv_cache_usage_perc") == 0.0
    assert metric(m, "vllm:num_requests_waiting") is None and metric(m, "plain") is None
