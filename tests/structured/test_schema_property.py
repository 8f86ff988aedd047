"""Property: every schema the server accepts, it enforces (item 4 of the hardening issue).

Hypothesis draws JSON schemas using every keyword (enforced or not, in combinations), sends each
as `guided_json` to the real server (sampled at temperature 1), and requires: a 400 naming
`guided_json`, or a 200 whose output validates against the schema with `jsonschema` (outputs
cut by `max_tokens`, finish_reason "length", excepted). Formats are checked where jsonschema has
a checker here (date, email, ipv4, ipv6, uuid). Bounded: 6 batches of 8 schemas, sent concurrently; deterministic
(derandomized) unless MOE_SERVE_HYPOTHESIS_SEED is set (MOE_SERVE_HYPOTHESIS_EXAMPLES: more batches).
"""

from __future__ import annotations

import asyncio
import json
import os

import jsonschema
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

EXPLORE = os.environ.get("MOE_SERVE_HYPOTHESIS_SEED")
FORMATS = ["date", "date-time", "time", "email", "ipv4", "ipv6", "uuid", "uri", "hostname", "duration", "regex",
           "iri", "idn-email", "unknown-format"]
CHECKER = jsonschema.FormatChecker(formats=("date", "email", "ipv4", "ipv6", "uuid"))
names = st.sampled_from(["a", "b", "c", "id", "tag"])
small = st.integers(min_value=0, max_value=4)


def rare(draw, one_in: int = 8) -> bool:
    """True once in `one_in` draws: how often a node gets a keyword that may be refused (a
    refused node refuses the whole schema, so this keeps a good part of them accepted)."""
    return draw(st.integers(0, one_in - 1)) == 0


@st.composite
def string_schema(draw) -> dict:
    s: dict = {"type": "string"}
    kind = draw(st.sampled_from(["lengths", "lengths", "pattern", "format", "enum"]))
    if kind == "lengths" or rare(draw):
        s["maxLength"] = draw(st.integers(min_value=1, max_value=6))
        if draw(st.booleans()):
            s["minLength"] = draw(small)
    if kind == "pattern":
        s["pattern"] = draw(st.sampled_from(["^[a-c]{1,3}$", "^x[0-9]?$", "^(yes|no)$", "a"]))
    elif kind == "format":
        s["format"] = draw(st.sampled_from(FORMATS))
    elif kind == "enum":
        values = ["a", "bb", "ccc", 1, None] if rare(draw) else ["a", "bb", "ccc"]
        s["enum"] = draw(st.lists(st.sampled_from(values), min_size=1, max_size=3, unique=True))
    return s


@st.composite
def number_schema(draw) -> dict:
    s: dict = {"type": draw(st.sampled_from(["integer", "number"]))}
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if draw(st.integers(0, 3)) == 0:
            s[key] = draw(st.integers(min_value=-20, max_value=20))
    if rare(draw, 4):
        s["multipleOf"] = draw(st.sampled_from([2, 3, 0.5]))
    return s


@st.composite
def other_leaf(draw) -> dict:
    if rare(draw, 6):  # refused: keywords without a type, empty anyOf / type lists
        return draw(st.sampled_from([{"maxLength": 2}, {"minimum": 3}, {"minItems": 1}, {"anyOf": []}, {"type": []}]))
    return draw(st.one_of(
        st.sampled_from([{"type": "boolean"}, {"type": "null"}, {"enum": ["x", 2, None]}]),
        st.builds(lambda v: {"const": v}, st.sampled_from(["k", 3, True, None, [1, 2], {"x": 1}])),
        st.builds(lambda t: {"type": t}, st.lists(st.sampled_from(["string", "integer", "null", "boolean"]),
                                                  min_size=1, max_size=2, unique=True)),
    ))


leaf = st.one_of(string_schema(), number_schema(), other_leaf())


