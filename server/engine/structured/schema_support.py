"""Which JSON-schema keywords the grammar backend enforces, checked before compiling: a keyword
it would silently ignore is refused (400 naming the keyword and where it is), so that an
accepted schema's outputs always validate. vLLM does the same check before handing a schema
to xgrammar; OpenAI's strict mode refuses what it does not support.

What xgrammar 0.2 enforces was measured keyword by keyword (an instance the keyword forbids
must be refused by the grammar; tests/structured/test_schema_support.py keeps it measured) and
property-tested (tests/structured/test_schema_property.py). Refused:
- `not`, `if`/`then`/`else`, `contains`/`minContains`/`maxContains`, `uniqueItems: true`,
  `dependentRequired`, `dependentSchemas`, `dependencies`, `additionalItems`,
  `content*`, `$dynamicRef`/`$recursiveRef`, `unevaluated*` other than `false`;
- `allOf` with more than one schema; empty `allOf`, `anyOf`, `oneOf`, `type`;
- `oneOf` whose branches may overlap (xgrammar generates it as anyOf: an output matching two
  branches would be invalid); branches are disjoint when their types are, or when a property
  required by every branch has a different `const`/`enum` in each;
- `multipleOf` other than a whole number on an `integer` with no bound or both bounds;
- `pattern` together with `minLength`/`maxLength`; `format` together with any of these;
  `format` values xgrammar does not generate (`regex`, `iri`, `idn-email`, ...);
- `required` naming a property that `properties` does not declare; `patternProperties`
  matching a declared property; declared properties that `propertyNames` rejects;
- keywords beside `$ref`, or beside `anyOf`/`oneOf`/`allOf` (xgrammar reads only one side);
- `enum`/`const` values that the schema's other keywords reject (xgrammar emits the values);
- type-specific keywords (`maxLength`, `minimum`, `minItems`, ...) on a schema without a
  `type` (xgrammar applies them only to a typed schema; `properties` or `items` alone imply
  an object or an array);
- `$ref`s that are not local JSON pointers (`#`, `#/$defs/x`) or do not resolve.
Unknown keywords are annotations (as JSON Schema says) and are ignored.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import jsonschema

from server.engine.structured.schema_walk import RefError, pointer, resolve, walk

REFUSED = {
    "not": "'not' is not supported by the grammar backend",
    "if": "'if'/'then'/'else' are not supported by the grammar backend",
    "then": "'if'/'then'/'else' are not supported by the grammar backend",
    "else": "'if'/'then'/'else' are not supported by the grammar backend",
    "contains": "'contains' is not supported by the grammar backend",
    "minContains": "'minContains' is not supported by the grammar backend",
    "maxContains": "'maxContains' is not supported by the grammar backend",
    "dependentRequired": "'dependentRequired' is not supported by the grammar backend",
    "dependentSchemas": "'dependentSchemas' is not supported by the grammar backend",
    "dependencies": "'dependencies' is not supported by the grammar backend",
    "additionalItems": "'additionalItems' is not supported (use 'prefixItems' with 'items')",
    "contentEncoding": "'contentEncoding' is not supported by the grammar backend",
    "contentMediaType": "'contentMediaType' is not supported by the grammar backend",
    "contentSchema": "'contentSchema' is not supported by the grammar backend",
    "$dynamicRef": "'$dynamicRef' is not supported (use '$ref')",
    "$dynamicAnchor": "'$dynamicAnchor' is not supported",
    "$recursiveRef": "'$recursiveRef' is not supported (use '$ref')",
    "$recursiveAnchor": "'$recursiveAnchor' is not supported",
}
# formats xgrammar generates (date, time, date-time and ipv4 by exact patterns of ours:
# schema_formats.py)
FORMATS = ("date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
           "uri-reference", "uri-template", "json-pointer", "relative-json-pointer", "uuid")
TYPES = ("string", "number", "integer", "boolean", "object", "array", "null")
# keywords that assert nothing (plus any keyword JSON Schema does not define)
ANNOTATIONS = {"title", "description", "default", "examples", "deprecated", "readOnly", "writeOnly", "$comment",
               "$id", "$schema", "$anchor", "$defs", "definitions", "discriminator", "$vocabulary"}
FAMILIES = {
    "string": ("minLength", "maxLength", "pattern", "format"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "array": ("items", "prefixItems", "minItems", "maxItems", "uniqueItems", "unevaluatedItems"),
    "object": ("properties", "required", "additionalProperties", "patternProperties", "propertyNames",
               "minProperties", "maxProperties", "unevaluatedProperties"),
}
VALIDATION = {"type", "enum", "const", "$ref", "allOf", "anyOf", "oneOf"} | set(REFUSED) | {
    k for keys in FAMILIES.values() for k in keys}
COMBINATORS = ("allOf", "anyOf", "oneOf")


class UnsupportedSchema(ValueError):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def check_supported(root: Any, nodes: list | None = None) -> None:
    """Raise UnsupportedSchema (message: the keyword, where, why) for the first problem;
    `nodes`: walk(root)'s output, if at hand."""
    for path, node, _depth in nodes or walk(root):
        if isinstance(node, dict):
            # property names are strings whatever the schema says
            _check_node(root, node, path, "string" if path[-1:] == ("propertyNames",) else None)


