"""Hardening issue 25, items 1 and 2: grammar compiles that stalled every request, and a compiled-
grammar cache bounded by count instead of bytes. A real server with one compile process, a 2 s
compile budget and a 16 MiB cache (so one grammar may take 4 MiB)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import ServerProcess, start_server

MODEL = "tiny-mixtral"
BUDGET = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(["--max-model-len", "256", "--num-kv-blocks", "256", "--max-num-seqs", "16", "--seed", "0",
                      "--grammar-compile-timeout", str(BUDGET), "--grammar-cache-memory", "16MiB",
                      "--grammar-compile-workers", "1", "--drain-timeout", "5"],
                     tmp_path_factory.mktemp("grammar-compile"))
    yield s
    assert s.stop() == 0, s.logs()[-3000:]


def _optional_properties(n: int, prefix: str = "p") -> dict:
    return {"type": "object", "properties": {f"{prefix}{i}": {"type": "integer"} for i in range(n)}}


def _slow_grammar(n: int, prefix: str) -> str:
    """xgrammar's own EBNF for `n` optional properties (~140 chars each): a grammar (no schema
    limits apply to EBNF) whose compile takes minutes for n = 1,600."""
    import xgrammar as xgr

    return str(xgr.Grammar.from_json_schema(json.dumps(_optional_properties(n, prefix)), any_whitespace=False))


def _post(server: ServerProcess, body: dict, timeout: float = 60) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "max_tokens": 5, "prompt": "x", **body},
                   timeout=timeout)
    return r, time.monotonic() - start


class Probe:
    """/health, /tokenize and a small completion, over and over, in a thread; worst latencies."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.worst = {"health": 0.0, "tokenize": 0.0, "completion": 0.0}
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=60) as c:
            while not self._stop.is_set():
                for name, call in (("health", lambda: c.get("/health")),
                                   ("tokenize", lambda: c.post("/tokenize", json={"prompt": "The list data type"})),
                                   ("completion", lambda: c.post("/v1/completions", json={
                                       "model": MODEL, "prompt": "The os module", "max_tokens": 4}))):
                    start = time.monotonic()
                    assert call().status_code == 200
                    self.worst[name] = max(self.worst[name], time.monotonic() - start)
                self.rounds += 1

    def __enter__(self) -> Probe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(60)


def test_slow_schemas_are_refused_or_stopped_while_everything_else_answers(server: ServerProcess) -> None:
    """Item 1: 1,600 optional properties compiled for ~50 s on the tokenizer thread every request
    uses: a 3-token completion took 9.65 s, /tokenize 31.8 s. Now: refused before compiling
    (size limit), or stopped at the time budget in a compile process; /health under 1 s and the
    other requests' latency bounded meanwhile; a stopped spec is refused at once when resent."""
    httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                     "guided_choice": ["warm"]}, timeout=120)  # compile process up
    with Probe(server) as probe:
        r, took = _post(server, {"guided_json": _optional_properties(1600)}, timeout=30)
        assert r.status_code == 400 and took < 1.0, (r.text, took)
        err = r.json()["error"]
        assert err["param"] == "guided_json" and "1600 optional properties" in err["message"]

        grammar = _slow_grammar(1600, "p")
        running = []
        watcher = threading.Thread(target=lambda: (time.sleep(BUDGET / 2), running.append(
            server.metric("moe_grammar_compiles_running"))))
        watcher.start()
        r, took = _post(server, {"guided_grammar": grammar}, timeout=30)
        watcher.join()
        # the budget is CPU time: on a busy machine the wall time may be longer (at most 3x + 5 s)
        assert r.status_code == 400 and BUDGET <= took < 3 * BUDGET + 6, (r.text, took)
        err = r.json()["error"]
        assert err["param"] == "guided_grammar" and "2 s budget" in err["message"], err
        assert running == [1.0]
        r, took = _post(server, {"guided_grammar": grammar}, timeout=30)  # remembered: no second compile
        assert r.status_code == 400 and took < 0.5 and "budget" in r.json()["error"]["message"]
    assert probe.rounds >= 3
    assert probe.worst["health"] < 1.0, probe.worst
    assert probe.worst["tokenize"] < 1.0 and probe.worst["completion"] < 3.0, probe.worst
    assert server.metric("moe_grammar_compiles_running") == 0


