"""Grammar compilation and masks: compiled on the API's tokenizer thread (never the engine
thread) and once per distinct spec; the bitmask applied in the sampler touches only its rows."""

from __future__ import annotations

import asyncio
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
from server.engine.structured.spec import choice_spec, grammar_spec, json_schema_spec, regex_spec

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def tokenizer(tiny_mixtral):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_mixtral)


def test_cache_compiles_each_distinct_spec_once_and_caches_errors(tokenizer) -> None:
    compiler = GrammarCompiler(tokenizer, 320, (1,))
    cache = GrammarCache(compiler, capacity=2)
    a1 = cache.get(json_schema_spec(SCHEMA, "response_format.json_schema.schema"))
    a2 = cache.get(json_schema_spec('{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}',
                                    "guided_json"))  # the same schema, as text, from another field
    assert compiler.num_compiles == 1 and a1.grammar is a2.grammar and a2.spec.param == "guided_json"
    for _ in range(2):
        with pytest.raises(GrammarError) as e:
            cache.get(regex_spec("(ab", "structured_outputs.regex"))
        assert e.value.param == "structured_outputs.regex" and e.value.message.startswith("structured_outputs.regex:")
    with pytest.raises(GrammarError) as e:  # the cached failure, renamed for the field that sent it now
        cache.get(regex_spec("(ab", "guided_regex"))
    assert e.value.param == "guided_regex" and e.value.message.startswith("guided_regex:")
    assert compiler.num_compiles == 2
    cache.get(choice_spec(["x"], "guided_choice"))  # capacity 2: the schema (least recent) goes
    cache.get(json_schema_spec(SCHEMA, "guided_json"))
    assert compiler.num_compiles == 4 and len(cache) == 2


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


def test_compile_runs_on_the_tokenizer_thread_never_the_engine_thread(tiny_mixtral, monkeypatch) -> None:
    from server.app import create_app
    from server.config import EngineConfig, ServerConfig
    from server.engine.factory import build_engine

    threads: list[str] = []
    real = GrammarCompiler.compile

    def spy(self, spec):
        threads.append(threading.current_thread().name)
        return real(self, spec)

    monkeypatch.setattr(GrammarCompiler, "compile", spy)
    cfg = EngineConfig(model=tiny_mixtral, dtype="float32", max_model_len=256, num_kv_blocks=64)
    engine = build_engine(cfg)
    app = create_app(engine, ServerConfig(engine=cfg))
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}

    async def run() -> list[int]:
        await engine.start()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1",
                                         timeout=60) as c:
                bodies = [{"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 30,
                           "response_format": fmt} for i in range(3)]
                bodies.append({"prompt": "x", "max_tokens": 30, "guided_json": SCHEMA})
                bodies.append({"prompt": "x", "max_tokens": 5, "guided_choice": ["p", "q"]})
                rs = await asyncio.gather(*(c.post("/v1/chat/completions" if "messages" in b else "/v1/completions",
                                                   json=b) for b in bodies))
                return [r.status_code for r in rs]
        finally:
            await engine.shutdown()
            app.state.serving.close()

    assert asyncio.run(run()) == [200] * 5
    assert threads and all(t.startswith("tokenizer") for t in threads), threads
    assert len(threads) == 2  # one schema (four requests, two spellings) and one choice list
    assert app.state.serving.grammar_cache.hits == 3
