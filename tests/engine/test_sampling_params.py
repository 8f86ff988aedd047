"""SamplingParams validation: every invalid value names the right parameter."""

from __future__ import annotations

import pytest

from server.engine.request import INT64_MAX, INT64_MIN, SamplingParams, SamplingParamsError

NAN, INF = float("nan"), float("inf")

INVALID = [
    ("n", [0, -1, 129, 1.0, "2", True, None]),
    ("temperature", [-0.1, 2.01, NAN, INF, "1", None, True]),
    ("top_p", [0.0, -0.5, 1.01, NAN, INF, None]),
    ("top_k", [-2, -100, 1.5, "5", True, None]),
    ("min_p", [-0.01, 1.01, NAN, None]),
    ("seed", [INT64_MAX + 1, INT64_MIN - 1, 2**64, 1.0, "1", True]),
    ("max_tokens", [0, -1, 1.5, "16", True]),
    ("min_tokens", [-1, 1.5, "1", True, None]),
    ("stop", [[""], ["a", 5], [None], ["s"] * 17]),
    ("stop_token_ids", [[-1], [1.5], ["3"], [True], "abc"]),
    ("logprobs", [-1, 21, 1.5, "3", True]),
    ("prompt_logprobs", [-1, 21, 2.0, True]),
    ("presence_penalty", [-2.01, 2.01, NAN, INF, None]),
    ("frequency_penalty", [-2.01, 2.01, NAN, "0", None]),
    ("repetition_penalty", [0.0, -1.0, 2.01, NAN, None]),
    ("logit_bias", [{"5": 1.0}, {-1: 1.0}, {1.5: 1.0}, {True: 1.0}, {1: 101}, {1: -100.5}, {1: NAN}, {1: "1"}, [1, 2], "x"]),
]


@pytest.mark.parametrize(
    "field,value", [(f, v) for f, values in INVALID for v in values], ids=lambda x: repr(x)[:30]
)
def test_invalid_value_names_param(field, value):
    with pytest.raises(SamplingParamsError) as exc:
        SamplingParams(**{field: value})
    assert exc.value.param == field
    assert field in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_min_tokens_above_max_tokens():
    with pytest.raises(SamplingParamsError) as exc:
        SamplingParams(max_tokens=5, min_tokens=6)
    assert exc.value.param == "min_tokens"
    SamplingParams(max_tokens=5, min_tokens=5)
    SamplingParams(max_tokens=None, min_tokens=10_000)


def test_logit_bias_names_all_bad_keys_together():
    with pytest.raises(SamplingParamsError) as exc:
        SamplingParams(logit_bias={"a": 1, 3: 1, -4: 1, "b": 2})
    assert exc.value.param == "logit_bias"
    for k in ("'a'", "-4", "'b'"):
        assert k in exc.value.message
    with pytest.raises(SamplingParamsError) as exc:
        SamplingParams(logit_bias={1: 200, 2: 0, 3: -300})
    assert "1" in exc.value.message and "3" in exc.value.message


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(n=1), dict(n=128),
        dict(temperature=0), dict(temperature=0.0), dict(temperature=2), dict(temperature=1e-6),
        dict(top_p=1e-9), dict(top_p=1),
        dict(top_k=-1), dict(top_k=0), dict(top_k=1), dict(top_k=10**6),
        dict(min_p=0), dict(min_p=1.0),
        dict(seed=INT64_MAX), dict(seed=INT64_MIN), dict(seed=0),
        dict(max_tokens=None), dict(max_tokens=1),
        dict(min_tokens=0),
        dict(stop=None), dict(stop=["a"] * 16), dict(stop_token_ids=[0, 7]),
        dict(logprobs=0), dict(logprobs=20), dict(prompt_logprobs=0), dict(prompt_logprobs=20),
        dict(presence_penalty=-2), dict(presence_penalty=2.0), dict(frequency_penalty=-2.0),
        dict(repetition_penalty=2.0), dict(repetition_penalty=1e-3),
        dict(logit_bias={}), dict(logit_bias={0: -100, 5: 100, 7: 0.5}),
    ],
    ids=repr,
)
def test_valid_values_accepted(kwargs):
    SamplingParams(**kwargs)


def test_stop_string_becomes_list():
    assert SamplingParams(stop="x").stop == ["x"]
    assert SamplingParams(stop=None).stop == []
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_greedy_property():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=5e-6).greedy
    assert not SamplingParams(temperature=1e-5).greedy


def test_verify_vocab_names_all_out_of_vocab_ids():
    p = SamplingParams(stop_token_ids=[1, 100, 5, 101], logit_bias={2: 1.0, 200: 1.0, 300: -1.0})
    with pytest.raises(SamplingParamsError) as exc:
        p.verify_vocab(100)
    assert exc.value.param == "stop_token_ids"
    assert "100" in exc.value.message and "101" in exc.value.message
    p = SamplingParams(stop_token_ids=[1], logit_bias={2: 1.0, 200: 1.0, 300: -1.0})
    with pytest.raises(SamplingParamsError) as exc:
        p.verify_vocab(100)
    assert exc.value.param == "logit_bias"
    assert "200" in exc.value.message and "300" in exc.value.message
    SamplingParams(stop_token_ids=[99], logit_bias={99: 1}).verify_vocab(100)
    SamplingParams().verify_vocab(1)


# Huge integers and non-list stop fields must be refused as parameter errors, not crash.
@pytest.mark.parametrize(
    "field,value",
    [("temperature", 10**400), ("logit_bias", {1: 10**400}), ("stop", 5), ("stop_token_ids", 5)],
    ids=["temperature-huge-int", "logit_bias-huge-int", "stop-int", "stop_token_ids-int"],
)
def test_known_gaps_raise_sampling_params_error(field, value):
    with pytest.raises(SamplingParamsError) as exc:
        SamplingParams(**{field: value})
    assert exc.value.param == field


@pytest.mark.parametrize("field,value", [
    ("logit_bias", {i: 1.0 for i in range(301)}),
    ("stop_token_ids", list(range(257))),
    ("stop", ["x" * 257]),
])
def test_per_step_parameters_are_bounded(field, value) -> None:
    """Item 5: 800k stop_token_ids or a full-vocabulary logit_bias slowed every step."""
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field
