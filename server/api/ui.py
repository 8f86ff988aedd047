"""The web playground: GET / (the page), GET /ui/<file> (its static files), and
GET /v1/moe/stats (the live numbers the page polls).

The page and its files ship in the package (`server/ui/`), load nothing from outside the
server, and need no build step. They are served without an API key (the page asks for the key
and sends it as a bearer token on its API calls); `/v1/moe/stats` is an API route and needs the
key like every other one. `--no-ui` leaves all three routes out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import Response

from server.api.errors import APIError
from server.metrics import names

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
PAGE = "index.html"
STATIC_PREFIX = "/ui/"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
# Everything comes from this server: no CDN, no inline script, no framing by other sites
# (frame-ancestors, and X-Frame-Options for browsers that predate it).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": CSP, **SECURITY_HEADERS}

# /v1/moe/stats: the core gauges and counters the live panel shows, by their exposed names.
STAT_SERIES = {
    names.NUM_REQUESTS_RUNNING.name: "num_requests_running",
    names.NUM_REQUESTS_WAITING.name: "num_requests_waiting",
    names.KV_CACHE_USAGE.name: "kv_cache_usage_perc",
    names.PROMPT_TOKENS.name: "prompt_tokens_total",
    names.GENERATION_TOKENS.name: "generation_tokens_total",
}


def static_files() -> dict[str, Path]:
    """File name -> path for every servable file of the UI folder (a fixed set: no path from
    the request ever reaches the file system)."""
    return {p.name: p for p in sorted(UI_DIR.iterdir()) if p.is_file() and p.suffix in MEDIA_TYPES}


def _file_response(path: Path) -> Response:
    return Response(content=path.read_bytes(), media_type=MEDIA_TYPES[path.suffix], headers=HEADERS)


def build_router(files: dict[str, Path]) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page() -> Response:
        return _file_response(files[PAGE])

    @router.get(STATIC_PREFIX + "{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        path = files.get(name)
        if path is None:
            raise APIError(404, f"No UI file named '{name[:80]}'.", code="not_found")
        return _file_response(path)

    @router.get("/v1/moe/stats")
    async def stats(request: Request) -> dict[str, Any]:
        return live_stats(request.app)

    return router


def live_stats(app: FastAPI) -> dict[str, Any]:
    """The serving numbers of the live panel, read from the app's metrics registry (the same
    values `/metrics` shows), plus the model facts the page needs to draw routing."""
    values: dict[str, float] = {}
    for family in app.state.metrics.registry.collect():
        for sample in family.samples:
            key = STAT_SERIES.get(sample.name)
            if key is not None:
                values[key] = values.get(key, 0.0) + sample.value
    info = app.state.engine.model_info
    return {
        "time": time.time(),
        **{key: values.get(key, 0.0) for key in STAT_SERIES.values()},
        "model": {"id": app.state.serving.model_name, "architecture": info.architecture,
                  "engine": app.state.config.engine.engine, "num_layers": info.num_layers,
                  "num_moe_layers": info.num_moe_layers or info.num_layers,
                  "num_experts": info.num_experts, "top_k": info.top_k,
                  "max_model_len": app.state.serving.limits.max_model_len,
                  "dtype": info.dtype, "device": info.device},
    }


def install(app: FastAPI) -> frozenset[str]:
    """Add the UI routes to `app`; returns the paths that open without an API key (the page
    and its static files, exact paths only)."""
    files = static_files()
    if PAGE not in files:
        raise RuntimeError(f"the web UI is missing {UI_DIR / PAGE}; reinstall moe-serve or run with --no-ui")
    app.include_router(build_router(files))
    return frozenset({"/", *(STATIC_PREFIX + name for name in files)})
