"""GET /v1/models and GET /v1/models/{model}: the one served model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from server.api.errors import model_not_found
from server.api.serving import Serving

router = APIRouter()


def _card(serving: Serving) -> dict[str, Any]:
    # `root` is the served name, never the checkpoint's path on the server's disk
    return {"id": serving.model_name, "object": "model", "created": serving.created,
            "owned_by": "moe-serve", "root": serving.model_name, "parent": None,
            "max_model_len": serving.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_card(request.app.state.serving)]}


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
    serving: Serving = request.app.state.serving
    if model != serving.model_name:
        raise model_not_found(model)
    return _card(serving)
