"""What the JSON-schema checks refuse before compiling (keywords xgrammar ignores, sizes that make
compiles slow, grammars with dead ends), and that what they accept is enforced: each accepted
keyword's grammar refuses an instance the keyword forbids (measured on the real backend, so a
new xgrammar that changes behaviour shows up here)."""

from __future__ import annotations

import json
import time

import pytest

from server.engine.structured.backend import GrammarCompiler, GrammarError
from server.engine.structured.spec import StructuredSpecError, grammar_spec, json_schema_spec, regex_spec

INT = {"type": "integer"}
OBJ_A = {"type": "object", "properties": {"a": INT}}

# (schema, words the 400 must contain: the keyword, and where it is)
REFUSED = [
    ({"allOf": [{"type": "integer", "minimum": 0}, {"type": "integer", "maximum": 5}]}, ["allOf", "at #"]),
    ({"type": "integer", "not": {"const": 3}}, ["'not'", "at #"]),
    ({"type": "integer", "if": {"minimum": 5}, "then": {"maximum": 7}}, ["'if'", "at #"]),
    ({"type": "array", "items": INT, "uniqueItems": True}, ["uniqueItems", "at #"]),
    ({"type": "array", "items": INT, "contains": {"const": 5}}, ["contains"]),
    ({"type": "array", "items": INT, "contains": {"const": 5}, "minContains": 2}, ["contains"]),
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 3, "minimum": 1}}},
     ["multipleOf", "at #/properties/n"]),
    ({"type": "number", "multipleOf": 0.5}, ["multipleOf"]),
    ({"type": "string", "pattern": "^a+$", "maxLength": 4}, ["pattern", "maxLength"]),
    ({"type": "string", "format": "ipv4", "maxLength": 4}, ["format", "maxLength"]),
    ({"type": "string", "format": "regex"}, ["format", "regex"]),
    ({"type": "object", "properties": {"a": INT}, "required": ["b"]}, ["required", "'b'"]),
    ({"$defs": {"x": INT}, "$ref": "#/$defs/x", "maximum": 3}, ["$ref", "maximum"]),
    ({"type": "integer", "anyOf": [{"type": "integer", "maximum": 5}]}, ["anyOf"]),
    ({"anyOf": []}, ["anyOf", "empty"]),
    ({"oneOf": []}, ["oneOf", "empty"]),
    ({"type": []}, ["type"]),
    ({"type": ["string", "string"]}, ["type"]),
    ({"oneOf": [INT, {"type": "integer", "minimum": 0}]}, ["oneOf", "overlap"]),
    ({"type": "string", "enum": ["a", 1]}, ["enum", "value 1"]),
    ({"maxLength": 3}, ["maxLength", "type"]),
    ({"type": "object", "properties": {"a": INT}, "dependentRequired": {"a": ["b"]}}, ["dependentRequired"]),
    ({"type": "object", "properties": {"ab": INT}, "patternProperties": {"^a": {"type": "string"}}},
     ["patternProperties", "'ab'"]),
    ({"type": "object", "properties": {"bb": INT}, "propertyNames": {"maxLength": 1}}, ["propertyNames"]),
    ({"$ref": "#foo", "$defs": {"a": {"$anchor": "foo", "type": "integer"}}}, ["$ref", "anchor"]),
    ({"$ref": "http://example.com/s.json"}, ["$ref", "local"]),
    ({"$ref": "#/$defs/missing"}, ["$ref", "resolve"]),
    ({"type": "object", "properties": {"a": {"type": "string", "contentEncoding": "base64"}}},
     ["contentEncoding", "#/properties/a"]),
    ({"type": "object", "properties": {"a": INT}, "$defs": [1]}, ["$defs", "object"]),
    # malformed values are refused by shape before any check relies on them (was a TypeError)
    ({"type": "string", "format": []}, ["'format' must be a string"]),
    ({"type": "integer", "minimum": "a"}, ["'minimum' must be a finite number"]),
    ('{"type": "number", "maximum": NaN}', ["'maximum' must be a finite number"]),
    ({"type": "array", "items": [INT]}, ["'items' must be a schema"]),
    ({"anyOf": [1, 2]}, ["'anyOf' must be an array of schemas"]),
]


@pytest.mark.parametrize("schema,words", REFUSED, ids=[json.dumps(s)[:50] if not isinstance(s, str) else s[:50]
                                                       for s, _ in REFUSED])
def test_unenforced_keywords_are_refused_naming_keyword_and_path(schema, words) -> None:
    with pytest.raises(StructuredSpecError) as e:
        json_schema_spec(schema, "guided_json")
    assert e.value.param == "guided_json" and e.value.message.startswith("guided_json: ")
    for w in words:
        assert w in e.value.message, (w, e.value.message)


@pytest.fixture(scope="module")
def compiler(tiny_mixtral):
    from transformers import AutoTokenizer

    return GrammarCompiler(AutoTokenizer.from_pretrained(tiny_mixtral), 320)


