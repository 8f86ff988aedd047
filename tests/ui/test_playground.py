"""The playground in a real headless Chromium against a real moe-serve: streamed chat, the
routing view (checked against the API's own routing for the same greedy request), prompt-token
routing, the expert-load panel, completion mode, and the stop button aborting on the server."""

from __future__ import annotations

import httpx
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

from tests.ui.conftest import DESKTOP, save_screenshot
from tests.ui.helpers import (
    api_total_assignments,
    by_testid,
    configure,
    js_errors,
    last_response,
    load_panel,
    metric,
    open_page,
    routing_table,
    send_and_watch,
    wait,
    wait_idle,
)

QUESTION = "What is a list?"  # with the chat template: under one KV block, so no prefix-cache hit
# long enough to span several of the page's renders on a fast CPU (40 tokens came in one render)
MAX_TOKENS = 200


def test_chat_streams_routes_and_updates_the_load_panel(browser, ui_server, ui_http: httpx.Client, artifacts):
    browser.set_window_size(*DESKTOP)
    open_page(browser, ui_server.url)
    wait(browser, lambda d: load_panel(d)["updates"] >= 1, what="live panel's first refresh")
    num_layers = ui_http.get("/v1/moe/routing").json()["num_layers"]
    model = ui_http.get("/v1/moe/stats").json()["model"]

    # the same greedy request through the API first: the page must show exactly this
    ref = ui_http.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_TOKENS, "temperature": 0, "seed": 7,
        "return_routing": True}).json()
    ref_tokens = ref["usage"]["completion_tokens"]
    ref_routing = ref["choices"][0]["routing"]  # [token][layer][top_k]
    ref_weights = ref["choices"][0]["routing_weights"]  # the same nesting
    assert ref_tokens > 4 and len(ref_routing) == ref_tokens - 1  # the last token is never run
    before = api_total_assignments(ui_http)

    configure(browser, temperature="0", max_tokens=str(MAX_TOKENS), seed="7")
    lengths = send_and_watch(browser, QUESTION)
    status = wait_idle(browser)
    assert status.startswith(f"Done: {ref_tokens} tokens"), status
    # the page renders at most once per 80 ms (chat.js RENDER_MS) and the bundled model decodes a
    # token in 1-3 ms here: streamed = a partial text was shown before the whole
    growth = sorted(set(lengths) - {0})
    assert len(growth) >= 2, f"the text did not visibly stream: lengths seen {lengths}"
    assert last_response(browser) == ref["choices"][0]["message"]["content"]

    table = routing_table(browser)
    assert table["layers"] == [f"L{i}" for i in range(num_layers)] and num_layers == model["num_moe_layers"]
    assert [h["kind"] for h in table["heads"]] == ["gen"] * ref_tokens  # one column per generated token
    shown = [[table["rows"][layer][t] for layer in range(num_layers)] for t in range(ref_tokens - 1)]
    assert shown == ref_routing
    assert all(table["rows"][layer][-1] is None for layer in range(num_layers))  # last token: no routing
    assert all(len(e) == model["top_k"] for row in table["rows"] for e in row if e is not None)

    # the expert-load panel refreshes after the response, to the server's own totals
    after = api_total_assignments(ui_http)
    assert after > before
    wait(browser, lambda d: load_panel(d)["total"] == after, 10, "load panel shows the new totals")
    heat = browser.find_element(By.ID, "heatmap")
    assert heat.size["height"] > 0 and heat.size["width"] > 100
    layer_rows = browser.find_elements(By.CSS_SELECTOR, "#layer-table tbody tr")
    assert len(layer_rows) == num_layers

    # hovering a token shows its experts and their router weights per layer
    first_token = browser.find_element(By.CSS_SELECTOR, "#routing thead th.tok button")
    heading = browser.find_element(By.ID, "routing-title")  # from outside the table onto the token
    ActionChains(browser).scroll_to_element(first_token).move_to_element(heading).move_to_element(first_token).perform()
    detail = browser.find_element(By.ID, "token-detail").text.splitlines()
    assert detail[0].startswith("generated token 1: ")
    assert detail[1 : 1 + num_layers] == [
        f"L{layer}: " + ", ".join(f"expert {e} · {w:.2f}" for e, w in zip(ref_routing[0][layer], ref_weights[0][layer]))
        for layer in range(num_layers)]
    save_screenshot(browser, artifacts / "playground-desktop.png", docs_name="playground.png")

    # a second turn with prompt tokens shown: columns for the whole templated prompt
    browser.find_element(By.ID, "show-prompt").click()
    configure(browser, temperature="0", max_tokens="12", seed="7")
    send_and_watch(browser, "And a tuple?")
    wait_idle(browser)
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": last_turn(ref)},
                {"role": "user", "content": "And a tuple?"}]
    n_prompt = ui_http.post("/tokenize", json={"messages": messages})
    assert n_prompt.status_code == 200, n_prompt.text
    table = routing_table(browser)
    kinds = [h["kind"] for h in table["heads"]]
    assert kinds.count("prompt") == n_prompt.json()["count"] and kinds[: kinds.count("prompt")] == ["prompt"] * kinds.count("prompt")
    # requests with return_routing bypass the prefix cache: every prompt token has its experts
    assert all(table["rows"][layer][i] is not None for layer in range(num_layers) for i in range(kinds.count("prompt")))
    assert js_errors(browser) == []


