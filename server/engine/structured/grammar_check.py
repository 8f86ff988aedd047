"""Dead ends in a compiled grammar: rules that derive no finite text.

`root ::= root` compiles, but its language is empty: the first mask allows no token, the
sampler then picks a forbidden one and the matcher rejects it mid-request. More generally a
reachable rule that can never finish (`x ::= "a" x`) is a dead end the output can walk into.
A context-free grammar whose reachable rules all derive some finite text has no dead ends:
every prefix the matcher accepts can be completed. This checks exactly that, on xgrammar's
normalised grammar (its serialized expression table), so such a grammar is a 400 at compile
time instead of a 500 during generation.

Expression layout (xgrammar's serialization v18): expression i starts at
`grammar_expr_data[indptr[i]]` (and ends where the next one starts): `[type, length, payload...]`; types: 0 byte string, 1 character class (payload: negated,
then lo/hi pairs), 2 character class star, 3 empty string, 4 rule reference, 5 sequence, 6
choices, 8 repeat (rule, min, max). Anything else is taken as productive (never a false 400).
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

BYTES, CLASS, CLASS_STAR, EMPTY, RULE_REF, SEQUENCE, CHOICES, REPEAT = 0, 1, 2, 3, 4, 5, 6, 8
MAX_CODEPOINT = 0x10FFFF


def dead_rules(grammar_json: str) -> list[str]:
    """Names of the rules reachable from the root that derive no finite text (root first)."""
    d = json.loads(grammar_json)
    data, indptr, rules = d["grammar_expr_data"], d["grammar_expr_indptr"], d["rules"]
    ends = list(indptr[1:]) + [len(data)]
    exprs = [data[start:end] for start, end in zip(indptr, ends)]
    bodies = [r[1] for r in rules]
    refs = [_rule_refs(exprs, b) for b in bodies]
    reachable = _reachable(refs, d.get("root_rule_id", 0))
    productive: set[int] = set()
    users: dict[int, list[int]] = {}
    for rule, used in enumerate(refs):
        for r in used:
            users.setdefault(r, []).append(rule)
    queue = deque(range(len(rules)))
    while queue:
        rule = queue.popleft()
        if rule in productive or not _produces(exprs, bodies[rule], productive):
            continue
        productive.add(rule)
        queue.extend(u for u in users.get(rule, ()) if u not in productive)
    root = d.get("root_rule_id", 0)
    dead = [r for r in sorted(reachable, key=lambda r: (r != root, r)) if r not in productive]
    return [rules[r][0] for r in dead]


def _rule_refs(exprs: list[list[int]], expr_id: int) -> set[int]:
    out: set[int] = set()
    stack = [expr_id]
    while stack:
        e = exprs[stack.pop()]
        kind, payload = e[0], e[2:]
        if kind == RULE_REF:
            out.add(payload[0])
        elif kind == REPEAT:
            out.add(payload[0])
        elif kind in (SEQUENCE, CHOICES):
            stack.extend(payload)
    return out


def _reachable(refs: list[set[int]], root: int) -> set[int]:
    seen = {root}
    stack = [root]
    while stack:
        for r in refs[stack.pop()]:
            if r not in seen:
                seen.add(r)
                stack.append(r)
    return seen


def _produces(exprs: list[list[int]], expr_id: int, productive: set[int], depth: int = 0) -> bool:
    e: Any = exprs[expr_id]
    kind, payload = e[0], e[2:]
    if depth > 64:
        return True
    if kind == RULE_REF:
        return payload[0] in productive
    if kind == REPEAT:
        return payload[1] == 0 or payload[0] in productive
    if kind == SEQUENCE:
        return all(_produces(exprs, p, productive, depth + 1) for p in payload)
    if kind == CHOICES:
        return any(_produces(exprs, p, productive, depth + 1) for p in payload)
    if kind == CLASS:
        return _class_nonempty(payload)
    return True  # byte strings, class stars, the empty string, and kinds this does not know


def _class_nonempty(payload: list[int]) -> bool:
    negated, ranges = payload[0], sorted(zip(payload[1::2], payload[2::2]))
    if not negated:
        return any(lo <= hi for lo, hi in ranges)
    covered = -1  # every code point up to here is excluded
    for lo, hi in ranges:
        if lo > covered + 1:
            return True
        covered = max(covered, hi)
    return covered < MAX_CODEPOINT