def _accepts(compiled, value) -> bool:
    """Whether the grammar accepts `value` as JSON text (compact, ", " and ": " separators)."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(compiled.grammar)
    return matcher.accept_string(json.dumps(value)) and matcher.is_completed()


# accepted schemas, an instance each forbids (the grammar must refuse it) and one it allows
ENFORCED = [
    ({"allOf": [{"type": "integer", "maximum": 5}]}, 7, 3),
    ({"type": "integer", "multipleOf": 3}, 4, 3),
    ({"type": "integer", "multipleOf": 3, "minimum": 4, "maximum": 20}, 5, 6),
    ({"type": "integer", "exclusiveMinimum": 3}, 3, 4),
    ({"type": "number", "exclusiveMaximum": 1.5}, 1.5, 1.25),
    ({"type": "string", "maxLength": 3}, "abcd", "abc"),
    ({"type": "string", "minLength": 3}, "ab", "abc"),
    ({"type": "string", "pattern": "^a+$"}, "b", "aa"),
    ({"type": "string", "format": "ipv4"}, "256.1.1.1", "1.2.3.4"),
    ({"type": "string", "format": "ipv4"}, "06.1.1.1", "0.1.1.1"),  # exact (schema_formats), xgrammar's is not
    ({"type": "string", "format": "date"}, "2023-02-29", "2024-02-29"),
    ({"type": "string", "format": "date"}, "2020-04-31", "2020-04-30"),
    ({"type": "string", "format": "uuid"}, "x", "123e4567-e89b-12d3-a456-426614174000"),
    ({"type": "string", "format": "date-time"}, "2020-01-01T00:00:00", "2020-01-01T00:00:00Z"),
    ({"type": "array", "items": INT, "minItems": 2}, [1], [1, 2]),
    ({"type": "array", "items": INT, "maxItems": 1}, [1, 2], [1]),
    ({"type": "array", "prefixItems": [INT], "items": False}, ["a"], [1]),
    ({"type": "object", "additionalProperties": INT, "minProperties": 1}, {}, {"a": 1}),
    ({"type": "object", "additionalProperties": INT, "maxProperties": 1}, {"a": 1, "b": 2}, {"a": 1}),
    ({"type": "object", "additionalProperties": INT, "propertyNames": {"pattern": "^a"}}, {"b": 1}, {"a": 1}),
    ({"type": "object", "patternProperties": {"^a": INT}, "additionalProperties": False}, {"a": "x"}, {"a": 1}),
    ({**OBJ_A, "required": ["a"]}, {}, {"a": 1}),
    ({**OBJ_A, "unevaluatedProperties": False}, {"a": 1, "b": 1}, {"a": 1}),
    ({"type": "object", "properties": {"k": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["k"]},
     {"k": 1}, {"k": None}),
    ({"oneOf": [INT, {"type": "string"}]}, None, "a"),
    ({"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}, "x": INT}, "required": ["k", "x"]},
                {"type": "object", "properties": {"k": {"const": "b"}}, "required": ["k"]}]},
     {"k": "a"}, {"k": "b"}),
    ({"type": ["string", "integer"], "maxLength": 2, "minimum": 3}, 1, "ab"),
    ({"type": "integer", "enum": [1, 2]}, 3, 2),
]


@pytest.mark.parametrize("schema,bad,good", ENFORCED, ids=[json.dumps(s)[:50] for s, _, _ in ENFORCED])
def test_accepted_keywords_are_enforced_by_the_grammar(compiler, schema, bad, good) -> None:
    compiled = compiler.compile(json_schema_spec(schema, "guided_json"))
    assert not _accepts(compiled, bad), f"{schema} let {bad!r} through"
    assert _accepts(compiled, good)


def test_size_limits_refuse_slow_schemas_before_compiling() -> None:
    """Item 1: 1,600 optional properties took ~50 s to compile (n^3.8); a 900-level nested array 38 s."""
    many = {"type": "object", "properties": {f"p{i}": INT for i in range(1600)}}
    start = time.perf_counter()
    with pytest.raises(StructuredSpecError) as e:
        json_schema_spec(many, "guided_json")
    assert time.perf_counter() - start < 1.0
    assert "1600 optional properties" in e.value.message and "128" in e.value.message
    nested: dict = INT
    for _ in range(900):
        nested = {"type": "array", "items": nested}
    with pytest.raises(StructuredSpecError) as e:
        json_schema_spec(nested, "guided_json")
    assert "nested more than" in e.value.message
    # as JSON text 5,000 levels deep: no RecursionError, a 400 naming the field
    with pytest.raises(StructuredSpecError) as e:
        json_schema_spec('{"items":' * 5000 + "{}" + "}" * 5000, "structured_outputs.json")
    assert e.value.param == "structured_outputs.json" and "nested more than 100 levels" in e.value.message
    # required properties cost little: a large schema of them is fine, as is depth through $ref
    json_schema_spec({"type": "object", "properties": {f"p{i}": INT for i in range(1000)},
                      "required": [f"p{i}" for i in range(1000)]}, "guided_json")
    chain = {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}} for i in range(200)}
    json_schema_spec({"$ref": "#/$defs/d0", "$defs": {**chain, "d200": INT}}, "guided_json")


@pytest.mark.parametrize("spec,message", [
    (grammar_spec("root ::= root", "guided_grammar"), "accepts no output"),
    (grammar_spec('root ::= "a" x | "b"\nx ::= "c" x', "structured_outputs.grammar"), "rule 'x'"),
    (regex_spec("[^\\s\\S]", "guided_regex"), "matches no text"),
])
def test_grammars_with_dead_ends_are_refused(compiler, spec, message) -> None:
    """Item 8: `root ::= root` compiled, then the engine rejected token 0 and answered 500."""
    with pytest.raises(GrammarError) as e:
        compiler.compile(spec)
    assert e.value.param == spec.param and message in e.value.message


def test_live_grammars_still_compile(compiler) -> None:
    for spec in (grammar_spec('root ::= ("ab" | "cd")+ x?\nx ::= "!" x | "?"', "g"), regex_spec("a+b?", "r"),
                 grammar_spec('root ::= "x" [0-9] [0-9]? "!"', "g")):
        assert compiler.compile(spec).nbytes > 0