def test_a_queued_compile_whose_client_left_is_dropped(server: ServerProcess) -> None:
    """Item 1, cancellation: the one compile process is busy; a second slow spec waits in the
    queue; its client disconnects: it leaves the queue at once and is never compiled."""
    counts = _compile_counts(server)
    busy = threading.Thread(target=_post, args=(server, {"guided_grammar": _slow_grammar(1500, "q")}), daemon=True)
    busy.start()
    deadline = time.monotonic() + 10
    while server.metric("moe_grammar_compiles_running") != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up: the connection closes
        _post(server, {"guided_grammar": _slow_grammar(1500, "r")}, timeout=0.5)
    start = time.monotonic()
    while server.metric("moe_grammar_compiles_waiting") != 0 and time.monotonic() - start < 5:
        time.sleep(0.05)
    assert time.monotonic() - start < 1.0  # dropped as soon as the disconnect was seen
    assert server.metric("moe_grammar_compiles_running") == 1  # the first one still runs
    busy.join(30)
    after = _compile_counts(server)
    assert sum(after.values()) - sum(counts.values()) == 1 and after["timeout"] == counts["timeout"] + 1


def _compile_counts(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("moe_grammar_compile_duration_seconds_count{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


def _alternatives(n: int, seed: int) -> dict:
    """A string schema whose pattern has `n` alternatives (~1.3 MiB compiled per 1,000)."""
    rng = random.Random(seed)
    words = sorted({"".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(9)) for _ in range(n)})
    return {"type": "string", "pattern": "^(" + "|".join(words) + ")$"}


def test_grammar_cache_is_bounded_by_bytes(server: ServerProcess) -> None:
    """Item 2: the cache kept 256 grammars whatever their size (one 240 KB pattern schema: ~67 MB;
    70 of them grew RSS by 4.6 GB). Now: at most --grammar-cache-memory bytes, and one grammar
    over a quarter of it is a 400 naming the limit."""
    r, _ = _post(server, {"guided_json": _alternatives(6000, 0)})  # ~6 MiB compiled > 4 MiB
    assert r.status_code == 400, r.text[:200]
    err = r.json()["error"]
    assert err["param"] == "guided_json" and "the limit is 4 MiB" in err["message"], err
    highest = 0.0
    for seed in range(1, 16):  # 15 distinct grammars of ~1.3 MiB: ~20 MiB in all
        r, _ = _post(server, {"guided_json": _alternatives(1000, seed), "max_tokens": 3})
        assert r.status_code == 200, r.text[:200]
        highest = max(highest, server.metric("moe_grammar_cache_bytes"))
    assert 8 * 2**20 < highest <= 16 * 2**20
    r, _ = _post(server, {"guided_json": _alternatives(1000, 15), "max_tokens": 3})  # the latest is still kept
    assert r.status_code == 200


def test_a_compiled_grammar_is_freed_once_nothing_holds_it(tiny_mixtral) -> None:
    """Item 2: RSS still crept ~7 MB per big grammar with the cache bounded: a reference cycle
    (job -> future -> callback -> flight -> job) kept each compiled grammar until a full garbage
    collection. Freed by reference counting now, as soon as the cache drops it."""
    import asyncio
    import gc
    import weakref

    from transformers import AutoTokenizer

    from server.engine.structured.limits import GrammarLimits
    from server.engine.structured.service import GrammarService
    from server.engine.structured.spec import json_schema_spec

    service = GrammarService(AutoTokenizer.from_pretrained(tiny_mixtral), 320, (1,),
                             GrammarLimits(timeout=30, cache_bytes=4 * 2**20, workers=1))
    spec = json_schema_spec({"type": "object", "properties": {"a": {"type": "integer"}}}, "guided_json")

    async def compile_once() -> weakref.ref:
        compiled = await service.compile(spec)
        return weakref.ref(compiled.grammar)

    gc.disable()
    try:
        ref = asyncio.run(compile_once())
        deadline = time.monotonic() + 10
        while service.running and time.monotonic() < deadline:  # the pool's thread winds down
            time.sleep(0.01)
        assert ref() is not None  # kept by the cache
        service.cache = type(service.cache)(service.cache.max_bytes)  # the cache lets go of it
        assert ref() is None
    finally:
        gc.enable()
        service.close()
