"""Run load profiles: fixed concurrency, fixed request rate (seeded Poisson arrivals), sweeps.

Every point of a run sends the same seeded request lengths (with prompts of its own, so no
point reuses another's prefix cache), so points differ only in load. A run is
bounded: at most `num_requests` per point, and a point stops at `max_duration` seconds (requests
not yet sent are not sent, those in flight are cancelled and counted as `cancelled`, never as
server errors). The generator talks only to the one base URL it is given.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import httpx

from loadtest.loadgen.client import RequestResult, send
from loadtest.loadgen.dists import LengthDist
from loadtest.loadgen.stats import SLO, summarize
from loadtest.loadgen.workload import RequestSpec, build_workload

MAX_REQUESTS = 100_000
MAX_DURATION_S = 24 * 3600.0
MAX_CONCURRENCY = 4096
MAX_POINTS = 32


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class LoadPoint:
    kind: str  # concurrency | rate
    value: float  # workers, or requests/s (math.inf: all at once)
    max_concurrency: int | None = None  # rate points: cap on requests in flight

    @property
    def label(self) -> str:
        if self.kind == "concurrency":
            return f"concurrency={int(self.value)}"
        rate = "inf" if math.isinf(self.value) else f"{self.value:g}"
        cap = f" (max {self.max_concurrency} in flight)" if self.max_concurrency else ""
        return f"rate={rate}/s{cap}"


@dataclass(frozen=True)
class RunConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first model /v1/models lists
    endpoint: str = "completions"  # completions | chat
    points: tuple[LoadPoint, ...] = (LoadPoint("concurrency", 1),)
    num_requests: int = 64
    max_duration: float = 600.0
    timeout: float = 300.0
    prompt_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 128))
    output_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 128))
    prompt_kind: str = "ids"  # ids | text (chat always sends text)
    token_range: tuple[int, int] = (10, 1000)
    seed: int = 0
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)
    api_key: str | None = None
    warmup: int = 2
    slo: SLO = field(default_factory=SLO)
    progress: bool = True
    salt: str = ""  # mixed into every point's prompt contents (repeated runs of one point differ)

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--url must be http(s)://host[:port], not {self.url!r}")
        if self.endpoint not in ("completions", "chat"):
            raise ConfigError("endpoint must be 'completions' or 'chat'")
        if not 1 <= self.num_requests <= MAX_REQUESTS:
            raise ConfigError(f"--num-requests must be within 1..{MAX_REQUESTS}")
        if not 0 < self.max_duration <= MAX_DURATION_S:
            raise ConfigError(f"--max-duration must be within (0, {MAX_DURATION_S:g}] seconds")
        if self.timeout <= 0:
            raise ConfigError("--timeout must be > 0")
        if not 1 <= len(self.points) <= MAX_POINTS:
            raise ConfigError(f"a run has 1..{MAX_POINTS} load points")
        for p in self.points:
            if p.kind == "concurrency" and not 1 <= p.value <= MAX_CONCURRENCY:
                raise ConfigError(f"concurrency must be within 1..{MAX_CONCURRENCY}")
            if p.kind == "rate" and not p.value > 0:
                raise ConfigError("request rate must be > 0 (inf: all at once)")
            if p.max_concurrency is not None and not 1 <= p.max_concurrency <= MAX_CONCURRENCY:
                raise ConfigError(f"--max-concurrency must be within 1..{MAX_CONCURRENCY}")
        if self.warmup < 0:
            raise ConfigError("--warmup must be >= 0")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def workload(self, salt: str, n: int | None = None) -> list[RequestSpec]:
        kind = "text" if self.endpoint == "chat" else self.prompt_kind
        return build_workload(self.num_requests if n is None else n, self.prompt_len, self.output_len,
                              seed=self.seed, kind=kind, token_range=self.token_range, salt=salt)


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of `n` requests at `rate`/s; the first goes at 0."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, dynamic_ncols=True, leave=True)


async def _resolve_model(client: httpx.AsyncClient, cfg: RunConfig) -> str:
    """Check the server answers (for up to 10 s) and pick the model when none was given."""
    deadline = time.monotonic() + 10
    while True:
        try:
            r = await client.get(cfg.url.rstrip("/") + "/v1/models", headers=cfg.headers, timeout=10)
            r.raise_for_status()
            break
        except (httpx.HTTPError, OSError) as e:
            if time.monotonic() > deadline:
                raise ConfigError(f"the server at {cfg.url} does not answer /v1/models: {e}") from None
            await asyncio.sleep(0.5)
    if cfg.model:
        return cfg.model
    data = r.json().get("data") or []
    if not data:
        raise ConfigError(f"{cfg.url}/v1/models lists no model; pass --model")
    return data[0]["id"]


async def run_point(client: httpx.AsyncClient, cfg: RunConfig, model: str, point: LoadPoint,
                    specs: list[RequestSpec], desc: str = "") -> tuple[list[RequestResult], float]:
    """Send `specs` at this load; returns the results and the measured duration (s)."""
    bodies = [s.body(model, cfg.endpoint, temperature=cfg.temperature, extra=cfg.extra_body) for s in specs]
    results: list[RequestResult] = []
    bar = _progress(len(specs), desc or point.label, cfg.progress)
    t_zero = time.perf_counter()
    deadline = t_zero + cfg.max_duration
    last_end = t_zero
    errors = 0

    async def one(i: int) -> None:
        nonlocal last_end, errors
        r = await send(client, cfg.url, specs[i], bodies[i], endpoint=cfg.endpoint, timeout=cfg.timeout,
                       t_zero=t_zero, headers=cfg.headers)
        results.append(r)
        last_end = time.perf_counter()
        errors += not r.ok
        bar.update(1)
        if errors:
            bar.set_postfix(errors=errors)

    tasks: list[asyncio.Task[None]] = []
    if point.kind == "concurrency":
        it = iter(range(len(specs)))

        async def worker() -> None:
            for i in it:
                if time.perf_counter() >= deadline:
                    return
                await one(i)

        tasks = [asyncio.create_task(worker()) for _ in range(int(point.value))]
    else:
        sem = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None
        arrivals = poisson_arrivals(len(specs), point.value, cfg.seed)

        async def arrive(i: int) -> None:
            await asyncio.sleep(max(0.0, t_zero + arrivals[i] - time.perf_counter()))
            if time.perf_counter() >= deadline:
                return
            if sem is None:
                return await one(i)
            async with sem:
                await one(i)

        tasks = [asyncio.create_task(arrive(i)) for i in range(len(specs))]
    try:
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.perf_counter()))
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        bar.close()
    sent = {r.index for r in results}
    for s in specs:  # in flight at the time limit, or never sent
        if s.index not in sent:
            results.append(RequestResult(s.index, s.prompt_len, s.output_len, error_kind="cancelled",
                                         error="run time limit (--max-duration) reached"))
    results.sort(key=lambda r: r.index)
    return results, max(last_end - t_zero, 1e-9)


async def run(cfg: RunConfig, transport: httpx.AsyncBaseTransport | None = None) -> dict[str, Any]:
    """Warm up, run every point, return the JSON-able results (config, per-point summaries).

    `transport`: an httpx transport to use instead of the network (tests)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout, connect=10.0), limits=limits,
                                 trust_env=False, transport=transport) as client:
        model = await _resolve_model(client, cfg)
        if cfg.warmup:
            warm_cfg = replace(cfg, progress=False)
            await run_point(client, warm_cfg, model, LoadPoint("concurrency", min(cfg.warmup, 4)),
                            cfg.workload("warmup", n=cfg.warmup))
        points = []
        for k, point in enumerate(cfg.points):
            desc = point.label if len(cfg.points) == 1 else f"[{k + 1}/{len(cfg.points)}] {point.label}"
            specs = cfg.workload(cfg.salt + point.label)
            results, duration = await run_point(client, cfg, model, point, specs, desc)
            points.append({"kind": point.kind, "value": _json_num(point.value), "label": point.label,
                           "max_concurrency": point.max_concurrency,
                           "summary": summarize(results, duration, cfg.slo),
                           "requests": [r.to_json() for r in results]})
    return {"config": config_json(cfg, model), "points": points}


def _json_num(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


def config_json(cfg: RunConfig, model: str) -> dict[str, Any]:
    return {"url": cfg.url, "model": model, "endpoint": cfg.endpoint, "num_requests": cfg.num_requests,
            "max_duration_s": cfg.max_duration, "timeout_s": cfg.timeout, "prompt_len": str(cfg.prompt_len),
            "output_len": str(cfg.output_len), "prompt_kind": "text" if cfg.endpoint == "chat" else cfg.prompt_kind,
            "token_range": list(cfg.token_range), "seed": cfg.seed, "temperature": cfg.temperature,
            "extra_body": cfg.extra_body, "warmup": cfg.warmup, "slo": cfg.slo.describe(),
            "points": [p.label for p in cfg.points]}
