"""What a request asks its output to follow: a `StructuredSpec`, normalised so that equal
constraints compare (and cache) equal.

Kinds (vLLM's `structured_outputs` names):
- `json`: a JSON schema (dict or JSON text), kept as compact JSON text (key order kept: it is
  the order in which the properties are generated);
- `json_object`: any JSON object;
- `regex`: a regular expression the whole output must match;
- `choice`: the output is exactly one of a list of strings;
- `grammar`: an EBNF grammar (xgrammar's dialect: GBNF, `root ::= ...`).

`param` names the request field the spec came from, so that an error in it (invalid schema,
unsupported regex feature, grammar that does not compile) can be reported as a 400 naming that
field. It is not part of equality: the same schema from `response_format` or from `guided_json`
is compiled once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any

from server.engine.structured.schema_formats import exact_formats
from server.engine.structured.schema_limits import SchemaLimitError, check_limits
from server.engine.structured.schema_support import UnsupportedSchema, check_supported

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# bounds on what one request may ask the compiler to do (see also schema_limits: what a JSON
# schema may ask; the compile pool's time and memory budgets)
MAX_SPEC_CHARS = 256 * 1024
MAX_CHOICES = 1024
MAX_JSON_DEPTH = 100  # arrays / objects nested in a schema document (schema_limits bounds subschemas)


class StructuredSpecError(ValueError):
    """A structured-output field is invalid; `param` names it (the API answers 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class StructuredSpec:
    kind: str
    value: str  # canonical JSON of a schema / the regex / JSON list of choices / the grammar ("" for json_object)
    any_whitespace: bool = False  # JSON kinds: allow free whitespace between tokens (else compact)
    param: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StructuredSpecError(self.param, f"{self.param}: unknown structured output kind '{self.kind}'")

    @property
    def key(self) -> tuple[str, str, bool]:
        """The cache key: equal for specs that compile to the same grammar."""
        return (self.kind, self.value, self.any_whitespace if self.kind in ("json", "json_object") else False)

    def choices(self) -> list[str]:
        return json.loads(self.value) if self.kind == "choice" else []

    def describe(self) -> str:
        return f"{self.kind} ({len(self.value)} chars)"


def _check_size(param: str, text: str) -> None:
    if len(text) > MAX_SPEC_CHARS:
        raise StructuredSpecError(param, f"{param}: at most {MAX_SPEC_CHARS} characters; this one has {len(text)}")


def json_schema_spec(schema: Any, param: str, any_whitespace: bool = False) -> StructuredSpec:
    """A JSON schema given as an object or as JSON text."""
    if isinstance(schema, str):
        _check_size(param, schema)
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredSpecError(param, f"{param}: not valid JSON: {e}") from None
        except RecursionError:
            raise StructuredSpecError(param, f"{param}: nested more than {MAX_JSON_DEPTH} levels deep; the limit "
                                             f"is {MAX_JSON_DEPTH}") from None
    if isinstance(schema, bool):  # true: anything, false: nothing (JSON Schema booleans)
        if not schema:
            raise StructuredSpecError(param, f"{param}: the schema `false` accepts no output")
        schema = {}
    if not isinstance(schema, dict):
        raise StructuredSpecError(param, f"{param}: a JSON schema must be an object, not {type(schema).__name__}")
    # key order is kept: it is the order the properties are generated in
    try:
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    except RecursionError:
        raise StructuredSpecError(param, f"{param}: nested more than {MAX_JSON_DEPTH} levels deep; the limit is "
                                         f"{MAX_JSON_DEPTH}") from None
    _check_size(param, text)  # the request's schema (the exact formats below add patterns of ours)
    exact = exact_formats(schema, check_schema(schema, param))
    if exact is not schema:
        text = json.dumps(exact, separators=(",", ":"), ensure_ascii=False)
    return StructuredSpec("json", text, any_whitespace, param)


def check_schema(schema: Any, param: str) -> list:
    """What a JSON schema may ask of the grammar compiler (before it compiles): nesting, size,
    optional properties (schema_limits), and only keywords the backend enforces (schema_support).
    Returns its subschemas, walked once (schema_walk.walk's output)."""
    depth = json_depth(schema)
    if depth > MAX_JSON_DEPTH:
        raise StructuredSpecError(param, f"{param}: nested more than {MAX_JSON_DEPTH} levels deep; the limit is "
                                         f"{MAX_JSON_DEPTH}")
    try:
        nodes = check_limits(schema)
        check_supported(schema, nodes)
    except (SchemaLimitError, UnsupportedSchema) as e:
        raise StructuredSpecError(param, f"{param}: {e.message}") from None
    return nodes


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in `value` (0 for a scalar), without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children: Iterable[Any]
        if isinstance(node, dict):
            children = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            return deepest
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def json_object_spec(param: str, any_whitespace: bool = False) -> StructuredSpec:
    return StructuredSpec("json_object", "", any_whitespace, param)


def regex_spec(pattern: Any, param: str) -> StructuredSpec:
    if not isinstance(pattern, str) or not pattern:
        raise StructuredSpecError(param, f"{param}: must be a non-empty string (a regular expression)")
    _check_size(param, pattern)
    return StructuredSpec("regex", pattern, False, param)


def choice_spec(choices: Any, param: str) -> StructuredSpec:
    if not isinstance(choices, list) or not choices:
        raise StructuredSpecError(param, f"{param}: must be a non-empty list of strings")
    if len(choices) > MAX_CHOICES:
        raise StructuredSpecError(param, f"{param}: at most {MAX_CHOICES} choices; this one has {len(choices)}")
    bad = [i for i, c in enumerate(choices) if not isinstance(c, str) or not c]
    if bad:
        raise StructuredSpecError(param, f"{param}: every choice must be a non-empty string (bad at index "
                                         f"{', '.join(map(str, bad[:8]))})")
    text = json.dumps(list(dict.fromkeys(choices)), ensure_ascii=False)
    _check_size(param, text)
    return StructuredSpec("choice", text, False, param)


def grammar_spec(grammar: Any, param: str) -> StructuredSpec:
    if not isinstance(grammar, str) or not grammar.strip():
        raise StructuredSpecError(param, f"{param}: must be a non-empty string (an EBNF grammar with a root rule)")
    _check_size(param, grammar)
    return StructuredSpec("grammar", grammar, False, param)


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly `choices` (literals escaped)."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


def _ebnf_literal(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'