Where = tuple  # a subschema's path (keys and indices), made a JSON pointer only for a message


def _fail(where: Where, message: str) -> None:
    raise UnsupportedSchema(f"{message} (at {pointer(where)})")


def _check_node(root: Any, node: dict[str, Any], where: Where, implied: str | None) -> None:
    for key in node:
        if key in REFUSED:
            _fail(where, REFUSED[key])
    for key in ("unevaluatedItems", "unevaluatedProperties"):
        if key in node and node[key] is not False:
            _fail(where, f"'{key}' is supported only as false")
    if node.get("uniqueItems", False) is not False:
        _fail(where, "'uniqueItems: true' is not supported by the grammar backend")
    _check_shapes(node, where)
    validation = [k for k in node if k in VALIDATION]
    if "$ref" in node:
        others = [k for k in validation if k != "$ref"]
        if others:
            _fail(where, f"keywords beside '$ref' are not supported ({', '.join(others[:4])}); put them in the "
                         f"referenced schema or use a single-schema 'allOf'")
        try:
            resolve(root, node["$ref"])
        except RefError as e:
            _fail(where, f"'$ref' {str(node['$ref'])[:80]!r}: {e}")
        return
    combinators = [k for k in COMBINATORS if k in node]
    if combinators:
        others = [k for k in validation if k not in COMBINATORS or k != combinators[0]]
        if others:
            _fail(where, f"keywords beside '{combinators[0]}' are not supported ({', '.join(others[:4])}); move "
                         f"them into each branch")
        _check_combinator(root, node, combinators[0], where)
        return
    if "enum" in node or "const" in node:
        _check_values(node, where)
        return
    types = {implied} if implied is not None and "type" not in node else _types(node, where)
    if "object" in types:
        _check_object(node, where)
    if "string" in types:
        _check_string(node, where)
    if "integer" in types or "number" in types:
        _check_number(node, types, where)


