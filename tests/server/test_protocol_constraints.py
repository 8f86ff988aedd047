"""The request models state the constraints the server enforces: every numeric bound and list
length /openapi.json documents for a sampling field is exactly where `SamplingParams` (the
check every engine and the offline `LLM` run) starts refusing, and violations are 400s naming
the parameter, never 422s."""

from __future__ import annotations

import json
from typing import Any

import pytest

from server.api.body import validate_body
from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.engine.request import SamplingParams, SamplingParamsError


def _schema_bounds(model: type) -> dict[str, dict[str, Any]]:
    """{field: the numeric/length keywords of its non-null branch(es)} from the JSON schema."""
    out: dict[str, dict[str, Any]] = {}
    for name, prop in model.model_json_schema()["properties"].items():
        for branch in prop.get("anyOf", [prop]):
            keys = {k: v for k, v in branch.items()
                    if k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "maxItems")}
            if keys and name not in out:
                out[name] = keys
    return out


SAMPLING_FIELDS = {"n", "temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "min_tokens",
                   "logprobs", "prompt_logprobs", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "stop_token_ids"}


def _sampling_accepts(name: str, value: Any) -> bool:
    kwargs: dict[str, Any] = {name: value}
    if name == "min_tokens":
        kwargs["max_tokens"] = None
    try:
        SamplingParams(**kwargs)
    except SamplingParamsError as e:
        assert e.param == name
        return False
    return True


def _body_error(model: type, body: dict[str, Any]) -> APIError | None:
    try:
        validate_body(model, json.dumps(body).encode())
    except APIError as e:
        return e
    return None


def _edges(bounds: dict[str, Any], integer: bool) -> tuple[list[Any], list[Any]]:
    step = 1 if integer else 1e-6
    ok, bad = [], []
    if "minimum" in bounds:
        ok.append(bounds["minimum"])
        bad.append(bounds["minimum"] - step)
    if "exclusiveMinimum" in bounds:
        ok.append(bounds["exclusiveMinimum"] + step)
        bad.append(bounds["exclusiveMinimum"])
    if "maximum" in bounds:
        ok.append(bounds["maximum"])
        bad.append(bounds["maximum"] + step)
    return ok, bad


@pytest.mark.parametrize("model,base", [(CompletionRequest, {"prompt": "x"}),
                                        (ChatCompletionRequest, {"messages": [{"role": "user", "content": "x"}]})])
def test_documented_bounds_are_the_enforced_ones(model: type, base: dict[str, Any]) -> None:
    bounds = _schema_bounds(model)
    documented = SAMPLING_FIELDS & set(bounds)
    # every range SamplingParams checks is documented (stop_token_ids: its length)
    assert documented >= SAMPLING_FIELDS - {"max_tokens", "logprobs"}, SAMPLING_FIELDS - documented
    for name in sorted(documented):
        b = bounds[name]
        if "maxItems" in b:  # a list: its limit
            limit = b["maxItems"]
            assert _sampling_accepts(name, [0] * limit) and not _sampling_accepts(name, [0] * (limit + 1)), name
            err = _body_error(model, {**base, name: [0] * (limit + 1)})
            assert err is not None and err.status == 400 and err.param == name, (name, err)
            continue
        integer = isinstance(next(iter(b.values())), int) and name not in (
            "temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
        ok, bad = _edges(b, integer)
        for v in ok:
            assert _sampling_accepts(name, v), (name, v)
            assert _body_error(model, {**base, name: v}) is None, (name, v)
        for v in bad:
            assert not _sampling_accepts(name, v), (name, v, "documented as invalid but SamplingParams accepts it")
            err = _body_error(model, {**base, name: v})
            assert err is not None and err.status == 400 and err.param == name, (name, v, err)


def test_stop_limits_match_sampling_params() -> None:
    stop = CompletionRequest.model_json_schema()["properties"]["stop"]["anyOf"]
    one, many = stop[0], stop[1]
    assert _sampling_accepts("stop", ["a"] * many["maxItems"])
    assert not _sampling_accepts("stop", ["a"] * (many["maxItems"] + 1))
    assert _sampling_accepts("stop", ["a" * one["maxLength"]])
    assert not _sampling_accepts("stop", ["a" * (one["maxLength"] + 1)])
    assert not _sampling_accepts("stop", [""]) and one["minLength"] == 1
    for bad in (["a"] * (many["maxItems"] + 1), [""], "a" * (one["maxLength"] + 1)):
        err = _body_error(CompletionRequest, {"prompt": "x", "stop": bad})
        assert err is not None and err.param == "stop", err
        assert "must be a string or a list" not in err.message  # the violated limit is named


def test_enums_are_documented() -> None:
    chat = ChatCompletionRequest.model_json_schema()
    defs = chat["$defs"]
    # one message model per role, told apart by `role` (a discriminated union in the schema)
    messages = chat["properties"]["messages"]["items"]
    assert messages["discriminator"]["propertyName"] == "role"
    assert sorted(messages["discriminator"]["mapping"]) == ["assistant", "developer", "system", "tool", "user"]
    assert defs["TextPart"]["properties"]["type"]["const"] == "text"
    assert defs["ResponseFormat"]["properties"]["type"]["enum"] == ["text", "json_object", "json_schema"]
    assert {"enum": ["none", "auto", "required"]} in chat["properties"]["tool_choice"]["anyOf"]
    assert chat["properties"]["messages"]["minItems"] == 1
    assert CompletionRequest.model_json_schema()["properties"]["logit_bias"]["anyOf"][0]["maxProperties"] == 300
