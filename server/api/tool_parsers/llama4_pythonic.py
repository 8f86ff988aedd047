"""`llama4_pythonic`: Llama 4 tool calls as a Python list of calls (vLLM's Llama 4 pythonic
template asks for this format and renders past calls so).

    some text[get_weather(city="Paris", days=3), run.cmd(argv=["ls", "-l"])]

optionally between `<|python_start|>` and `<|python_end|>`. The section starts at the first `[`
followed by a name and `(`; it must be exactly one Python list of calls with keyword arguments
whose values are literals (strings, numbers, True / False / None, lists, dicts: read with
`ast.literal_eval`, never evaluated), and nothing but whitespace after it. Arguments become the
JSON object of those keywords.
"""

from __future__ import annotations

import ast
import json
import re
import warnings

from server.api.tool_parsers.base import ToolParser
from server.api.tool_parsers.json_scan import partial_suffix
from server.api.tool_parsers.strict import Call, check_name

PY_START, PY_END = "<|python_start|>", "<|python_end|>"
SECTION = re.compile(r"(?:<\|python_start\|>\s*)?\[\s*[A-Za-z_][\w.]*\s*\(")
MAYBE_SECTION = re.compile(r"\[\s*(?:[A-Za-z_][\w.]*\s*)?$")  # a `[` that may still open the section


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    raise ValueError("a call's function must be a name")


class Llama4PythonicToolParser(ToolParser):
    name = "llama4_pythonic"
    marker = "["

    def section_start(self, text: str) -> int | None:
        m = SECTION.search(text)
        return m.start() if m else None

    def undecided_tail(self, text: str) -> int:
        k = text.rfind("[")
        held = len(text) - k if k >= 0 and MAYBE_SECTION.match(text, k) else 0
        return max(held, partial_suffix(text, PY_START))

    def read_calls(self, text: str, start: int) -> list[Call]:
        source = text[start:].strip().removeprefix(PY_START).strip()
        if source.endswith(PY_END):
            source = source[:-len(PY_END)].rstrip()
        try:
            with warnings.catch_warnings():  # Python's own complaints (an invalid escape) are no output
                warnings.simplefilter("ignore")
                tree = ast.parse(source, mode="eval")
        except SyntaxError:
            raise ValueError("not a Python list of calls") from None
        if not isinstance(tree.body, ast.List) or not tree.body.elts:
            raise ValueError("not a Python list of calls")
        calls = []
        for node in tree.body.elts:
            if not isinstance(node, ast.Call) or node.args:
                raise ValueError("a tool call takes keyword arguments only")
            name = check_name(_dotted(node.func))
            args = {}
            for kw in node.keywords:
                if kw.arg is None or kw.arg in args:
                    raise ValueError("**kwargs or a duplicate keyword")
                args[kw.arg] = ast.literal_eval(kw.value)
            try:
                arguments = json.dumps(args, ensure_ascii=False, allow_nan=False)
            except (TypeError, ValueError):
                raise ValueError("an argument that is not JSON (a set, bytes, a tuple key, NaN)") from None
            calls.append(Call(name, arguments))
        return calls
