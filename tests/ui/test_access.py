"""The playground with an API key, at phone width, and for keyboard and screen-reader users:
the key prompt and a wrong key's error, no horizontal scrolling at 390 px, accessible names,
WCAG AA text contrast, and sending / stepping through tokens with the keyboard alone."""

from __future__ import annotations

from pathlib import Path

from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests.ui.conftest import API_KEY, DESKTOP, PHONE, save_screenshot
from tests.ui.helpers import (
    TESTIDS,
    by_testid,
    configure,
    js_errors,
    open_page,
    routing_table,
    send_and_watch,
    wait,
    wait_idle,
)

A11Y_JS = (Path(__file__).parent / "a11y.js").read_text()


def test_api_key_prompt_wrong_key_error_then_the_right_key(browser, servers):
    s = servers.keyed
    browser.set_window_size(*DESKTOP)
    open_page(browser, s.url, connected=False)  # the page itself loads without a key
    key = by_testid(browser, "api-key")
    wait(browser, lambda d: key.is_displayed(), 15, "the key prompt appears")
    error = browser.find_element(By.ID, "error")
    assert "401" in error.text and "API key is required" in error.text
    assert browser.switch_to.active_element == key

    key.send_keys("wrong-key", Keys.ENTER)
    wait(browser, lambda d: "rejected the API key (401)" in error.text, 15, "a wrong key shows an error")
    assert key.is_displayed() and error.get_attribute("role") == "alert"

    key.clear()
    key.send_keys(API_KEY, Keys.ENTER)
    wait(browser, lambda d: " MoE layers " in d.find_element(By.ID, "model-line").text, 15, "connects with the key")
    assert not key.is_displayed() and not error.is_displayed()
    configure(browser, temperature="0", max_tokens="8")
    send_and_watch(browser, "What is a list?")
    assert wait_idle(browser).startswith("Done: 8 tokens")
    assert browser.execute_script("return sessionStorage.getItem('moe-serve-api-key')") == API_KEY

    browser.refresh()  # kept for the browser session: no second prompt
    wait(browser, lambda d: " MoE layers " in d.find_element(By.ID, "model-line").text, 15, "reconnects")
    assert not by_testid(browser, "api-key").is_displayed()


def test_phone_width_is_usable(browser, ui_server, artifacts):
    width, height = PHONE
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 2, "mobile": True})
    browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": True, "maxTouchPoints": 5})
    try:
        open_page(browser, ui_server.url)
        assert browser.execute_script("return window.innerWidth") == width
        # nothing sticks out sideways: the page never scrolls horizontally
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        for testid in ("prompt", "send", "stop", "output", "routing", "expert-load"):
            left, right = browser.execute_script(
                "const r = arguments[0].closest('.table-scroll, section').getBoundingClientRect();"
                "return [r.left, r.right];", by_testid(browser, testid))
            assert 0 <= left and right <= width, (testid, left, right)
        send = by_testid(browser, "send")
        assert send.size["height"] >= 40  # a finger-sized target
        configure(browser, temperature="0", max_tokens="12")
        send_and_watch(browser, "What is a list?")
        assert wait_idle(browser).startswith("Done: 12 tokens")
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        token = browser.find_elements(By.CSS_SELECTOR, "#routing thead th.tok button")[2]
        browser.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'center'})", token)
        token.click()  # a tap shows the token's experts
        assert browser.find_element(By.ID, "token-detail").text.startswith("generated token 3")
        save_screenshot(browser, artifacts / "playground-phone.png")
    finally:
        browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled", {"enabled": False})
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_names_contrast_and_keyboard_only_use(browser, ui_server):
    browser.set_window_size(*DESKTOP)
    open_page(browser, ui_server.url)
    for testid in TESTIDS:
        assert len(browser.find_elements(By.CSS_SELECTOR, f"[data-testid={testid}]")) == 1, testid
    assert browser.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"

    # keyboard only: Tab to the message box, type, Enter sends
    actions = ActionChains(browser)
    browser.find_element(By.TAG_NAME, "body").click()
    for _ in range(30):
        if browser.switch_to.active_element.get_attribute("data-testid") == "prompt":
            break
        actions.send_keys(Keys.TAB).perform()
    else:
        raise AssertionError("Tab never reached the message box")
    configure(browser, temperature="0", max_tokens="10")
    box = by_testid(browser, "prompt")
    box.send_keys("What is a list?", Keys.ENTER)
    assert wait_idle(browser).startswith("Done: 10 tokens")

    # Tab on to the first token of the routing view; arrow keys walk the tokens
    for _ in range(40):
        active = browser.switch_to.active_element
        if active.tag_name == "button" and active.find_elements(By.XPATH, "ancestor::th[contains(@class,'tok')]"):
            break
        actions.send_keys(Keys.TAB).perform()
    else:
        raise AssertionError("Tab never reached the routing view")
    detail = browser.find_element(By.ID, "token-detail")
    assert detail.text.startswith("generated token 1")
    actions.send_keys(Keys.ARROW_RIGHT).perform()
    actions.send_keys(Keys.ARROW_RIGHT).perform()
    assert detail.text.startswith("generated token 3")
    assert browser.switch_to.active_element.text == routing_table(browser)["heads"][2]["label"]

    # every control has an accessible name; all visible text meets WCAG AA contrast
    # (routing cells included, against each of their expert colours)
    result = browser.execute_script(A11Y_JS)
    assert result["unnamed"] == []
    assert result["contrast"] == []
    assert js_errors(browser) == []


def test_the_accessibility_checks_catch_a_missing_label_and_low_contrast(browser, ui_server):
    """The checker above is not vacuous: break the page on purpose and it reports both."""
    open_page(browser, ui_server.url)
    browser.execute_script("document.querySelector('label[for=seed]').remove();"
                           "document.getElementById('prompt-hint').style.color = '#b0b0b0';")
    result = browser.execute_script(A11Y_JS)
    assert len(result["unnamed"]) == 1 and 'id="seed"' in result["unnamed"][0]
    assert len(result["contrast"]) == 1 and result["contrast"][0].startswith("P#prompt-hint")
