"""How much work a JSON schema may ask of the grammar compiler, checked before it compiles.

What predicts xgrammar's compile time (`python -m loadtest schema-compile`; the measurements
are in docs/benchmarks.md, section "Grammar compile cost: what predicts it"):
- optional properties of one object: time grows as about k^3.5; required properties, enum
  values and anyOf branches grow about linearly;
- nesting written inline (an array of arrays of ..., objects in objects): the schema -> grammar
  conversion grows as about depth^3, while the same depth reached through `$ref`s stays linear;
- the size of the vocabulary multiplies the compile.
So the limits are on those measures, each a 400 that names it; a compile that still runs past
the time budget is stopped by the compile pool (server/engine/structured/compile_pool.py).
"""

from __future__ import annotations

from typing import Any

from server.engine.structured.schema_walk import pointer, walk

MAX_DEPTH = 32  # subschemas nested in subschemas
MAX_NODES = 5000  # subschemas in all
MAX_OPTIONAL_PROPERTIES = 128  # optional properties of one object
MAX_TOTAL_OPTIONAL_PROPERTIES = 1024  # optional properties of all objects
MAX_ENUM_VALUES = 1024  # enum values in all (const counts one)


class SchemaLimitError(ValueError):
    """`what` names the limit, `message` says where and by how much."""

    def __init__(self, what: str, message: str):
        super().__init__(message)
        self.what = what
        self.message = message


def check_limits(schema: Any) -> list[tuple[tuple[Any, ...], Any, int]]:
    """Raise SchemaLimitError for the first limit `schema` exceeds; else return its subschemas
    (walk's (path, node, depth)), for the checks that follow."""
    seen: list[tuple[tuple[Any, ...], Any, int]] = []
    nodes = optional_total = enum_values = 0
    for path, node, depth in walk(schema, max_depth=MAX_DEPTH):
        seen.append((path, node, depth))
        if depth > MAX_DEPTH:
            raise SchemaLimitError("depth", f"nested more than {MAX_DEPTH} levels deep (at {_short(path)}); "
                                            f"the limit is {MAX_DEPTH} (inline nesting costs the grammar "
                                            f"compiler about depth^3; reuse definitions through $ref)")
        nodes += 1
        if nodes > MAX_NODES:
            raise SchemaLimitError("nodes", f"more than {MAX_NODES} subschemas; the limit is {MAX_NODES}")
        if not isinstance(node, dict):
            continue
        enum = node.get("enum")
        enum_values += (len(enum) if isinstance(enum, list) else 0) + ("const" in node)
        if enum_values > MAX_ENUM_VALUES:
            raise SchemaLimitError("enum", f"more than {MAX_ENUM_VALUES} enum values in all; the limit is "
                                           f"{MAX_ENUM_VALUES}")
        props = node.get("properties")
        if isinstance(props, dict):
            required = node.get("required")
            req = set(required) if isinstance(required, list) and all(isinstance(r, str) for r in required) else set()
            optional = sum(1 for name in props if name not in req)
            if optional > MAX_OPTIONAL_PROPERTIES:
                raise SchemaLimitError("optional_properties", (
                    f"the object at {pointer(path)} has {optional} optional properties; the limit is "
                    f"{MAX_OPTIONAL_PROPERTIES} per object (their compile time grows as about their count^3.5; "
                    f"list the ones always present in 'required')"))
            optional_total += optional
            if optional_total > MAX_TOTAL_OPTIONAL_PROPERTIES:
                raise SchemaLimitError("optional_properties", (
                    f"more than {MAX_TOTAL_OPTIONAL_PROPERTIES} optional properties in all; the limit is "
                    f"{MAX_TOTAL_OPTIONAL_PROPERTIES}"))
    return seen


def _short(path: tuple[Any, ...]) -> str:
    text = pointer(path)
    return text if len(text) <= 80 else text[:40] + "..." + text[-37:]
