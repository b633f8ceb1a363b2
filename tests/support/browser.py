"""A real headless Chromium in the tests: Debian's `chromium` driven by Selenium through Debian's
`chromedriver`, both given by path, so that Selenium Manager never runs and nothing is downloaded.

One browser per test session (`browser` fixture), with a fresh profile and none of Chromium's
own network traffic (no component updates, sync, background networking or QUIC); each test starts
with its cookies cleared. Without the two programs a browser test is skipped, naming the packages,
unless REQUIRE_BROWSER=1 (set by .ci/run, which installs them): then their absence fails, so CI
never skips these tests silently.

Selenium blocks; `Browser` runs every call in a worker thread, so the test's event loop (and the
test receiver in it) keeps going while the browser waits for a page. With CONSOLE_SCREENSHOTS set
to a folder, `Browser.screenshot(name)` saves the page there as `name.png` (the whole page);
otherwise it does nothing: `python -m tests.support.screenshots` sets it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMEDRIVER_NAME = "chromedriver"
# What keeps a headless Chromium quiet and alone: no sandbox (the tests may run as root), no GPU,
# no first-run pages, and no traffic of its own (updates, sync, field trials, QUIC).
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--metrics-recording-only",
    "--password-store=basic",
    "--window-size=1280,900",
)
PAGE_TIMEOUT_SECONDS = 30
SCREENSHOTS_VARIABLE = "CONSOLE_SCREENSHOTS"

T = TypeVar("T")


def browser_programs() -> tuple[str, str]:
    """(chromium, chromedriver); skips or fails the test when either is missing."""
    chromium = next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)
    driver = shutil.which(CHROMEDRIVER_NAME)
    if chromium is not None and driver is not None:
        return chromium, driver
    missing = " and ".join(
        name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None
    )
    reason = (
        f"{missing} not installed (Debian: apt-get install chromium chromium-driver; .ci/run does)"
    )
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


class Browser:
    """A Chromium session (Selenium's WebDriver), each call run in a worker thread."""

    def __init__(self, driver: Any, screenshots: Path | None) -> None:
        self.driver = driver
        self.screenshots = screenshots

    async def _call(self, work: Callable[[], T]) -> T:
        return await asyncio.to_thread(work)

    async def open(self, url: str) -> None:
        await self._call(lambda: self.driver.get(url))

    async def url(self) -> str:
        current: str = await self._call(lambda: self.driver.current_url)
        return current

    async def title(self) -> str:
        title: str = await self._call(lambda: self.driver.title)
        return title

    async def text(self, css: str = "body") -> str:
        """The visible text of the first element `css` selects."""
        from selenium.webdriver.common.by import By

        found: str = await self._call(lambda: self.driver.find_element(By.CSS_SELECTOR, css).text)
        return found

    async def count(self, css: str) -> int:
        from selenium.webdriver.common.by import By

        return await self._call(lambda: len(self.driver.find_elements(By.CSS_SELECTOR, css)))

    async def fill(self, css: str, value: str) -> None:
        from selenium.webdriver.common.by import By

        def fill() -> None:
            element = self.driver.find_element(By.CSS_SELECTOR, css)
            element.clear()
            element.send_keys(value)

        await self._call(fill)

    async def click(self, css: str) -> None:
        """Click the element and wait for the page it leads to (a link or a form's button)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions
        from selenium.webdriver.support.wait import WebDriverWait

        def click() -> None:
            element = self.driver.find_element(By.CSS_SELECTOR, css)
            element.click()
            WebDriverWait(self.driver, PAGE_TIMEOUT_SECONDS).until(
                expected_conditions.staleness_of(element)
            )

        await self._call(click)

    async def run_script(self, script: str, *args: Any) -> Any:
        """Run JavaScript in the page through the driver (not the page's own: the console has
        none, and its Content-Security-Policy would refuse an inline one)."""
        return await self._call(lambda: self.driver.execute_script(script, *args))

    async def clear_cookies(self) -> None:
        """Every cookie of every site (cookies are per host, not per port: the tests' servers
        all live on 127.0.0.1)."""
        await self._call(lambda: self.driver.execute_cdp_cmd("Network.clearBrowserCookies", {}))

    async def cookies(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = await self._call(self.driver.get_cookies)
        return found

    async def screenshot(self, name: str) -> None:
        """With CONSOLE_SCREENSHOTS set: the whole page as `<folder>/<name>.png`."""
        if self.screenshots is None:
            return
        folder = self.screenshots

        def take() -> None:
            width, height = self.driver.execute_script(
                "return [document.documentElement.scrollWidth,"
                " Math.ceil(document.body.getBoundingClientRect().bottom) + 24]"
            )
            shot = self.driver.execute_cdp_cmd(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
                },
            )
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))

        await self._call(take)


@pytest.fixture(scope="session")
def browser_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """One headless Chromium for the whole session, with a fresh profile; quit at the end."""
    chromium, chromedriver = browser_programs()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    workdir = tmp_path_factory.mktemp("chromium")
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={workdir / 'profile'}")
    service = Service(executable_path=chromedriver, log_output=str(workdir / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(PAGE_TIMEOUT_SECONDS)
    screenshots = os.environ.get(SCREENSHOTS_VARIABLE)
    try:
        yield Browser(driver, Path(screenshots) if screenshots else None)
    finally:
        driver.quit()


@pytest.fixture
async def browser(browser_session: Browser) -> Browser:
    """The session's browser, with no cookies left from another test."""
    await browser_session.clear_cookies()
    return browser_session
