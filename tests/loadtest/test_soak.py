"""Soak: minutes of steady mixed traffic against a real `moe-serve` process, then SIGTERM.

    pytest -m soak tests/loadtest/test_soak.py      (MOE_SERVE_SOAK_SECONDS, default 150)

Traffic (loopback, bounded in time and in-flight requests): streamed and plain completions,
chat streams, clients that close their stream mid-way or give up before the first token, and
malformed or invalid requests. Checks: no 5xx at all (client side and in the server's own
`moe_http_requests_total`), every good request completes with exactly the tokens it asked for,
every bad one gets its 4xx in the OpenAI error shape, the KV cache and the queues are empty
afterwards (`vllm:kv_cache_usage_perc` 0), resident memory is flat, and SIGTERM with streams in
flight drains them and exits 0.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from loadtest.loadgen import send
from loadtest.loadgen.procs import ManagedServer, metric
from loadtest.loadgen.workload import RequestSpec
from tests.loadtest.helpers import TOKEN_RANGE

pytestmark = [pytest.mark.soak, pytest.mark.timeout(1200)]

SOAK_SECONDS = float(os.environ.get("MOE_SERVE_SOAK_SECONDS", "150"))
WORKERS = 6
MAX_MODEL_LEN = 256


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*TOKEN_RANGE) for _ in range(n)]


def _bad_request(rng: random.Random, model: str) -> tuple[str, str, Any, set[int]]:
    """(method, path, body (dict, or bytes sent raw), acceptable statuses)."""
    choice = rng.randrange(9)
    ok_body = {"model": model, "prompt": _ids(rng, 4), "max_tokens": 4}
    if choice == 0:
        return "POST", "/v1/completions", b'{"prompt": [1, 2', {400}
    if choice == 1:
        return "POST", "/v1/completions", ok_body | {"max_tokens": -1}, {400}
    if choice == 2:
        return "POST", "/v1/completions", ok_body | {"model": "no-such-model"}, {404}
    if choice == 3:
        return "POST", "/v1/completions", ok_body | {"prompt": [10, 99999]}, {400}
    if choice == 4:
        return "POST", "/v1/completions", ok_body | {"prompt": _ids(rng, MAX_MODEL_LEN + 10)}, {400}
    if choice == 5:
        return "POST", "/v1/chat/completions", {"model": model, "messages": "hello"}, {400}
    if choice == 6:
        return "GET", "/v1/completions", None, {405}
    if choice == 7:
        return "POST", "/v1/nothing-here", ok_body, {404}
    return "POST", "/v1/completions", ok_body | {"temperature": "hot"}, {400}


class Traffic:
    def __init__(self, url: str, model: str, seconds: float, seed: int = 0) -> None:
        self.url, self.model, self.seconds = url, model, seconds
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self.index = 0

    def fail(self, what: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(what)

    async def worker(self, client: httpx.AsyncClient, deadline: float) -> None:
        while time.monotonic() < deadline:
            self.index += 1
            kind = self.rng.choices(["stream", "plain", "chat", "abort", "give_up", "bad"],
                                    weights=[45, 10, 10, 15, 5, 15])[0]
            self.counts[kind] += 1
            try:
                await getattr(self, kind)(client, self.index)
            except Exception as e:  # noqa: BLE001 - a soak records every surprise
                self.fail(f"{kind}: {type(e).__name__}: {e}")

    def _spec(self, i: int) -> RequestSpec:
        p, o = self.rng.randint(4, 96), self.rng.randint(1, 48)
        return RequestSpec(i, p, o, _ids(self.rng, p))

    def _body(self, spec: RequestSpec) -> dict[str, Any]:
        return spec.body(self.model, "completions", temperature=self.rng.choice([0.0, 0.8]), extra=None)

    async def stream(self, client: httpx.AsyncClient, i: int) -> None:
        spec = self._spec(i)
        r = await send(client, self.url, spec, self._body(spec), timeout=120)
        self.statuses[r.status or 0] += 1
        if not r.ok or r.output_tokens != spec.output_len:
            self.fail(f"stream {i}: {r.error_kind} {r.error} tokens {r.output_tokens}/{spec.output_len}")

    async def chat(self, client: httpx.AsyncClient, i: int) -> None:
        spec = self._spec(i)
        spec = RequestSpec(i, spec.prompt_len, spec.output_len, "soak test " * self.rng.randint(1, 20))
        r = await send(client, self.url, spec, spec.body(self.model, "chat", temperature=0.0, extra=None),
                       endpoint="chat", timeout=120)
        self.statuses[r.status or 0] += 1
        if not r.ok or r.output_tokens != spec.output_len:
            self.fail(f"chat {i}: {r.error_kind} {r.error} tokens {r.output_tokens}/{spec.output_len}")

    async def plain(self, client: httpx.AsyncClient, i: int) -> None:
        spec = self._spec(i)
        body = self._body(spec) | {"stream": False}
        body.pop("stream_options")
        r = await client.post(self.url + "/v1/completions", json=body, timeout=120)
        self.statuses[r.status_code] += 1
        if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != spec.output_len:
            self.fail(f"plain {i}: {r.status_code} {r.text[:200]}")

    async def abort(self, client: httpx.AsyncClient, i: int) -> None:
        """Read a few tokens of a long stream, then hang up."""
        spec = self._spec(i)
        spec = RequestSpec(i, spec.prompt_len, 120, spec.prompt)
        r = await send(client, self.url, spec, self._body(spec), timeout=120, abort_after=self.rng.randint(1, 6))
        self.statuses[r.status or 0] += 1
        if not r.aborted:
            self.fail(f"abort {i}: not aborted: {r.error_kind} {r.error}")

    async def give_up(self, client: httpx.AsyncClient, i: int) -> None:
        """Hang up before (or just after) the first token."""
        spec = self._spec(i)
        r = await send(client, self.url, spec, self._body(spec), timeout=self.rng.uniform(0.001, 0.05))
        if r.status:
            self.statuses[r.status] += 1

    async def bad(self, client: httpx.AsyncClient, i: int) -> None:
        method, path, body, expected = _bad_request(self.rng, self.model)
        kw: dict[str, Any] = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(
            body, bytes) else ({"json": body} if body is not None else {})
        r = await client.request(method, self.url + path, timeout=30, **kw)
        self.statuses[r.status_code] += 1
        if r.status_code not in expected:
            self.fail(f"bad {path} {str(body)[:80]}: {r.status_code} (expected {expected}) {r.text[:200]}")
            return
        err = r.json().get("error", {})
        if set(err) != {"message", "type", "param", "code"}:
            self.fail(f"bad {path}: not the OpenAI error shape: {r.text[:200]}")

    async def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        limits = httpx.Limits(max_connections=WORKERS * 2)
        async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
            await asyncio.gather(*(self.worker(client, deadline) for _ in range(WORKERS)))


class RssSampler(threading.Thread):
    def __init__(self, server: ManagedServer, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.wait(self.interval):
            rss = self.server.rss_kib()
            if rss is not None:
                self.samples.append((time.monotonic() - t0, rss))


def _wait_idle(server: ManagedServer, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (metric(m, "vllm:num_requests_running") == 0 and metric(m, "vllm:num_requests_waiting") == 0
                and metric(m, "vllm:kv_cache_usage_perc") == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.25)


def _server_5xx(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if k.startswith("moe_http_requests_total{") and 'status="5' in k and v}


def test_soak_mixed_traffic_then_sigterm(tiny_mixtral, start_server) -> None:
    server = start_server(tiny_mixtral, "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8",
                          "--drain-timeout", "60", name="soak")
    model = httpx.get(server.url + "/v1/models", timeout=10).json()["data"][0]["id"]
    asyncio.run(Traffic(server.url, model, seconds=5, seed=99).run())  # warm-up (allocator, caches)
    rss = RssSampler(server)
    rss.start()
    traffic = Traffic(server.url, model, SOAK_SECONDS)
    t0 = time.monotonic()
    asyncio.run(traffic.run())
    elapsed = time.monotonic() - t0
    rss.stop.set()
    rss.join()
    print(f"\nsoak: {elapsed:.0f}s, {sum(traffic.counts.values())} requests {dict(traffic.counts)}, "
          f"statuses {dict(traffic.statuses)}")

    problems: list[str] = []  # every check runs (a soak is expensive); all failures reported at the end

    def check(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    check(not traffic.failures, "requests that went wrong:\n  " + "\n  ".join(traffic.failures))
    check(not [s for s in traffic.statuses if s >= 500], f"5xx answers: {dict(traffic.statuses)}")
    check(traffic.counts["stream"] > 50 and traffic.counts["abort"] > 10 and traffic.counts["bad"] > 10,
          f"too little traffic: {dict(traffic.counts)}")

    # the engine is empty again: nothing running or waiting, every KV block back in the pool (one
    # last plain request makes the engine step, so the gauges are fresh after the last aborts)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [11, 12], "max_tokens": 2}, timeout=30)
    check(r.status_code == 200, f"a plain request after the soak: {r.status_code} {r.text[:200]}")
    m = _wait_idle(server)
    running, waiting = metric(m, "vllm:num_requests_running"), metric(m, "vllm:num_requests_waiting")
    check(running == 0 and waiting == 0, f"requests left in the engine: running {running}, waiting {waiting}")
    check(metric(m, "vllm:kv_cache_usage_perc") == 0, f"KV blocks leaked: {metric(m, 'vllm:kv_cache_usage_perc')}")
    check(not _server_5xx(m), f"the server counted 5xx answers (no client saw them): {_server_5xx(m)}")

    # resident memory is flat: the last third of the run is within 10% (or 32 MiB) of the first
    third = max(1, len(rss.samples) // 3)
    first = statistics.median(v for _, v in rss.samples[:third])
    last = statistics.median(v for _, v in rss.samples[-third:])
    print(f"soak: RSS first third {first / 1024:.0f} MiB, last third {last / 1024:.0f} MiB, "
          f"max {max(v for _, v in rss.samples) / 1024:.0f} MiB")
    check(last - first < max(0.10 * first, 32 * 1024), f"RSS grew from {first} KiB to {last} KiB")

    # SIGTERM with streams in flight: they finish (drain), then the process exits 0
    results: list = []

    async def inflight() -> None:
        async with httpx.AsyncClient(trust_env=False) as client:
            specs = [RequestSpec(i, 8, 64, [20 + i] * 8) for i in range(4)]
            tasks = [asyncio.create_task(send(client, server.url, s, s.body(model, "completions", temperature=0,
                                                                             extra=None), timeout=120))
                     for s in specs]
            await asyncio.sleep(0.3)
            server.send_signal(signal.SIGTERM)
            results.extend(await asyncio.gather(*tasks))

    asyncio.run(inflight())
    check(all(r.ok and r.output_tokens == 64 for r in results),
          f"streams in flight at SIGTERM: {[(r.error_kind, r.error, r.output_tokens) for r in results]}")
    code = server.wait(90)
    check(code == 0, f"exit code {code} after SIGTERM:\n{server.log_tail(1500)}")
    assert not problems, "\n".join(problems)
