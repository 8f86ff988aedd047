"""Grammar compilation and masks: compiled on the API's tokenizer thread (never the engine
thread) and once per distinct spec; the bitmask applied in the sampler touches only its rows."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading

import httpx
import pytest
import torch
import xgrammar as xgr

from server.engine.native.sampler import Sampler, SamplingRow
from server.engine.request import SamplingParams
from server.engine.structured.backend import GrammarCompiler, GrammarError
from server.engine.structured.cache import GrammarCache
from server.engine.structured.mask import apply_bitmask
from server.engine.structured.spec import grammar_spec, json_schema_spec, regex_spec

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def tokenizer(tiny_mixtral):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_mixtral)


def test_cache_keeps_grammars_by_bytes_and_failures_renamed(tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, 320, (1,))
    a = compiler.compile(json_schema_spec(SCHEMA, "response_format.json_schema.schema"))
    assert a.nbytes == a.grammar.memory_size_bytes > 0
    cache = GrammarCache(max_bytes=2**20)
    cache.put(a.spec, a)
    same = cache.lookup(json_schema_spec('{"type": "object", "properties": {"a": {"type": "integer"}}, '
                                         '"required": ["a"]}', "guided_json"))  # the same schema, as text
    assert same.grammar is a.grammar and same.spec.param == "guided_json"
    bad = regex_spec("(ab", "structured_outputs.regex")
    with pytest.raises(GrammarError) as e:
        compiler.compile(bad)
    cache.put(bad, e.value)
    with pytest.raises(GrammarError) as e:  # the kept failure, renamed for the field that sent it now
        cache.lookup(regex_spec("(ab", "guided_regex"))
    assert e.value.param == "guided_regex" and e.value.message.startswith("guided_regex:")
    # bounded by bytes: room for two grammars of this size, not three
    specs = [json_schema_spec({**SCHEMA, "title": f"t{i}"}, "guided_json") for i in range(3)]
    grammars = [compiler.compile(s) for s in specs]
    weight = max(g.nbytes + len(g.spec.value) for g in grammars)
    cache = GrammarCache(max_bytes=int(2.5 * weight))
    for g in grammars:
        cache.put(g.spec, g)
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.lookup(specs[0]) is None and cache.lookup(specs[2]) is not None  # least recent went first
    cache.put(specs[0], dataclasses.replace(grammars[0], nbytes=cache.max_bytes + 1))  # never kept
    assert cache.lookup(specs[0]) is None


def test_bad_grammars_name_their_field(tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, 320)
    for spec in (json_schema_spec({"type": "integer", "minimum": 5, "maximum": 1}, "guided_json"),
                 grammar_spec("root ::= missing", "guided_grammar"), regex_spec("(?<=a)b", "guided_regex")):
        with pytest.raises(GrammarError) as e:
            compiler.compile(spec)
        assert e.value.param == spec.param and "[" not in e.value.message.split(":")[1][:3]


def test_torch_mask_path_equals_xgrammar_kernel(tokenizer) -> None:
    torch.manual_seed(0)
    compiled = GrammarCompiler(tokenizer, 320).compile(regex_spec("[a-f]{2}[0-9]", "r"))
    matcher = xgr.GrammarMatcher(compiled.grammar)
    bitmask = torch.empty(2, 10, dtype=torch.int32)
    matcher.fill_next_token_bitmask(bitmask, 0)
    matcher.accept_token(tokenizer.convert_tokens_to_ids("a"))
    matcher.fill_next_token_bitmask(bitmask, 1)
    logits = torch.randn(5, 320)
    rows = torch.tensor([1, 3])
    cpu = logits.clone()
    apply_bitmask(cpu, rows, bitmask)
    generic = logits.clone().to(torch.float64)  # not float32: the torch path (as on GPUs)
    apply_bitmask(generic, rows, bitmask)
    assert torch.equal(cpu.isinf(), generic.isinf())
    assert torch.equal(cpu[[0, 2, 4]], logits[[0, 2, 4]])  # other rows untouched
    allowed = (~cpu[1].isinf()).nonzero().flatten().tolist()
    assert allowed and all(tokenizer.decode([t])[0] in "abcdef" for t in allowed)


def test_sampler_mask_constrains_only_its_rows() -> None:
    sampler = Sampler(320)
    logits = torch.randn(3, 320)
    rows = [SamplingRow(SamplingParams(temperature=0.0), None, [2], [], (1,)) for _ in range(3)]
    bitmask = torch.zeros(1, 10, dtype=torch.int32)
    bitmask[0, 7] = 1 << 3  # only token 7 * 32 + 3 = 227
    free = sampler(logits, rows)
    masked = sampler(logits, rows, (torch.tensor([1]), bitmask))
    assert masked.token_ids[1] == 227
    assert masked.token_ids[0] == free.token_ids[0] and masked.token_ids[2] == free.token_ids[2]
    assert not logits.isinf().any()  # the caller's logits are not modified


def test_compile_runs_in_compile_processes_never_the_tokenizer_or_engine_thread(tiny_mixtral, monkeypatch) -> None:
    """Each distinct spec is tried in a compile process (killable), then compiled once more on a
    compile-pool thread of the server; never on the tokenizer thread or the engine's."""
    from server.app import create_app
    from server.config import EngineConfig, ServerConfig
    from server.engine.factory import build_engine

    threads: list[str] = []
    real = GrammarCompiler.compile

    def spy(self, spec):
        threads.append(threading.current_thread().name)
        return real(self, spec)

    monkeypatch.setattr(GrammarCompiler, "compile", spy)  # this process only (the compile processes fork clean)
    cfg = EngineConfig(model=tiny_mixtral, dtype="float32", max_model_len=256, num_kv_blocks=64)
    engine = build_engine(cfg)
    app = create_app(engine, ServerConfig(engine=cfg))
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}

    async def run() -> tuple[list[int], list[int]]:
        await engine.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1",
                                         timeout=120) as c:
                bodies = [{"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 30,
                           "response_format": fmt} for i in range(3)]
                bodies.append({"prompt": "x", "max_tokens": 30, "guided_json": SCHEMA})
                bodies.append({"prompt": "x", "max_tokens": 5, "guided_choice": ["p", "q"]})
                rs = await asyncio.gather(*(c.post("/v1/chat/completions" if "messages" in b else "/v1/completions",
                                                   json=b) for b in bodies))
                return [r.status_code for r in rs], app.state.serving.grammars.pool.worker_pids()
        finally:
            await engine.shutdown()
            app.state.serving.close()

    statuses, pids = asyncio.run(run())
    assert statuses == [200] * 5
    assert pids and os.getpid() not in pids
    # one schema (four requests, two spellings) and one choice list, each compiled once here
    assert len(threads) == 2 and all(t.startswith("grammar-compile-") for t in threads), threads