def last_turn(ref: dict) -> str:
    return ref["choices"][0]["message"]["content"]


def test_completion_mode_streams_raw_text(browser, ui_server):
    open_page(browser, ui_server.url)
    browser.find_element(By.CSS_SELECTOR, "label[for=mode-completion]").click()
    assert not browser.find_element(By.ID, "system-row").is_displayed()
    configure(browser, temperature="0", max_tokens="16")
    send_and_watch(browser, "The list type")
    assert wait_idle(browser).startswith("Done: 16 tokens")
    text = browser.execute_script("return document.querySelector('[data-testid=output] .msg.completion .text').textContent")
    assert text.startswith("The list type") and len(text) > len("The list type")
    assert [h["kind"] for h in routing_table(browser)["heads"]] == ["gen"] * 16
    browser.find_element(By.ID, "copy").click()
    wait(browser, lambda d: d.find_element(By.ID, "status").text == "Copied the last response.", 5, "copy")

    # a request the server refuses: its OpenAI error message is shown, and the page goes on
    configure(browser, temperature="0", max_tokens="5000")
    send_and_watch(browser, "The list type")
    assert wait_idle(browser) == "The request failed."
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and error.text.startswith("Error 400: ") and "max_tokens" in error.text
    browser.find_element(By.ID, "clear").click()
    assert by_testid(browser, "output").text == "Responses stream here."
    assert routing_table(browser)["heads"] == [] and browser.find_element(By.ID, "routing-caption").text == "No response yet."


def test_stop_aborts_the_request_on_the_server(browser, ui_server):
    open_page(browser, ui_server.url)
    browser.find_element(By.CSS_SELECTOR, "label[for=mode-completion]").click()
    # seed 2 runs this prompt to 707 tokens before EOS, so to all 700 asked for: long enough to stop
    # it midway on 2 slow cores (15-25 s), but a fast CPU decodes them in about a second while the
    # throttled page shows its first lines, and may finish before the page's abort reaches it. An
    # attempt counts where the server aborted the request (its abort counter moved); up to 3: a
    # Stop that aborts nothing on the server fails all three.
    configure(browser, temperature="1", max_tokens="700", seed="2")
    box, stop = by_testid(browser, "prompt"), by_testid(browser, "stop")
    for _attempt in range(3):
        aborted = metric(ui_server.url, "vllm:request_success_total", finished_reason="abort")
        box.clear()
        box.send_keys("The list type")
        where = stop.location  # the page scrolls nowhere by itself: Stop must stay here while text streams
        # a slow device (a 4x slower CPU): the page must stay responsive while tokens pour in
        browser.execute_cdp_cmd("Emulation.setCPUThrottlingRate", {"rate": 4})
        try:
            by_testid(browser, "send").click()
            wait(browser, lambda d: last_response(d), 30, "text streams in")
            assert stop.location == where, "the Stop button moved while the response streamed in"
            stop.click()
            status = wait_idle(browser, 20)
        finally:
            browser.execute_cdp_cmd("Emulation.setCPUThrottlingRate", {"rate": 1})
        wait(browser, lambda d: metric(ui_server.url, "vllm:num_requests_running") == 0, 10, "server running count 0")
        if metric(ui_server.url, "vllm:request_success_total", finished_reason="abort") == aborted + 1:
            break
    else:
        pytest.fail("the server finished the request before the page's Stop reached it in each of 3 attempts")
    assert status.startswith("Stopped after"), status
    stopped_at = int(status.split()[2])
    assert 0 < stopped_at < 700
    assert by_testid(browser, "send").is_enabled() and not stop.is_enabled()
    gen = [h for h in routing_table(browser)["heads"] if h["kind"] == "gen"]
    assert stopped_at == len(gen) < 700


