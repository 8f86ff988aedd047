"""/docs (Swagger UI) and /redoc (ReDoc): the API reference pages, served wholly from this server.

FastAPI's own pages load swagger-ui and redoc from a public CDN (a floating major version, no
integrity hash) and start them with an inline script, on the playground's origin and without a
CSP. Here the two bundles come from the pinned `fastapi-offline` package, which ships them in
its wheel (read once at startup: a fixed set of files, no path from a request reaches the file
system); the pages and the scripts that start the bundles are ours (server/ui/docs/). Every
response carries the playground's security headers and a CSP that lets nothing load from
elsewhere (ReDoc's page allows the inline styles and the blob worker it needs).

Without the package (a broken install) the pages are left out, with a warning.
"""

from __future__ import annotations

import html
import importlib.util
import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI
from starlette.responses import Response

from server.api.errors import APIError
from server.api.ui import CSP as UI_CSP
from server.api.ui import MEDIA_TYPES, SECURITY_HEADERS, UI_DIR

logger = logging.getLogger(__name__)

DOCS_PATH, REDOC_PATH = "/docs", "/redoc"
STATIC_PREFIX = "/docs/static/"
VENDOR_PACKAGE = "fastapi_offline"  # pyproject pins its version
VENDOR_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
OWN_FILES = ("swagger-init.js", "redoc-init.js")
# Swagger UI runs under the playground's policy. ReDoc styles itself with inline <style> elements
# (styled-components) and runs its search index in a worker it makes from a blob of its own
# code, so its page allows those two, and nothing more.
CSP = UI_CSP
REDOC_CSP = UI_CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'") + "; worker-src blob:"
PAGE_HEADERS = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "Content-Security-Policy": CSP}
REDOC_HEADERS = {**PAGE_HEADERS, "Content-Security-Policy": REDOC_CSP}
# the bundles are pinned: a day in the browser cache spares their megabytes on every visit
# (docs/benchmarks.md, section "Numbers behind code choices")
ASSET_HEADERS = {**PAGE_HEADERS, "Cache-Control": "public, max-age=86400"}


def vendor_dir() -> Path | None:
    """The folder of the pinned package's swagger-ui / redoc bundles, None when not installed."""
    spec = importlib.util.find_spec(VENDOR_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent / "static"
    return folder if all((folder / name).is_file() for name in VENDOR_FILES) else None


def _page(title: str, body_id: str, css: list[str], scripts: list[str], openapi_url: str) -> str:
    links = "".join(f'<link rel="stylesheet" href="{STATIC_PREFIX}{name}">' for name in css)
    tags = "".join(f'<script src="{STATIC_PREFIX}{name}"></script>' for name in scripts)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{html.escape(title)}"
            f"</title><link rel=\"icon\" href=\"{STATIC_PREFIX}favicon.png\">{links}</head>"
            f"<body><div id=\"{body_id}\" data-openapi=\"{html.escape(openapi_url)}\"></div>{tags}</body></html>\n")


def build_router(files: dict[str, bytes], title: str, openapi_url: str) -> APIRouter:
    router = APIRouter()
    swagger = _page(f"{title} - Swagger UI", "swagger-ui", ["swagger-ui.css"],
                    ["swagger-ui-bundle.js", "swagger-init.js"], openapi_url).encode()
    redoc = _page(f"{title} - ReDoc", "redoc", [], ["redoc.standalone.js", "redoc-init.js"], openapi_url).encode()

    @router.get(DOCS_PATH, include_in_schema=False)
    async def swagger_page() -> Response:
        return Response(swagger, media_type=MEDIA_TYPES[".html"], headers=PAGE_HEADERS)

    @router.get(REDOC_PATH, include_in_schema=False)
    async def redoc_page() -> Response:
        return Response(redoc, media_type=MEDIA_TYPES[".html"], headers=REDOC_HEADERS)

    @router.get(STATIC_PREFIX + "{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        content = files.get(name)
        if content is None:
            raise APIError(404, f"No docs file named '{name[:80]}'.", code="not_found")
        return Response(content, media_type=MEDIA_TYPES[Path(name).suffix], headers=ASSET_HEADERS)

    return router


def install(app: FastAPI) -> bool:
    """Add /docs, /redoc and their files to `app` (built with docs_url=None, redoc_url=None);
    False (pages left out) when the bundles are not installed."""
    vendor = vendor_dir()
    if vendor is None:
        logger.warning("API docs pages (%s, %s) are off: the %s package with the swagger-ui and redoc "
                       "bundles is not installed (pip install -e .)", DOCS_PATH, REDOC_PATH, VENDOR_PACKAGE)
        return False
    files = {name: (vendor / name).read_bytes() for name in VENDOR_FILES}
    files.update({name: (UI_DIR / "docs" / name).read_bytes() for name in OWN_FILES})
    app.include_router(build_router(files, app.title, app.openapi_url or "/openapi.json"))
    return True
