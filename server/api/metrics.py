"""GET /metrics (Prometheus text format) and GET /v1/moe/routing (expert-load snapshot)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.render()
    return Response(content=body, media_type=None, headers={"Content-Type": content_type})


@router.get("/v1/moe/routing")
async def routing(request: Request) -> dict[str, Any]:
    return request.app.state.metrics.routing_snapshot()