WEIGHTS_JS = """
const done = arguments[arguments.length - 1];
import('/ui/routing.js').then(({RoutingView}) => {
  const [box, container, detail, caption] = ['div', 'div', 'div', 'p'].map(t => document.createElement(t));
  box.append(container);
  document.body.append(box, detail, caption);
  const view = new RoutingView(container, detail, caption);
  view.reset(2);
  view.addGenerated(['a', 'b']);
  view.addRouting([[[1, 2], [3, 4]]], [[[0.6, 0.4], [0.75, 0.25]]]);  // with routing_weights
  view.show(0);
  const withWeights = detail.innerText;
  view.reset(2);
  view.addGenerated(['a']);
  view.addRouting([[[5, 6], [7, 0]]], undefined);  // an older server: ids only
  view.show(0);
  const idsOnly = detail.innerText;
  view.numExperts = 8;  // LongCat: ids 8 and up are zero-computation experts
  view.reset(1);
  view.addGenerated(['a']);
  view.addRouting([[[1, 9, 8]]], [[[0.5, 0.3, 0.2]]]);
  view.show(0);
  done([withWeights, idsOnly, detail.innerText]);
});
"""


def test_router_weights_are_shown_when_the_server_sends_them(browser, ui_server):
    """The page reads `routing_weights` (same nesting as `routing`) when present, ids alone when not;
    ids past the model's experts are named zero-computation experts."""
    open_page(browser, ui_server.url)
    with_weights, ids_only, zero = ([line for line in text.splitlines() if line.strip()]
                                    for text in browser.execute_async_script(WEIGHTS_JS))
    assert with_weights[1:3] == ["L0: expert 1 · 0.60, expert 2 · 0.40",
                                             "L1: expert 3 · 0.75, expert 4 · 0.25"]
    assert ids_only[1:3] == ["L0: expert 5, expert 6", "L1: expert 7, expert 0"]
    assert "does not report router weights" in ids_only[-1]
    assert zero[1] == "L0: expert 1 · 0.50, zero-computation expert 9 · 0.30, zero-computation expert 8 · 0.20"


# An engine that cannot report routing (the vLLM backend) answers return_routing with this 400.
REJECT_ROUTING_JS = """
const real = window.fetch;
window.fetch = (url, opts) => {
  if (opts && opts.body && JSON.parse(opts.body).return_routing) {
    const error = {message: "return_routing: per-token expert ids are not supported by the vllm engine",
                   type: "invalid_request_error", param: "return_routing", code: null};
    return Promise.resolve(new Response(JSON.stringify({error}), {status: 400,
      headers: {"Content-Type": "application/json"}}));
  }
  return real(url, opts);
};
"""


def test_an_engine_without_routing_still_chats(browser, ui_server):
    open_page(browser, ui_server.url)
    browser.execute_script(REJECT_ROUTING_JS)
    configure(browser, temperature="0", max_tokens="8")
    send_and_watch(browser, QUESTION)
    assert wait_idle(browser).startswith("Done: 8 tokens")
    assert last_response(browser) and not browser.find_element(By.ID, "error").is_displayed()
    assert routing_table(browser)["heads"] == []
    caption = browser.find_element(By.ID, "routing-caption").text
    assert caption == "No routing for this response: return_routing: per-token expert ids are not supported by the vllm engine"
