"""Reading JSON request bodies ourselves, so every failure is a short OpenAI-shaped 400.

FastAPI's own body handling answers 422, coerces types and gives vague messages for a wrong
Content-Type or a non-UTF-8 body; here the checks run in a fixed order (content type, UTF-8,
JSON syntax, object, schema) and the schema still reaches the OpenAPI document through
`openapi_body` + `install_openapi`.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.requests import ClientDisconnect

from server.api.errors import ClientDisconnected, bad_request, unsupported_media_type, validation_error
from server.api.protocol import REQUEST_MODELS
from server.api.responses_api.protocol import ResponsesRequest

M = TypeVar("M", bound=BaseModel)
OFF_LOOP_BYTES = 64 * 1024  # bodies larger than this are parsed on the tokenizer thread
REF_TEMPLATE = "#/components/schemas/{model}"


def _is_json_content_type(value: str) -> bool:
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def read_json(request: Request, model: type[M]) -> M:
    # Required, not assumed: a web page on another origin may POST text/plain without a CORS
    # preflight, so accepting bodies of any type would let it drive a keyless local server.
    content_type = request.headers.get("content-type", "")
    if not _is_json_content_type(content_type):
        raise unsupported_media_type(content_type)
    try:
        raw = await request.body()
    except ClientDisconnect:  # the client left while sending its body: nothing to answer
        raise ClientDisconnected() from None
    if not raw.strip():
        raise bad_request("The request body is empty; expected a JSON object.")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"The request body is not valid UTF-8 (byte offset {e.start}).") from None
    if len(raw) <= OFF_LOOP_BYTES:
        return validate_body(model, raw)
    return await request.app.state.serving.tokens.run_blocking(validate_body, model, raw)  # big bodies: off the loop


def validate_body(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False)) from None  # inputs: unknown part types


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose body is read with `read_json(request, model)`."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF_TEMPLATE.format(model=model.__name__)}}}}}


def install_openapi(app: FastAPI) -> None:
    """Add the request-body models to the generated OpenAPI document's components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                             description=app.description)
        models: list[Any] = [*REQUEST_MODELS.values(), ResponsesRequest]
        _, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF_TEMPLATE)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