_SCHEMA_KEYS = ("items", "additionalProperties", "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_COUNTS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _check_shapes(node: dict[str, Any], where: Where) -> None:
    """The values' JSON types, as the meta-schema says (so that later checks can trust them)."""
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if key in node and not (isinstance(node[key], dict) and all(isinstance(v, (dict, bool))
                                                                    for v in node[key].values())):
            _fail(where, f"'{key}' must be an object of schemas")
    for key in ("allOf", "anyOf", "oneOf", "prefixItems"):
        if key in node and not (isinstance(node[key], list) and all(isinstance(v, (dict, bool)) for v in node[key])):
            _fail(where, f"'{key}' must be an array of schemas")
    for key in _SCHEMA_KEYS:
        if key in node and not isinstance(node[key], (dict, bool)):
            _fail(where, f"'{key}' must be a schema (an object or a boolean)")
    if "enum" in node and not isinstance(node["enum"], list):
        _fail(where, "'enum' must be an array")
    for key in ("format", "pattern", "$ref"):
        if key in node and not isinstance(node[key], str):
            _fail(where, f"'{key}' must be a string")
    for key in _COUNTS:
        if key in node and (isinstance(node[key], bool) or not isinstance(node[key], int) or node[key] < 0):
            _fail(where, f"'{key}' must be a non-negative integer")
    for key in _BOUNDS:
        value = node.get(key)
        if key in node and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not math.isfinite(value)):
            _fail(where, f"'{key}' must be a finite number")
    if "uniqueItems" in node and not isinstance(node["uniqueItems"], bool):
        _fail(where, "'uniqueItems' must be a boolean")
    for key in ("allOf", "anyOf", "oneOf", "enum"):
        if key in node and not node[key]:
            _fail(where, f"'{key}' must not be empty (an empty '{key}' accepts no output)" if key != "allOf"
                  else "'allOf' must not be empty")
    if "required" in node and not (isinstance(node["required"], list)
                                   and all(isinstance(r, str) for r in node["required"])):
        _fail(where, "'required' must be an array of strings")
    if "allOf" in node and len(node["allOf"]) > 1:
        _fail(where, "'allOf' with more than one schema is not supported by the grammar backend (merge them into "
                     "one schema)")
    t = node.get("type")
    if t is not None:
        names = [t] if isinstance(t, str) else t
        if not isinstance(names, list) or not names:
            _fail(where, "'type' must be a type name or a non-empty array of them")
        bad = [n for n in names if n not in TYPES]
        if bad or len(set(names)) != len(names):
            _fail(where, f"'type' must name distinct types among {', '.join(TYPES)}")


def _types(node: dict[str, Any], where: Where) -> set[str]:
    """The types the backend generates for `node` (explicit, or implied by properties/items)."""
    t = node.get("type")
    if t is not None:
        return {t} if isinstance(t, str) else set(t)
    if "properties" in node or "additionalProperties" in node:
        return {"object"}
    if "items" in node or "prefixItems" in node:
        return {"array"}
    for family, keys in FAMILIES.items():
        present = [k for k in keys if k in node]
        if present:
            _fail(where, f"'{present[0]}' needs a 'type' ({family}) beside it: without one the grammar backend "
                         f"does not enforce it")
    return set(TYPES)


def _check_object(node: dict[str, Any], where: Where) -> None:
    props = node.get("properties") or {}
    undeclared = [r for r in node.get("required", []) if r not in props]
    if undeclared:
        _fail(where, f"'required' names {', '.join(repr(r) for r in undeclared[:4])}, not declared in "
                     f"'properties'")
    for pattern in node.get("patternProperties") or {}:
        try:
            rx = re.compile(pattern)
        except re.error:
            _fail(where, f"'patternProperties' pattern {pattern[:40]!r} is not a valid regular expression")
        hit = [name for name in props if rx.search(name)]
        if hit:
            _fail(where, f"'patternProperties' pattern {pattern[:40]!r} matches the declared property "
                         f"{hit[0][:40]!r}; the grammar backend applies only 'properties' to it")
    names = node.get("propertyNames")
    if names is not None and props:
        try:
            validator = jsonschema.Draft202012Validator(names)
            rejected = [name for name in props if not validator.is_valid(name)]
        except jsonschema.exceptions.SchemaError:
            rejected = ["(invalid propertyNames)"]
        except Exception:  # noqa: BLE001 - e.g. a $ref the validator cannot resolve on its own
            rejected = ["(cannot check)"]
        if rejected:
            _fail(where, f"'propertyNames' rejects the declared property {rejected[0][:40]!r}")


def _check_string(node: dict[str, Any], where: Where) -> None:
    lengths = [k for k in ("minLength", "maxLength") if k in node]
    fmt = node.get("format")
    if fmt is not None:
        if fmt not in FORMATS:
            _fail(where, f"'format' {str(fmt)[:40]!r} is not enforced by the grammar backend (supported: "
                         f"{', '.join(FORMATS)})")
        others = [k for k in ("pattern", *lengths) if k in node]
        if others:
            _fail(where, f"'format' together with '{others[0]}' is not supported by the grammar backend")
    if "pattern" in node and lengths:
        _fail(where, f"'pattern' together with '{lengths[0]}' is not supported by the grammar backend (put the "
                     f"length into the pattern, e.g. ^[a-z]{{1,4}}$)")


