"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

Every failure the API reports goes through `APIError` (or is converted into one by the
handlers installed with `install_error_handlers`): validation problems are 400 (never
FastAPI's 422), unknown routes 404, wrong methods 405, our own bugs 500.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

logger = logging.getLogger(__name__)

MAX_MESSAGE_CHARS = 500
RETRY_AFTER_SECONDS = 1
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away first


class ClientDisconnected(Exception):
    """The HTTP client went away; its engine requests have been aborted (logged as 499)."""


class APIError(Exception):
    """An error the API answers with; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = truncate(message, MAX_MESSAGE_CHARS)
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def truncate(text: str, limit: int = 80) -> str:
    """Never echo a huge input back: cut `text` to `limit` characters."""
    text = str(text)
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def error_body(message: str, type: str, param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_json_bytes(err: APIError, path: str = "") -> bytes:
    return json.dumps(body_for_path(err, path), ensure_ascii=False).encode("utf-8")


def error_response(err: APIError, path: str = "") -> JSONResponse:
    return JSONResponse(body_for_path(err, path), status_code=err.status, headers=err.headers)


# -- Anthropic's shape, on its routes: {"type": "error", "error": {"type", "message"}} ----------
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error", 504: "timeout_error"}


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_error_body(err: APIError) -> dict[str, Any]:
    kind = ANTHROPIC_ERROR_TYPES.get(err.status, "api_error" if err.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def body_for_path(err: APIError, path: str) -> dict[str, Any]:
    """The error body in the shape of the API `path` belongs to (Anthropic's or OpenAI's)."""
    return anthropic_error_body(err) if is_anthropic_path(path) else err.body()


# -- constructors for the common cases ---------------------------------------------------
def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{truncate(model)}' does not exist.", param="model",
                    code="model_not_found")


def overloaded(message: str = "The server is overloaded; retry later.") -> APIError:
    return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def unavailable(message: str, retry_after: int = RETRY_AFTER_SECONDS) -> APIError:
    return APIError(503, message, type="service_unavailable", code="service_unavailable",
                    headers={"Retry-After": str(retry_after)})


def timed_out(seconds: float) -> APIError:
    return APIError(504, f"The request did not finish within the server's timeout ({seconds:g}s).",
                    type="timeout_error", code="request_timeout")


def internal_error(message: str = "Internal server error.") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error")


def unauthorized() -> APIError:
    return APIError(401, "Invalid or missing API key. Send 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
                    type="invalid_request_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def body_timeout(seconds: float) -> APIError:
    return APIError(408, f"The request body did not arrive within {seconds:g}s.", code="request_timeout")


def invalid_host() -> APIError:
    return APIError(400, "Invalid Host header: this server does not answer to that host name "
                         "(see --allowed-hosts).", code="invalid_host")


def unsupported_media_type(content_type: str) -> APIError:
    return APIError(415, f"Content-Type must be application/json, not '{truncate(content_type, 60) or 'none'}'.",
                    code="unsupported_media_type")


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"Request body exceeds the limit of {limit} bytes.",
                    code="request_too_large")


# -- pydantic errors -> one short 400 -------------------------------------------------------
def loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        if part in ("body",) and not out:
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + truncate(str(part), 40)
    return out or None


_SHORT_MESSAGES = {
    "extra_forbidden": "Unrecognized request argument supplied",
    "missing": "Field required",
}
# What a union-typed field accepts, for the one message its several branch errors become.
_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of content parts",
    "tool_choice": "must be a string or an object",
}
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|literal\[.*\]|function-.*|constrained-.*)$",
                        re.IGNORECASE)


def _strip_union_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Pydantic puts the union member's name into `loc` ('prompt', 'list[int]', 1); drop those
    and whatever follows them (an index inside one branch means nothing to the client)."""
    loc = tuple(p for k, p in enumerate(loc) if not (p in _DISCRIMINATOR_TAGS and _is_tag(loc, k)))
    for k, part in enumerate(loc):
        if isinstance(part, str) and _UNION_TAG.match(part.replace(" ", "")):
            if "Part" in part and k + 1 < len(loc) and isinstance(loc[k + 1], int):  # a content part: named
                return (*loc[:k], loc[k + 1])
            return tuple(loc[:k])
    return tuple(loc)


# the tags of the discriminated unions (server/api/protocol.py: message roles, content part
# types), which pydantic puts into `loc` after the list index: ('messages', 0, 'user', 'content')
_DISCRIMINATOR_TAGS = {"system", "developer", "user", "assistant", "tool", "text", "refusal"}


def _unknown_tag(err: Mapping[str, Any], raw_loc: tuple[Any, ...]) -> APIError:
    ctx = err.get("ctx") or {}
    tag, field = str(ctx.get("tag", "")), str(ctx.get("discriminator", "")).strip("'")
    loc = tuple(p for k, p in enumerate(raw_loc) if not _is_tag(raw_loc, k))
    param = loc_to_param((*loc, field))
    expected = str(ctx.get("expected_tags", "")).replace("'", "")
    if field == "type" and "content" in loc:
        part = loc_to_param(loc)
        msg = f"{part}: content part type '{truncate(tag, 30)}' is not supported; expected one of {expected}"
    else:
        msg = f"{param}: '{truncate(tag, 30)}' is not supported; expected one of {expected}"
    return bad_request(truncate(msg, 300), param=param)


def _is_tag(loc: tuple[Any, ...], k: int) -> bool:
    part = loc[k]
    if not isinstance(part, str):
        return False
    if _UNION_TAG.match(part.replace(" ", "")):
        return True
    return part in _DISCRIMINATOR_TAGS and k > 0 and isinstance(loc[k - 1], int)


def _is_type_error(err: Mapping[str, Any]) -> bool:
    return str(err.get("type", "")).endswith("_type")


def _most_specific(errors: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The first error, or, when it is a union branch's type mismatch, the error of the branch
    whose type matched (a range or length violation says more than 'must be a string or ...')."""
    first = errors[0]
    if not _is_type_error(first):
        return first

    def where(e: Mapping[str, Any]) -> tuple[Any, ...]:
        return _strip_union_tags(tuple(p for p in e.get("loc", ()) if p != "body"))

    loc = where(first)
    return next((e for e in errors if where(e)[:len(loc)] == loc and not _is_type_error(e)), first)


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """The first pydantic error as a 400 naming its parameter (plus how many more there were)."""
    if not errors:
        return bad_request("Invalid request body.")
    err = _most_specific(errors)
    raw_loc = tuple(p for p in err.get("loc", ()) if p != "body")
    etype = err.get("type", "")
    if etype == "json_invalid":
        ctx = err.get("ctx") or {}
        return bad_request(f"Malformed JSON body: {truncate(ctx.get('error', err.get('msg', '')), 120)}")
    if etype in ("model_type", "model_attributes_type", "dict_type") and not raw_loc:
        return bad_request("The request body must be a JSON object.")
    if etype == "union_tag_invalid":  # a message role or a content part type this server does not take
        return _unknown_tag(err, raw_loc)
    if etype == "union_tag_not_found":  # no `role` (or part `type`) to tell the model by
        field = str((err.get("ctx") or {}).get("discriminator", "")).strip("'")
        param = loc_to_param((*(p for k, p in enumerate(raw_loc) if not _is_tag(raw_loc, k)), field))
        return bad_request(f"{param}: Field required", param=param)
    for e in errors:  # a content part of a type the served model does not take: named by its type
        eloc = tuple(p for p in e.get("loc", ()) if p != "body")
        if e.get("type") == "literal_error" and eloc[-1:] == ("type",) and "content" in eloc:
            part = loc_to_param(tuple(p for k, p in enumerate(eloc[:-1]) if not _is_tag(eloc, k)))
            return bad_request(f"{part}: content part type '{truncate(str(e.get('input')), 30)}' is not "
                               f"supported; the served model takes text only", param=f"{part}.type")
    loc = _strip_union_tags(raw_loc)
    param = loc_to_param(loc)
    if etype == "extra_forbidden":
        msg = f"Unrecognized request argument supplied: {param}"
    elif loc != raw_loc and loc and isinstance(loc[-1], str) and loc[-1] in _UNION_HINTS and _is_type_error(err):
        msg = f"{param}: {_UNION_HINTS[loc[-1]]}"
    else:
        text = _SHORT_MESSAGES.get(etype, err.get("msg", "Invalid value"))
        msg = f"{param}: {text}" if param else text
    others = {_strip_union_tags(tuple(p for p in e.get("loc", ()) if p != "body")) for e in errors} - {loc}
    if others:
        msg += f" (and {len(others)} more error{'s' if len(others) > 1 else ''})"
    return bad_request(truncate(msg, 300), param=param)


# -- handlers ------------------------------------------------------------------------------
def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return error_response(exc, request.url.path)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_error(list(exc.errors())), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            err = APIError(404, f"Route {request.method} {truncate(request.url.path)} not found.",
                           code="not_found", headers=headers)
        elif exc.status_code == 405:
            err = APIError(405, f"Method {request.method} is not allowed for "
                                f"{truncate(request.url.path)}.", code="method_not_allowed",
                           headers=headers)
        else:
            err = APIError(exc.status_code, truncate(str(exc.detail), 300), headers=headers,
                           type="invalid_request_error" if exc.status_code < 500 else "server_error")
        return error_response(err, request.url.path)
