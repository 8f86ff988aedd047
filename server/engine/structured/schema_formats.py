"""`format` values that xgrammar generates only approximately, made exact: before compiling,
each becomes the `pattern` of the exact syntax (JSON Schema draft 2020-12 / RFC 3339 / RFC 2673).

- `ipv4`: xgrammar allows leading zeros ("06.1.1.1"), which the standard forbids;
- `date` (and the date of `date-time`): xgrammar allows any day 01-31 in any month and
  February 29 in any year; the pattern below knows month lengths and leap years;
- `time` (and the time of `date-time`): seconds 00-59 (no leap second, which is valid only at
  23:59:60 UTC), an upper-case `Z` or a numeric offset.
The other formats xgrammar supports are generated as they are (schema_support.FORMATS).
"""

from __future__ import annotations

from typing import Any

from server.engine.structured.schema_walk import copy_json, walk

_YEAR = r"(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"  # 0001-9999
_MONTH_DAY = (r"(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
              r"|02-(?:0[1-9]|1[0-9]|2[0-8]))")
_LEAP_YEAR = r"(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
DATE = rf"(?:{_YEAR}-{_MONTH_DAY}|{_LEAP_YEAR}-02-29)"
TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
PATTERNS = {"date": DATE, "time": TIME, "date-time": f"{DATE}T{TIME}", "ipv4": IPV4}


def exact_formats(schema: Any, nodes: list | None = None) -> Any:
    """`schema`, or a copy of it in which the formats above are their patterns (called after
    schema_support.check_supported, which refuses `format` beside `pattern` or lengths);
    `nodes`: walk(schema)'s output, if at hand."""
    if not any(isinstance(node, dict) and node.get("format") in PATTERNS for _p, node, _d in nodes or walk(schema)):
        return schema
    out = copy_json(schema)
    for _path, node, _depth in walk(out):
        if isinstance(node, dict) and node.get("format") in PATTERNS:
            node["pattern"] = f"^{PATTERNS[node.pop('format')]}$"
    return out
