"""/docs and /redoc (hardening round 2, item 11): the Swagger UI and ReDoc pages load nothing from
outside the server (FastAPI's defaults pull swagger-ui / redoc from a CDN, a floating version
without an integrity hash), and carry the playground's security headers; every page that sends
a CSP also sends X-Frame-Options: DENY. Over plain HTTP, then in the real headless Chromium."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from server.api.ui import CSP as PLAYGROUND_CSP

REF = re.compile(r'(?:src|href)="([^"]*)"')
SCRIPT = re.compile(r"<script\b([^>]*)>(.*?)</script>", re.S)
DOCS_PAGES = {"/docs": "text/javascript", "/redoc": "text/javascript"}


def _security_headers(r: httpx.Response) -> str:
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
    csp = r.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "connect-src 'self'", "img-src 'self' data:",
                      "object-src 'none'", "base-uri 'none'", "frame-ancestors 'none'"):
        assert directive in csp, (directive, csp)
    assert "unsafe-eval" not in csp and "http" not in csp and "*" not in csp
    return csp


@pytest.mark.parametrize("path", sorted(DOCS_PAGES))
def test_docs_pages_load_only_this_servers_files_with_security_headers(ui_http: httpx.Client, path: str):
    page = ui_http.get(path)
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    csp = _security_headers(page)
    if path == "/docs":  # Swagger UI runs under the playground's own policy
        assert csp == PLAYGROUND_CSP
    assert "//" not in page.text  # no URL with a host (http://, https://, //cdn...) anywhere in the page
    for attrs, inline in SCRIPT.findall(page.text):  # no inline code: the CSP would refuse it anyway
        assert "src=" in attrs and not inline.strip(), attrs
    refs = REF.findall(page.text)
    assert refs and all(r.startswith("/docs/static/") for r in refs), refs
    kinds = set()
    for ref in refs:
        r = ui_http.get(ref)
        assert r.status_code == 200 and len(r.content) > 0, ref
        _security_headers(r)
        kinds.add(r.headers["content-type"].split(";")[0])
    assert "text/javascript" in kinds
    spec = page.text.split('data-openapi="', 1)[1].split('"', 1)[0]
    assert spec == "/openapi.json" and ui_http.get(spec).json()["paths"]["/v1/completions"]


def test_every_page_with_a_csp_forbids_framing(ui_http: httpx.Client):
    for path in ("/", "/ui/main.js", "/docs", "/redoc", "/docs/static/swagger-init.js"):
        r = ui_http.get(path)
        assert r.status_code == 200, path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
        assert r.headers["x-frame-options"] == "DENY", path
    for path in ("/docs/static/missing.js", "/docs/static/..%2F..%2Fapp.py", "/docs/oauth2-redirect"):
        r = ui_http.get(path)
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}, path


@pytest.mark.parametrize("path,selector", [("/docs", ".opblock"), ("/redoc", "[data-section-id]")])
def test_docs_pages_render_in_a_real_browser_under_their_csp(browser, ui_server, path: str, selector: str):
    """The bundles run under the strict policy: the operations are drawn, and the only thing the
    browser refuses is the one external image the ReDoc bundle asks for (its logo)."""
    from selenium.webdriver.common.by import By

    browser.get_log("browser")  # drop what earlier tests left
    browser.get(ui_server.url + path)
    deadline = time.monotonic() + 30
    while not browser.find_elements(By.CSS_SELECTOR, selector) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(browser.find_elements(By.CSS_SELECTOR, selector)) >= 5, browser.page_source[:2000]
    assert "/v1/chat/completions" in browser.find_element(By.TAG_NAME, "body").text
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    refused_external = [m for m in errors if "Content Security Policy" in m and "https://" in m]
    assert errors == refused_external, errors