def _check_number(node: dict[str, Any], types: set[str], where: Where) -> None:
    if "multipleOf" not in node:
        return
    step = node["multipleOf"]
    if types != {"integer"} or isinstance(step, bool) or not isinstance(step, (int, float)) \
            or step <= 0 or float(step) != int(step):
        _fail(where, "'multipleOf' is supported only as a whole number on a schema of type 'integer'")
    lower = "minimum" in node or "exclusiveMinimum" in node
    upper = "maximum" in node or "exclusiveMaximum" in node
    if lower != upper:
        _fail(where, "'multipleOf' with only one bound is not enforced by the grammar backend (give both a "
                     "lower and an upper bound, or neither)")


def _check_values(node: dict[str, Any], where: Where) -> None:
    """enum/const: xgrammar emits the values, ignoring the other keywords: they must all hold."""
    values = node["enum"] if "enum" in node else [node["const"]]
    if "enum" in node and "const" in node:
        values = [v for v in node["enum"] if v == node["const"]]
        if not values:
            _fail(where, "'const' is not among the 'enum' values: nothing can be generated")
    rest = {k: v for k, v in node.items() if k in VALIDATION and k not in ("enum", "const")}
    if not rest:
        return
    try:
        validator = jsonschema.Draft202012Validator(rest)
        bad = [v for v in values if not validator.is_valid(v)]
    except Exception:  # noqa: BLE001 - an invalid or unresolvable sibling schema
        bad = values[:1]
    if bad:
        _fail(where, f"the value {repr(bad[0])[:40]} of 'enum'/'const' fails the schema's other keywords, which "
                     f"the grammar backend does not apply to it")


def _check_combinator(root: Any, node: dict[str, Any], key: str, where: Where) -> None:
    if key != "oneOf" or len(node[key]) < 2:
        return
    branches = []
    for b in node[key]:
        try:
            branches.append(_deref(root, b))
        except RefError:
            return  # the branch's own check reports the bad $ref
    if _disjoint_types(branches) or _disjoint_discriminator(branches):
        return
    _fail(where, "'oneOf' branches that may overlap are not supported (the grammar backend generates any "
                 "branch, so an output could match two); use 'anyOf', or make the branches differ in 'type' "
                 "or in a required property's 'const'")


def _deref(root: Any, schema: Any, hops: int = 16) -> Any:
    while isinstance(schema, dict) and "$ref" in schema and hops:
        schema, hops = resolve(root, schema["$ref"]), hops - 1
    return schema


def _branch_types(schema: Any) -> set[str] | None:
    if not isinstance(schema, dict):
        return None
    if "type" in schema:
        t = schema["type"]
        names = {t} if isinstance(t, str) else set(t) if isinstance(t, list) else None
        return None if names is None else names | ({"number"} if "integer" in names else set())
    values = schema["enum"] if isinstance(schema.get("enum"), list) else [schema["const"]] if "const" in schema \
        else None
    if values is None:
        return None
    kinds = {_json_type(v) for v in values}
    return kinds | ({"number"} if "integer" in kinds else set())


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}.get(type(value), "object")


def _disjoint_types(branches: list[Any]) -> bool:
    sets = [_branch_types(b) for b in branches]
    if any(s is None for s in sets):
        return False
    return len(set().union(*sets)) == sum(len(s) for s in sets)  # pairwise disjoint


def _disjoint_discriminator(branches: list[Any]) -> bool:
    if not all(isinstance(b, dict) and isinstance(b.get("properties"), dict) for b in branches):
        return False
    common = set.intersection(*(set(b.get("required") or []) for b in branches))
    for name in sorted(common):
        seen: set[str] = set()
        for b in branches:
            prop = b["properties"].get(name)
            if not isinstance(prop, dict) or not ("const" in prop or isinstance(prop.get("enum"), list)):
                break
            keys = {_canonical(v) for v in ([prop["const"]] if "const" in prop else prop["enum"])}
            if keys & seen:
                break
            seen |= keys
        else:
            return True
    return False


def _canonical(value: Any) -> str:
    """JSON equality as a string: 1 and 1.0 the same, true and 1 not."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)
