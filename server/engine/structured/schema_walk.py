"""Walking a JSON schema's subschemas without recursion (a schema may be nested thousands of
levels deep), and resolving its local `$ref`s (`#`, `#/json/pointer`).

`subschemas(node)` lists the (keyword path, subschema) pairs directly under a schema object:
the keywords whose values are schemas (`items`, `not`, ...), lists of schemas (`anyOf`, ...) and
maps of schemas (`properties`, `$defs`, ...). Values under `const`, `enum`, `default` or
`examples` are data, never walked. `walk(root)` visits every subschema once, depth-first, with
its pointer and nesting depth.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote

ONE_KEYS = ("items", "additionalProperties", "additionalItems", "not", "if", "then", "else", "contains",
            "propertyNames", "unevaluatedItems", "unevaluatedProperties", "contentSchema")
LIST_KEYS = ("allOf", "anyOf", "oneOf", "prefixItems")
MAP_KEYS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def pointer(path: tuple[Any, ...]) -> str:
    """A JSON pointer ('#', '#/properties/a~1b') for a path of keys and indices."""
    return "#" + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


_KIND = {**{k: 1 for k in ONE_KEYS}, **{k: 2 for k in LIST_KEYS}, **{k: 3 for k in MAP_KEYS}}


def subschemas(node: dict[str, Any]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    for key, value in node.items():  # a schema has few keys: cheaper than looking each kind up
        kind = _KIND.get(key)
        if kind == 1:
            yield (key,), value
        elif kind == 2 and isinstance(value, list):
            for i, child in enumerate(value):
                yield (key, i), child
        elif kind == 3 and isinstance(value, dict):
            for name, child in value.items():
                yield (key, name), child


def walk(root: Any, max_depth: int | None = None) -> Iterator[tuple[tuple[Any, ...], Any, int]]:
    """(path, subschema, depth) for the root (depth 0) and every subschema under it, depth first
    in document order; nodes deeper than `max_depth` are yielded but not descended into (the
    caller refuses them)."""
    stack: list[tuple[tuple[Any, ...], Any, int]] = [((), root, 0)]
    while stack:
        path, node, depth = stack.pop()
        yield path, node, depth
        if not isinstance(node, dict) or (max_depth is not None and depth > max_depth):
            continue
        children = [(path + sub, child, depth + 1) for sub, child in subschemas(node)]
        children.reverse()
        stack.extend(children)


class RefError(ValueError):
    pass


def resolve(root: Any, ref: str) -> Any:
    """The schema a local `$ref` names (RefError if it is not local or does not resolve)."""
    if not isinstance(ref, str) or not ref.startswith("#"):
        raise RefError("only local references ('#' or '#/...') are supported")
    if ref == "#":
        return root
    if not ref.startswith("#/"):
        raise RefError("anchor references ('#name') are not supported; use '#/$defs/name'")
    node = root
    for raw in ref[2:].split("/"):
        part = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise RefError("does not resolve")
    if not isinstance(node, (dict, bool)):
        raise RefError("does not name a schema")
    return node


def rebase_refs(schema: Any, prefix: str) -> Any:
    """A copy of `schema` whose local `$ref`s point under `prefix` (a pointer such as
    '#/$defs/tool_0'): for embedding a schema inside another one, where '#' must keep meaning
    the embedded schema, not the new root."""
    out = copy_json(schema)
    for _path, node, _depth in walk(out):
        if isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#"):
            node["$ref"] = prefix + node["$ref"][1:]
    return out


def copy_json(value: Any) -> Any:
    """A deep copy of JSON data, without recursion."""
    if not isinstance(value, (dict, list)):
        return value
    top: Any = {} if isinstance(value, dict) else []
    stack = [(value, top)]
    while stack:
        src, dst = stack.pop()
        items = src.items() if isinstance(src, dict) else enumerate(src)
        for k, v in items:
            if isinstance(v, (dict, list)):
                child: Any = {} if isinstance(v, dict) else []
                stack.append((v, child))
            else:
                child = v
            if isinstance(dst, dict):
                dst[k] = child
            else:
                dst.append(child)
    return top
