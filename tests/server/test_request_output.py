"""`RequestOutput.add`: streamed deltas merged into one output, as the offline `LLM` and the
non-streaming endpoints use it."""

from __future__ import annotations

import torch

from server.api.routing_json import ids_json, weights_json
from server.engine.request import CompletionOutput, Logprob, RequestMetrics, RequestOutput, RowChunks


def _delta(index: int, text: str, ids: list[int], **kw) -> CompletionOutput:
    return CompletionOutput(index=index, text=text, token_ids=ids, **kw)


def test_add_concatenates_text_tokens_logprobs_and_finishes() -> None:
    acc = RequestOutput("r", [])
    m1, m2 = RequestMetrics(arrival_time=1.0), RequestMetrics(arrival_time=1.0, num_generation_tokens=3)
    acc.add(RequestOutput("r", [_delta(1, "b", [7], logprobs=[Logprob(7, -0.5)]),
                                _delta(0, "He", [1, 2], logprobs=[Logprob(1, -1.0), Logprob(2, -2.0)])],
                          prompt_token_ids=[5, 6], prompt_logprobs=[None, Logprob(6, -3.0)], metrics=m1))
    acc.add(RequestOutput("r", [_delta(0, "llo", [3], logprobs=[Logprob(3, -0.1)], finish_reason="stop",
                                       stop_reason="!")],
                          prompt_token_ids=[9], prompt_logprobs=[None], metrics=m2))
    assert [o.index for o in acc.outputs] == [0, 1]  # sorted by index, whatever came first
    first, second = acc.outputs
    assert (first.text, first.token_ids) == ("Hello", [1, 2, 3])
    assert [lp.token_id for lp in first.logprobs] == [1, 2, 3]
    assert (first.finish_reason, first.stop_reason) == ("stop", "!")
    assert (second.text, second.token_ids, second.finish_reason) == ("b", [7], None)
    # prompt fields come from the first output that has them; the latest metrics win
    assert acc.prompt_token_ids == [5, 6] and acc.prompt_logprobs[1].token_id == 6
    assert acc.metrics is m2
    assert not acc.finished and acc.error is None
    acc.add(RequestOutput("r", [_delta(1, "", [], finish_reason="length")], finished=True, error=None))
    assert acc.finished and second.finish_reason == "length"
    assert first.finish_reason == "stop"  # a delta without a finish reason never clears one


def test_add_does_not_alias_the_deltas() -> None:
    d = RequestOutput("r", [_delta(0, "a", [1], logprobs=[Logprob(1, -1.0)])])
    acc = RequestOutput("r", [])
    acc.add(d)
    acc.add(RequestOutput("r", [_delta(0, "b", [2], logprobs=[Logprob(2, -1.0)])]))
    assert d.outputs[0].token_ids == [1] and len(d.outputs[0].logprobs) == 1
    assert acc.outputs[0].token_ids == [1, 2]


def test_add_keeps_missing_logprobs_none_and_records_errors() -> None:
    acc = RequestOutput("r", [])
    acc.add(RequestOutput("r", [_delta(0, "x", [4])]))
    assert acc.outputs[0].logprobs is None
    acc.add(RequestOutput("r", [_delta(0, "", [], finish_reason="error")], finished=True, error="boom"))
    acc.add(RequestOutput("r", [], error=None))
    assert acc.error == "boom" and acc.outputs[0].finish_reason == "error"


def test_routing_chunks_render_as_one_list() -> None:
    """Tensor deltas ([new_tokens, layers, top_k]) accumulate as chunks; the JSON of the merged
    output equals the concatenated JSON of the deltas (weights rounded the same way)."""
    ids = [torch.randint(0, 8, (n, 2, 2), dtype=torch.uint8) for n in (3, 1, 2)]
    weights = [torch.rand(n, 2, 2, dtype=torch.float16) for n in (3, 1, 2)]
    acc = RequestOutput("r", [])
    prompt = torch.zeros(4, 2, 2, dtype=torch.uint8)
    for k, (i, w) in enumerate(zip(ids, weights)):
        acc.add(RequestOutput("r", [_delta(0, "t", [0] * len(i), routing=i, routing_weights=w)],
                              prompt_routing=prompt if k == 0 else None))
    out = acc.outputs[0]
    assert isinstance(out.routing, RowChunks) and len(out.routing) == 3
    assert ids_json(out.routing) == sum((ids_json(i) for i in ids), [])
    assert ids_json(out.routing) == torch.cat(ids).tolist()
    assert weights_json(out.routing_weights) == sum((weights_json(w) for w in weights), [])
    assert acc.prompt_routing is prompt
    # nested lists (engines that hand lists) concatenate the same way
    acc2 = RequestOutput("r", [])
    for i in ids:
        acc2.add(RequestOutput("r", [_delta(0, "", [], routing=i.tolist())]))
    assert ids_json(acc2.outputs[0].routing) == torch.cat(ids).tolist()
    # a single delta stays as it came
    acc3 = RequestOutput("r", [])
    acc3.add(RequestOutput("r", [_delta(0, "", [], routing=ids[0])]))
    assert acc3.outputs[0].routing is ids[0]
