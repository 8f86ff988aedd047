"""GET /health (liveness), /ready (readiness: 503 while starting or draining), /version."""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from server.api.errors import RETRY_AFTER_SECONDS, error_response, unavailable
from server.engine.protocol import EngineDeadError

router = APIRouter()
logger = logging.getLogger(__name__)


def _dead(e: EngineDeadError) -> Response:
    logger.error("health check: the engine is dead: %s", e)  # the reason stays in the log
    return error_response(unavailable("The engine is dead."))


def server_version() -> str:
    try:
        return metadata.version("moe-serve")
    except metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@router.get("/health")
async def health(request: Request) -> Response:
    try:
        await request.app.state.engine.check_health()
    except EngineDeadError as e:
        return _dead(e)
    return JSONResponse({"status": "ok"})


@router.get("/ready")
async def ready(request: Request) -> Response:
    state = request.app.state
    if state.draining:
        return error_response(unavailable("The server is shutting down.", RETRY_AFTER_SECONDS))
    if not state.ready:
        return error_response(unavailable("The server is starting.", RETRY_AFTER_SECONDS))
    try:
        await state.engine.check_health()
    except EngineDeadError as e:
        return _dead(e)
    return JSONResponse({"status": "ready"})


@router.get("/version")
async def version(request: Request) -> dict[str, Any]:
    """The server's version, its engine, the KV cache's dtype (--kv-cache-dtype) and, for the
    native engine, the kernel plan (which kernel serves each layer kind; models/kernels/plan.py)
    and the KV cache (blocks; the target's and a speculative drafter's bytes)."""
    info = request.app.state.serving.engine.model_info
    return {"version": server_version(), "engine": request.app.state.config.engine.engine,
            "async_scheduling": info.async_scheduling, "kv_cache_dtype": info.kv_cache_dtype,
            "kernel_plan": info.kernel_plan, "kv_cache": info.kv_cache}
