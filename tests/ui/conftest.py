"""Fixtures for the web-playground tests: real moe-serve processes (started with
tests/server/conftest.py's ServerProcess, in parallel) and a real headless Chromium from the
distribution's packages, driven by Selenium.

The browser comes from `scripts/install_browser.sh` (apt: chromium, chromium-driver). Without
it the browser tests skip locally, but fail under CI (`skip_or_fail`): there a skipped browser
test would be a test that never ran.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import skip_or_fail
from tests.server.conftest import ServerProcess

CHROMIUM = os.environ.get("MOE_SERVE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("MOE_SERVE_CHROMEDRIVER", "/usr/bin/chromedriver")
API_KEY = "ui-test-key"
# Without the background-networking flags Chromium keeps trying to reach Google services.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--window-size=1280,900",
                  "--force-device-scale-factor=1"]
SERVER_ARGS = ["--max-model-len", "1024", "--num-kv-blocks", "256", "--block-size", "16", "--seed", "0",
               "--drain-timeout", "5"]
DESKTOP = (1280, 900)
PHONE = (390, 844)


class Servers:
    """The three servers the UI tests need, started together (model loading overlaps)."""

    def __init__(self, log_dir: Path) -> None:
        self.open = ServerProcess(SERVER_ARGS, log_dir)  # UI on, no key
        self.keyed = ServerProcess([*SERVER_ARGS, "--api-key", API_KEY], log_dir)  # UI on, key needed
        self.no_ui = ServerProcess([*SERVER_ARGS, "--no-ui"], log_dir)
        self.all = (self.open, self.keyed, self.no_ui)

    def wait_ready(self) -> None:
        try:
            for s in self.all:
                s.wait_ready()
        except Exception:
            self.stop()
            raise

    def stop(self) -> list[int]:
        with ThreadPoolExecutor(len(self.all)) as pool:  # the drains overlap too
            return list(pool.map(lambda s: s.stop(), self.all))


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    s = Servers(tmp_path_factory.mktemp("ui-servers"))
    s.wait_ready()
    yield s
    codes = s.stop()
    assert codes == [0, 0, 0], f"a UI test server exited with {codes}"


@pytest.fixture(scope="session")
def ui_server(servers: Servers) -> ServerProcess:
    return servers.open


@pytest.fixture(scope="session")
def ui_http(ui_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ui_server.url, timeout=60) as c:
        yield c


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (pip install -e '.[dev]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} is missing (run scripts/install_browser.sh)"
    return None


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One headless Chromium for the session, with a fresh profile; console logs kept."""
    missing = _browser_missing()
    if missing:
        skip_or_fail(f"browser tests need a real browser: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tmp_path_factory.mktemp("chromium-profile")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which downloads drivers) is never run.
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile.parent / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the tests leave screenshots (under pytest's tmp dir, kept after the run)."""
    path = tmp_path_factory.getbasetemp() / "ui-artifacts"
    path.mkdir(exist_ok=True)
    return path


def save_screenshot(driver: object, path: Path, docs_name: str | None = None) -> Path:
    """A full-page PNG (beyond the viewport) through the DevTools protocol. With
    MOE_SERVE_UI_SCREENSHOT_DIR set, the shot named `docs_name` is also copied there (how the
    README image is made: MOE_SERVE_UI_SCREENSHOT_DIR=docs/img pytest tests/ui)."""
    import base64

    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
    path.write_bytes(base64.b64decode(shot["data"]))
    docs_dir = os.environ.get("MOE_SERVE_UI_SCREENSHOT_DIR")
    if docs_dir and docs_name:
        shutil.copy(path, Path(docs_dir) / docs_name)
    return path
