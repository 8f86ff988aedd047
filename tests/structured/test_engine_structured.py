"""The native engine with grammars: constrained rows follow their grammar, batch with
unconstrained ones in the same steps and leave their outputs unchanged; the grammar's end stops
a sequence ("stop"), the budget inside it is "length"; n > 1 forks matchers; a reasoning gate
holds the grammar back until its tokens were produced."""

from __future__ import annotations

import json
import re

import jsonschema

from loadtest.schemas import RECORD_SCHEMA
from server.engine.request import EngineRequest, SamplingParams
from server.engine.structured.spec import choice_spec, json_schema_spec, regex_spec

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _prompts(llm, n: int) -> list[list[int]]:
    return [llm.tokenizer.encode(f"def f{i}(x): return x + {i}") for i in range(n)]


def _run(llm, requests: list[EngineRequest]) -> dict[str, dict]:
    out: dict[str, dict] = {r.request_id: {"ids": [], "text": "", "reason": None} for r in requests}
    for r in requests:
        llm.core.add_request(r)
    while llm.core.has_unfinished():
        for o in llm.core.step()[0]:
            for c in o.outputs:  # completion i > 0 of a request (n > 1) is "<id>#<i>"
                key = o.request_id if c.index == 0 else f"{o.request_id}#{c.index}"
                acc = out.setdefault(key, {"ids": [], "text": "", "reason": None})
                acc["ids"] += c.token_ids
                acc["text"] += c.text
                acc["reason"] = c.finish_reason or acc["reason"]
    return out


def test_constrained_rows_batch_with_unconstrained_ones(make_llm, compile_for):
    llm = make_llm(num_kv_blocks=256, block_size=8, max_num_seqs=16)
    schema = compile_for(llm, json_schema_spec(RECORD_SCHEMA, "response_format"))
    prompts = _prompts(llm, 7)
    alone = _run(llm, [EngineRequest(f"u{i}", prompts[i], GREEDY) for i in range(3)])
    steps = []  # per sampling step: (rows, constrained rows)
    mask = llm.core.structured.mask

    def spy(states):
        result = mask(states)
        steps.append((len(states), 0 if result is None else len(result[0])))
        return result

    llm.core.structured.mask = spy
    constrained = [EngineRequest(f"c{i}", prompts[3 + i], SamplingParams(temperature=1.0, max_tokens=200, seed=i),
                                 structured=schema) for i in range(4)]
    mixed = _run(llm, [EngineRequest(f"u{i}", prompts[i], GREEDY) for i in range(3)] + constrained)
    for i in range(3):  # unconstrained greedy outputs are unchanged by the constrained neighbours
        assert mixed[f"u{i}"]["ids"] == alone[f"u{i}"]["ids"]
    for i in range(4):
        assert mixed[f"c{i}"]["reason"] == "stop", mixed[f"c{i}"]
        jsonschema.validate(json.loads(mixed[f"c{i}"]["text"]), RECORD_SCHEMA)
        assert llm.core.eos_token_ids[0] not in mixed[f"c{i}"]["ids"]  # ended by the grammar, no EOS step
    assert any(rows > constrained_rows > 0 for rows, constrained_rows in steps)  # same steps, same batch


def test_budget_inside_the_structure_is_length_and_choice_stops(make_llm, compile_for):
    llm = make_llm(num_kv_blocks=128, block_size=8)
    schema = compile_for(llm, json_schema_spec(RECORD_SCHEMA, "guided_json"))
    choice = compile_for(llm, choice_spec(["alpha", "beta gamma", "δέλτα"], "guided_choice"))
    p = _prompts(llm, 1)[0]
    out = _run(llm, [EngineRequest("short", p, SamplingParams(temperature=1.0, max_tokens=4, seed=1), structured=schema)]
               + [EngineRequest(f"ch{i}", p, SamplingParams(temperature=1.0, max_tokens=50, seed=i, ignore_eos=True),
                                structured=choice) for i in range(6)])
    assert out["short"]["reason"] == "length" and len(out["short"]["ids"]) == 4
    for i in range(6):
        assert out[f"ch{i}"]["reason"] == "stop" and out[f"ch{i}"]["text"] in ("alpha", "beta gamma", "δέλτα")


def test_n_forks_matchers_and_regex_matches(make_llm, compile_for):
    llm = make_llm(num_kv_blocks=128, block_size=4)
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    spec = compile_for(llm, regex_spec(pattern, "guided_regex"))
    out = _run(llm, [EngineRequest("r", _prompts(llm, 1)[0], SamplingParams(n=4, temperature=1.0, max_tokens=30,
                                                                             seed=3), structured=spec)])
    texts = [v["text"] for v in out.values()]
    assert len(texts) == 4 and all(re.fullmatch(pattern, t) for t in texts), texts
    assert len(set(texts)) > 1


def test_gate_holds_the_grammar_until_its_tokens(make_llm, compile_for):
    llm = make_llm(num_kv_blocks=128, block_size=8)
    tok = llm.tokenizer
    gate_id = tok.convert_tokens_to_ids("Q")
    spec = compile_for(llm, regex_spec("[0-9]{4}", "guided_regex"))
    biased = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={gate_id: 100.0})
    p = _prompts(llm, 1)[0]
    out = _run(llm, [EngineRequest("gated", p, biased, structured=spec.with_gate((gate_id,))),
                     EngineRequest("plain", p, biased, structured=spec)])
    assert out["gated"]["ids"][0] == gate_id and re.fullmatch("[0-9]{4}", out["gated"]["text"][1:])
    assert re.fullmatch("[0-9]{4}", out["plain"]["text"])  # the bias cannot beat the grammar's mask
    assert out["gated"]["reason"] == out["plain"]["reason"] == "stop"
