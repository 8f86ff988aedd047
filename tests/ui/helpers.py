"""Page helpers for the browser tests: open the page, fill the controls, read the routing table
and the live panel back out of the DOM."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

TESTIDS = ("prompt", "send", "stop", "output", "routing", "expert-load", "api-key")


def by_testid(driver: Any, testid: str) -> Any:
    return driver.find_element(By.CSS_SELECTOR, f"[data-testid={testid}]")


def wait(driver: Any, condition: Callable[[Any], Any], timeout: float = 30, what: str = "") -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message=what)


def open_page(driver: Any, url: str, connected: bool = True) -> None:
    """Load the page; with `connected`, wait until it has read the model facts from the server."""
    driver.get(url + "/")
    if connected:
        wait(driver, lambda d: " MoE layers " in d.find_element(By.ID, "model-line").text, what="page connects")


def set_value(driver: Any, element_id: str, value: str) -> None:
    el = driver.find_element(By.ID, element_id)
    el.clear()
    if value:
        el.send_keys(value)


def configure(driver: Any, *, temperature: str, max_tokens: str, seed: str = "", top_p: str = "1") -> None:
    set_value(driver, "temperature", temperature)
    set_value(driver, "max-tokens", max_tokens)
    set_value(driver, "seed", seed)
    set_value(driver, "top-p", top_p)


def status(driver: Any) -> tuple[str, str]:
    el = driver.find_element(By.ID, "status")
    return el.get_attribute("data-state") or "", el.text


def wait_idle(driver: Any, timeout: float = 60) -> str:
    """Wait until the current generation has ended; returns the status line."""
    wait(driver, lambda d: status(d)[0] in ("done", "stopped", "failed"), timeout, "generation ends")
    return status(driver)[1]


def send_and_watch(driver: Any, prompt: str, timeout: float = 60) -> list[int]:
    """Type `prompt`, click Send, and record the length of the output's last message each time the
    page changes the output (a MutationObserver installed before the click: every rendered update
    is seen, however fast the model streams; polling from here every 20 ms saw a 40-token answer
    of the bundled model in two steps), until the generation ends; returns the lengths seen (the
    streamed text growing)."""
    box = by_testid(driver, "prompt")
    box.clear()
    box.send_keys(prompt)
    driver.execute_script(
        "window.__lengths = [];"
        "const out = document.querySelector('[data-testid=output]');"
        "if (window.__watch) window.__watch.disconnect();"
        "window.__watch = new MutationObserver(() => {"
        "  const m = out.querySelector('.msg:last-child .text');"
        "  window.__lengths.push(m ? m.textContent.length : 0); });"
        "window.__watch.observe(out, {childList: true, subtree: true, characterData: true});")
    by_testid(driver, "send").click()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = driver.execute_script("return document.getElementById('status').dataset.state;")
        if state in ("done", "stopped", "failed"):
            return driver.execute_script("window.__watch.disconnect(); return window.__lengths;")
        time.sleep(0.02)
    raise AssertionError("the generation did not end")


def last_response(driver: Any) -> str:
    return driver.execute_script(
        "const m = document.querySelector('[data-testid=output] .msg:last-child .text span:last-child');"
        "return m ? m.textContent : null;")


ROUTING_JS = """
const tables = [...document.querySelectorAll('[data-testid=routing] table')];
const heads = tables.flatMap(t => [...t.tHead.rows[0].cells].slice(1)).map(th => ({
  kind: th.classList.contains('prompt') ? 'prompt' : 'gen', label: th.textContent}));
const layers = [...tables[0].tBodies[0].rows].map(r => r.cells[0].textContent);
const rows = layers.map((_, l) => tables.flatMap(t => [...t.tBodies[0].rows[l].cells].slice(1)).map(td =>
  td.dataset.experts === undefined ? null : td.dataset.experts.split(',').map(Number)));
return {heads, rows, layers};
"""


def routing_table(driver: Any) -> dict[str, Any]:
    """{'heads': [{kind, label}], 'rows': [layer][column] -> expert ids or None, 'layers': names},
    read across the view's tables (it draws tokens in tables of 32)."""
    return driver.execute_script(ROUTING_JS)


def load_panel(driver: Any) -> dict[str, int]:
    el = by_testid(driver, "expert-load")
    return {"total": int(el.get_attribute("data-total-assignments") or -1),
            "updates": int(el.get_attribute("data-updates") or 0)}


def api_total_assignments(http: httpx.Client) -> int:
    layers = http.get("/v1/moe/routing").json()["layers"]
    return sum(sum(layer["total_tokens"]) for layer in layers)


def metric_samples(url: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of one metric family on /metrics, keyed by its sorted labels."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def metric(url: str, name: str, **labels: str) -> float:
    values = [v for k, v in metric_samples(url, name).items() if set(labels.items()) <= set(k)]
    assert len(values) == 1, f"{name} {labels}: {values}"
    return values[0]


def js_errors(driver: Any) -> list[str]:
    """Console errors other than failed network requests (401s are expected in the key test)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]
