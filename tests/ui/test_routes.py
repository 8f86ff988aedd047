"""The server side of the playground over real HTTP: the page and its static files (no key
needed, nothing from outside), /v1/moe/stats (key needed, the same numbers as /metrics),
`--no-ui`, and `prompt_routing` in streamed responses (which the routing view draws)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from server.api.ui import static_files
from server.cli import build_config
from tests.ui.conftest import API_KEY
from tests.ui.helpers import metric

ASSET = re.compile(r'(?:src|href)="([^"]+)"')
IMPORT = re.compile(r'from "(\./[^"]+)"')


def test_page_and_every_file_it_references_are_served_from_here(ui_http: httpx.Client):
    page = ui_http.get("/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp and "script-src 'self'" in csp
    refs = [r for r in ASSET.findall(page.text) if not r.startswith("#")]
    assert refs and all(r.startswith("/ui/") for r in refs), refs  # no CDN, no other host
    scripts = ["/ui/main.js"]
    seen = set()
    while scripts:  # follow the module imports: every one is served, with a JS content type
        path = scripts.pop()
        seen.add(path)
        r = ui_http.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript"), path
        scripts += [f"/ui/{m[2:]}" for m in IMPORT.findall(r.text) if f"/ui/{m[2:]}" not in seen]
    assert {"/ui/main.js", "/ui/api.js", "/ui/chat.js", "/ui/routing.js", "/ui/live.js"} <= seen
    for ref in refs:
        assert ui_http.get(ref).status_code == 200, ref
    assert ui_http.get("/ui/app.css").headers["content-type"] == "text/css; charset=utf-8"
    assert set(static_files()) >= {"index.html", "app.css", "favicon.svg"} | {p[4:] for p in seen}


@pytest.mark.parametrize("path", ["/ui/missing.js", "/ui/..%2F..%2Fconfig.py", "/ui/__init__.py", "/ui/"])
def test_unknown_ui_files_are_404(ui_http: httpx.Client, path: str):
    r = ui_http.get(path)
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_the_page_is_get_only(ui_http: httpx.Client):
    for method in ("POST", "PUT", "DELETE"):
        r = ui_http.request(method, "/")
        assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed", method


def test_with_a_key_the_page_opens_but_the_api_and_stats_do_not(servers):
    s = servers.keyed
    with httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.get("/").status_code == 200
        for name in static_files():
            assert c.get(f"/ui/{name}").status_code == 200, name
        assert c.get("/ui/missing.js").status_code == 401  # only the page's own files are open
        for path in ("/v1/moe/stats", "/v1/moe/routing", "/v1/models"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert c.get(path, headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 200, path
        assert c.get("/metrics").status_code == 200  # the user-facing exempt list is unchanged
    assert build_config([]).auth_exempt_paths == ("/health", "/ready", "/metrics", "/version")


def test_stats_match_the_metrics_endpoint(ui_server, ui_http: httpx.Client):
    r = ui_http.post("/v1/completions", json={"prompt": "The list type", "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200
    stats = ui_http.get("/v1/moe/stats").json()
    for key, name in [("num_requests_running", "vllm:num_requests_running"),
                      ("num_requests_waiting", "vllm:num_requests_waiting"),
                      ("kv_cache_usage_perc", "vllm:kv_cache_usage_perc"),
                      ("prompt_tokens_total", "vllm:prompt_tokens_total"),
                      ("generation_tokens_total", "vllm:generation_tokens_total")]:
        assert stats[key] == metric(ui_server.url, name), key
    assert stats["generation_tokens_total"] >= 5
    routing = ui_http.get("/v1/moe/routing").json()
    model = stats["model"]
    assert (model["num_moe_layers"], model["num_experts"], model["top_k"]) == (routing["num_layers"], routing["num_experts"], 2)
    assert model["id"] == ui_http.get("/v1/models").json()["data"][0]["id"]


def test_no_ui_turns_the_page_off(servers):
    s = servers.no_ui
    with httpx.Client(base_url=s.url, timeout=30) as c:
        for path in ("/", "/ui/main.js", "/ui/app.css", "/v1/moe/stats"):
            r = c.get(path)
            assert r.status_code == 404, path
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert c.get("/v1/models").status_code == 200  # the API is unaffected
    assert build_config(["--no-ui"]).ui is False and build_config([]).ui is True
    assert build_config([], environ={"MOE_SERVE_UI": "false"}).ui is False


def _stream(c: httpx.Client, path: str, body: dict) -> list[dict]:
    with c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streams_carry_prompt_routing_like_the_full_response(ui_http: httpx.Client, kind: str):
    """The routing view's prompt columns come from the stream's prompt_routing (and weights)."""
    text = f"A {kind} prompt for the streamed prompt routing test, long enough to fill two KV blocks."
    if kind == "chat":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
        count = ui_http.post("/tokenize", json=body).json()["count"]
    else:
        path, body = "/v1/completions", {"prompt": text}
        count = ui_http.post("/tokenize", json={"prompt": text}).json()["count"]
    body = {**body, "max_tokens": 3, "temperature": 0, "return_routing": True}
    chunks = _stream(ui_http, path, body)
    where = [c if kind == "chat" else c["choices"][0] for c in chunks]
    carrying = [w for w in where if w.get("prompt_routing")]
    assert len(carrying) == 1  # once, on the first chunk
    streamed, weights = carrying[0]["prompt_routing"], carrying[0]["prompt_routing_weights"]
    assert len(streamed) == len(weights) == count  # one entry per prompt token, every time
    full = ui_http.post(path, json=body).json()
    again = full if kind == "chat" else full["choices"][0]
    assert again["prompt_routing"] == streamed and again["prompt_routing_weights"] == weights