def nested(children: st.SearchStrategy) -> st.SearchStrategy:
    @st.composite
    def array(draw) -> dict:
        s: dict = {"type": "array", "items": draw(children), "maxItems": draw(st.integers(1, 3))}
        if draw(st.booleans()):
            s["minItems"] = draw(st.integers(0, 2))
        if rare(draw, 4):
            s["prefixItems"] = draw(st.lists(children, min_size=1, max_size=2))
        if rare(draw):
            key, value = draw(st.sampled_from([("uniqueItems", True), ("uniqueItems", False),
                                               ("contains", {"type": "integer"}), ("minContains", 1),
                                               ("maxContains", 2)]))
            s[key] = value
        return s

    @st.composite
    def obj(draw) -> dict:
        props = draw(st.dictionaries(names, children, min_size=1, max_size=3))
        s: dict = {"type": "object", "properties": props}
        required = draw(st.lists(st.sampled_from(list(props)), max_size=3, unique=True))
        if rare(draw, 10):
            required.append("undeclared")
        if required:
            s["required"] = required
        if draw(st.booleans()):
            s["additionalProperties"] = draw(st.sampled_from([False, True, {"type": "integer", "maximum": 9}]))
        if rare(draw, 3):
            key, value = draw(st.sampled_from([
                ("minProperties", 1), ("maxProperties", 2), ("propertyNames", {"maxLength": 3}),
                ("propertyNames", {"maxLength": 1}), ("patternProperties", {"^z": {"type": "integer"}}),
                ("patternProperties", {"^a": {"type": "integer"}}), ("dependentRequired", {"a": ["b"]}),
                ("unevaluatedProperties", False)]))
            s[key] = value
        return s

    @st.composite
    def combined(draw) -> dict:
        key = draw(st.sampled_from(["anyOf", "anyOf", "oneOf", "allOf", "not", "if"]))
        if key == "not":
            return {"type": "integer", "not": {"const": 3}}
        if key == "if":
            return {"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 7}, "else": {"minimum": 0}}
        s: dict = {key: draw(st.lists(children, min_size=1, max_size=1 if key == "allOf" and not rare(draw)
                                      else 3))}
        if rare(draw):
            s["type"] = "object"
        return s

    @st.composite
    def ref(draw) -> dict:
        return {"$ref": "#/$defs/item", "maxLength": 2} if rare(draw) else {"$ref": "#/$defs/item"}

    return st.one_of(array(), obj(), obj(), combined(), ref())


schema_trees = st.recursive(leaf, nested, max_leaves=5)


@st.composite
def root_schemas(draw) -> dict:
    root = draw(schema_trees)
    return {**root, "$defs": {"item": draw(leaf)}} if "#/$defs/item" in json.dumps(root) else root


def _prop_settings(fn):
    fn = settings(max_examples=int(os.environ.get("MOE_SERVE_HYPOTHESIS_EXAMPLES", "6")), deadline=None, derandomize=EXPLORE is None, database=None,
                  suppress_health_check=list(HealthCheck))(fn)
    return seed(int(EXPLORE))(fn) if EXPLORE else fn


async def _send(client, schema: dict, sampling_seed: int):
    import openai

    try:
        r = await client.completions.create(model="tiny-mixtral", prompt="Data:", max_tokens=80, temperature=1.0,
                                            seed=sampling_seed, extra_body={"guided_json": schema})
    except openai.BadRequestError as e:
        return ("refused", e.body)
    return ("ok", r.choices[0])


def test_every_accepted_schema_is_enforced(structured_server) -> None:
    results = {"accepted": 0, "refused": 0, "checked": 0}

    @_prop_settings
    @given(batch=st.lists(root_schemas(), min_size=8, max_size=8), sampling_seed=st.integers(0, 2**16))
    def prop(batch, sampling_seed) -> None:
        async def run():
            async with structured_server.async_client() as client:
                return await asyncio.gather(*(_send(client, s, sampling_seed + k) for k, s in enumerate(batch)))

        for schema, (kind, result) in zip(batch, asyncio.run(run()), strict=True):
            if kind == "refused":
                results["refused"] += 1
                assert result["param"] == "guided_json" and result["message"].startswith("guided_json: "), result
                continue
            results["accepted"] += 1
            if result.finish_reason == "length":
                continue
            assert result.finish_reason == "stop", (schema, result)
            results["checked"] += 1
            errors = list(jsonschema.Draft202012Validator(schema, format_checker=CHECKER).iter_errors(
                json.loads(result.text)))
            assert not errors, f"accepted schema {json.dumps(schema)} gave {result.text!r}: {errors[0].message}"

    prop()
    print("schemas:", results)  # shown with -s
    # the drawn schemas exercise both sides: some refused, a good part accepted and checked
    assert results["refused"] >= 5 and results["checked"] >= 10, results
