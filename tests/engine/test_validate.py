"""validate_request: the one request check both engines run (issue 16, item 2)."""

from __future__ import annotations

import pytest

from server.engine.protocol import RequestTooLongError
from server.engine.request import MAX_ROUTING_IDS, EngineRequest, SamplingParams, SamplingParamsError
from server.engine.validate import RoutingShape, validate_request


def req(ids, **kw):
    routing = kw.pop("return_routing", False)
    kw.setdefault("max_tokens", None)  # None: the rest of the context
    return EngineRequest("r", ids, SamplingParams(**kw), return_routing=routing)


def test_max_tokens_defaults_to_the_rest_of_the_context():
    assert validate_request(req([1, 2, 3]), vocab_size=10, max_model_len=16) == 13
    assert validate_request(req([1, 2, 3], max_tokens=5), vocab_size=10, max_model_len=16) == 5


def test_context_length_messages():
    with pytest.raises(RequestTooLongError, match="maximum context length is 4 tokens. However, your prompt has 4"):
        validate_request(req([1, 2, 3, 4]), vocab_size=10, max_model_len=4)
    with pytest.raises(RequestTooLongError, match=r"you requested 7 tokens \(3 in the prompt, 4 in the completion\)"):
        validate_request(req([1, 2, 3], max_tokens=4), vocab_size=10, max_model_len=6)
    with pytest.raises(RequestTooLongError, match="empty"):
        validate_request(req([]), vocab_size=10, max_model_len=6)


def test_token_ids_and_engine_limits_name_the_parameter():
    with pytest.raises(SamplingParamsError) as e:
        validate_request(req([1, 12, 13]), vocab_size=10, max_model_len=16)
    assert e.value.param == "prompt" and "12, 13" in str(e.value)
    with pytest.raises(SamplingParamsError) as e:
        validate_request(req([1], stop_token_ids=[99]), vocab_size=10, max_model_len=16)
    assert e.value.param == "stop_token_ids"
    with pytest.raises(SamplingParamsError) as e:
        validate_request(req([1], n=3, temperature=1.0), vocab_size=10, max_model_len=16, max_num_seqs=2)
    assert e.value.param == "n"
    validate_request(req([1], n=3, temperature=1.0), vocab_size=10, max_model_len=16)  # no engine limit given


def test_routing_volume_is_capped_only_when_asked():
    shape = RoutingShape(num_moe_layers=64, top_k=8)
    big = dict(max_tokens=4000, n=64, temperature=1.0)
    with pytest.raises(SamplingParamsError) as e:
        validate_request(req([1], return_routing=True, **big), vocab_size=10, max_model_len=5000, routing=shape)
    assert e.value.param == "return_routing"
    validate_request(req([1], **big), vocab_size=10, max_model_len=5000, routing=shape)


def test_return_routing_volume_is_capped(make_llm) -> None:
    """Item 7: routing of n=128 long completions was unbounded (gigabytes)."""
    llm = make_llm(num_kv_blocks=64, block_size=4)  # 2 MoE layers x top-2: 4 ids per token
    ok = MAX_ROUTING_IDS // 4 // 128 - 10
    big = SamplingParams(n=128, temperature=1.0, max_tokens=ok + 20)
    llm.core.scheduler.max_num_seqs = 128
    llm.core.max_model_len = 10**7
    with pytest.raises(SamplingParamsError) as e:
        llm.core.validate(EngineRequest("x", [1, 2, 3], big, return_routing=True))
    assert e.value.param == "return_routing" and str(MAX_ROUTING_IDS) in str(e.value)
    llm.core.validate(EngineRequest("x", [1, 2, 3], big))  # fine without routing
    llm.core.validate(EngineRequest("y", [1, 2], SamplingParams(n=128, temperature=1.0, max_tokens=ok),
                                         return_routing=True))


def test_n_above_max_num_seqs_is_refused(make_llm) -> None:
    """Item 9: such a request was admitted only when nothing else ran, draining the server."""
    llm = make_llm(num_kv_blocks=64, block_size=4, max_num_seqs=4)
    with pytest.raises(SamplingParamsError) as e:
        llm.core.validate(EngineRequest("x", [1, 2, 3], SamplingParams(n=5, temperature=1.0)))
    assert e.value.param == "n" and "4" in str(e.value)
    llm.core.validate(EngineRequest("y", [1, 2, 3], SamplingParams(n=4, temperature=1.0)))
