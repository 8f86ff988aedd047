"""GET /v1/models and GET /v1/models/{model}: the one served model."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.api.errors import model_not_found
from server.api.responses import ERROR_RESPONSES, ModelCard, ModelList
from server.api.serving import Serving

router = APIRouter()


def _card(serving: Serving) -> ModelCard:
    # `root` is the served name, never the checkpoint's path on the server's disk
    return ModelCard(id=serving.model_name, object="model", created=serving.created, owned_by="moe-serve",
                     root=serving.model_name, parent=None, max_model_len=serving.limits.max_model_len)


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return ModelList(object="list", data=[_card(request.app.state.serving)])


@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def retrieve_model(model: str, request: Request) -> ModelCard:
    serving: Serving = request.app.state.serving
    if model != serving.model_name:
        raise model_not_found(model)
    return _card(serving)
