"""Structured-output fields of a request -> one `StructuredSpec` (checked on the event loop: a JSON
schema's keywords and size, spec.check_schema), then compiled through the grammar service
(`Serving.compile_structured`: the cache, else the compile pool's processes).

Accepted spellings (one constraint per request; two are a 400 naming both):
- OpenAI: `response_format` {"type": "json_object"} | {"type": "json_schema", "json_schema":
  {"name", "description", "schema", "strict"}} | {"type": "text"};
- vLLM: `structured_outputs` {json | regex | choice | grammar | json_object} and the older
  `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` (`guided_decoding_backend`
  is accepted and ignored: this server always uses xgrammar).
JSON is generated compactly (no free whitespace) unless `structured_outputs.disable_any_whitespace`
is false.
"""

from __future__ import annotations

import re
from typing import Any

from server.api.errors import bad_request
from server.engine.structured.spec import (
    StructuredSpec,
    StructuredSpecError,
    choice_spec,
    grammar_spec,
    json_object_spec,
    json_schema_spec,
    regex_spec,
)

_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}
_SO_KINDS = ("json", "regex", "choice", "grammar", "json_object")


def spec_error(e: StructuredSpecError):
    return bad_request(e.message, param=e.param)


def request_spec(body: Any) -> StructuredSpec | None:
    """The structured-output constraint a completion or chat body asks for, or None (400s here)."""
    try:
        found = [s for s in (_response_format(body.response_format), _structured_outputs(body.structured_outputs),
                             *_guided(body)) if s is not None]
    except StructuredSpecError as e:
        raise spec_error(e) from None
    if len(found) > 1:
        names = ", ".join(s.param for s in found)
        raise bad_request(f"{found[1].param}: only one structured-output constraint per request (got {names})",
                          param=found[1].param)
    spec = found[0] if found else None
    if spec is not None and body.min_tokens:
        raise bad_request("min_tokens: not supported together with structured outputs (the structure decides "
                          "where the output ends)", param="min_tokens")
    return spec


def _response_format(rf: Any) -> StructuredSpec | None:
    if rf is None or rf.type == "text":
        if rf is not None and rf.json_schema is not None:
            raise StructuredSpecError("response_format.json_schema", "response_format.json_schema: only allowed "
                                                                     "with type 'json_schema'")
        return None
    if rf.type == "json_object":
        return json_object_spec("response_format")
    if rf.type != "json_schema":
        raise StructuredSpecError("response_format.type", f"response_format.type: must be 'text', 'json_object' "
                                                          f"or 'json_schema', not '{str(rf.type)[:40]}'")
    js = rf.json_schema
    if js is None:
        raise StructuredSpecError("response_format.json_schema", "response_format.json_schema: is required "
                                                                 "with type 'json_schema'")
    unknown = sorted(set(js) - _JSON_SCHEMA_KEYS)
    if unknown:
        raise StructuredSpecError("response_format.json_schema", f"response_format.json_schema: unknown field(s) "
                                                                 f"{', '.join(unknown)[:100]}")
    name = js.get("name")
    if name is not None and (not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name)):
        raise StructuredSpecError("response_format.json_schema.name", "response_format.json_schema.name: 1-64 "
                                                                      "letters, digits, '_' or '-'")
    if "strict" in js and js["strict"] is not None and not isinstance(js["strict"], bool):
        raise StructuredSpecError("response_format.json_schema.strict",
                                  "response_format.json_schema.strict: must be a boolean")
    if "schema" not in js:
        raise StructuredSpecError("response_format.json_schema.schema", "response_format.json_schema.schema: is "
                                                                        "required")
    return json_schema_spec(js["schema"], "response_format.json_schema.schema")


def _structured_outputs(so: Any) -> StructuredSpec | None:
    if so is None:
        return None
    if so.structural_tag is not None:
        raise StructuredSpecError("structured_outputs.structural_tag", "structured_outputs.structural_tag: is not "
                                                                       "supported by this server")
    if so.whitespace_pattern is not None:
        raise StructuredSpecError("structured_outputs.whitespace_pattern", "structured_outputs.whitespace_pattern: "
                                                                           "is not supported (xgrammar backend)")
    given = {"json": so.json_schema, "regex": so.regex, "choice": so.choice, "grammar": so.grammar,
             "json_object": so.json_object or None}
    kinds = [k for k in _SO_KINDS if given[k] is not None]
    if len(kinds) != 1:
        raise StructuredSpecError("structured_outputs", f"structured_outputs: exactly one of {', '.join(_SO_KINDS)} "
                                                        f"must be set (got {', '.join(kinds) or 'none'})")
    kind, any_ws = kinds[0], so.disable_any_whitespace is False
    param = f"structured_outputs.{kind}"
    if kind == "json":
        return json_schema_spec(so.json_schema, param, any_ws)
    if kind == "json_object":
        return json_object_spec(param, any_ws)
    return {"regex": regex_spec, "choice": choice_spec, "grammar": grammar_spec}[kind](given[kind], param)


def _guided(body: Any) -> list[StructuredSpec | None]:
    return [
        json_schema_spec(body.guided_json, "guided_json") if body.guided_json is not None else None,
        regex_spec(body.guided_regex, "guided_regex") if body.guided_regex is not None else None,
        choice_spec(body.guided_choice, "guided_choice") if body.guided_choice is not None else None,
        grammar_spec(body.guided_grammar, "guided_grammar") if body.guided_grammar is not None else None,
    ]
