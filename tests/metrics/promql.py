"""Pull metric names out of PromQL expressions (enough for our dashboards and alert rules)."""

from __future__ import annotations

import re

KEYWORDS = frozenset({
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and",
    "or", "unless", "inf", "nan", "Inf", "NaN",
})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSET = re.compile(r"\boffset\s+-?\w+")
_VAR = re.compile(r"\$\{?\w+\}?")
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENT = re.compile(r"[A-Za-z_:][\w:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[\w]+\s*\)\s*$", re.DOTALL)


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (functions and keywords excluded)."""
    lv = _LABEL_VALUES.match(expr)  # Grafana variable query: label_values(<selector>, label)
    if lv:
        expr = lv.group(1)
    s = _STRING.sub('""', expr)
    s = _MATCHERS.sub(" ", s)
    s = _RANGE.sub(" ", s)
    s = _GROUPING.sub(" ", s)
    s = _OFFSET.sub(" ", s)
    s = _VAR.sub(" ", s)
    s = _NUMBER.sub(" ", s)
    out: set[str] = set()
    for m in _IDENT.finditer(s):
        tok = m.group()
        if tok in KEYWORDS or s[m.end():].lstrip().startswith("("):
            continue  # keyword, function or aggregation operator
        out.add(tok)
    return out
