"""JSON schemas shared by the structured-output benchmarks and tests.

`RECORD_SCHEMA` exercises what the issue lists: a nested object, an enum, integer bounds, an
array with minItems (and maxItems, so that sampled outputs stay short), a string pattern.
`record_instances(n)` makes valid instances of it (deterministic), used to drive matchers with
realistic token sequences.
"""

from __future__ import annotations

import json
import random

RECORD_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "name": {"type": "string", "pattern": "^[a-z]{2,8}$"},
        "kind": {"enum": ["module", "class", "function"]},
        "owner": {
            "type": "object",
            "properties": {
                "team": {"type": "string", "pattern": "^[a-z]{1,6}$"},
                "level": {"type": "integer", "minimum": 0, "maximum": 5},
            },
            "required": ["team", "level"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["io", "os", "net", "re", "sys"]}, "minItems": 1, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["id", "name", "kind", "owner", "tags", "active"],
    "additionalProperties": False,
}


def record_instances(n: int, seed: int = 0) -> list[str]:
    """`n` valid instances of RECORD_SCHEMA as compact JSON text (", " and ": " separators)."""
    rng = random.Random(seed)

    def word(lo: int, hi: int) -> str:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(lo, hi)))

    out = []
    for _ in range(n):
        doc = {"id": rng.randint(1, 9999), "name": word(2, 8), "kind": rng.choice(["module", "class", "function"]),
               "owner": {"team": word(1, 6), "level": rng.randint(0, 5)},
               "tags": rng.sample(["io", "os", "net", "re", "sys"], rng.randint(1, 3)), "active": rng.random() < 0.5}
        out.append(json.dumps(doc))
    return out
