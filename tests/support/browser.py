"""A real headless browser for end-to-end tests: Debian's Chromium driven through Selenium.

    require_browser()                       # skip on a laptop without it, fail under CI=true
    with Browser(tmp_path) as b:
        b.open(url)
        b.wait("#email").send_keys("rep@example.test")
        b.click("#approve")
        b.wait_attribute("#outcome", "data-kind", "connected")

The browser is /usr/bin/chromium with /usr/bin/chromedriver (the `chromium` and
`chromium-driver` packages), headless, with a fresh profile in the test's directory. It
only reaches loopback: everything but loopback goes through a proxy at 127.0.0.1:9
where nothing listens, host names other than localhost resolve to nothing, and
background traffic (updates, sync, safe browsing, metrics) is off, so a page that pulls
something from outside fails instead of fetching it.

Every wait has a deadline and, when it runs out, saves a screenshot and the page's HTML
next to the test (`<dir>/browser-<n>-<what>.png` / `.html`) before failing with the
current URL and title; leaving the `with` block on an exception saves the same. Nothing
here imports `gateway`.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.conftest import require

__all__ = ["CHROMEDRIVER", "CHROMIUM", "Browser", "BrowserTimeout", "require_browser"]

CHROMIUM = Path(os.environ.get("MAILGW_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("MAILGW_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))

#: Chromium switches: headless, no first-run chatter, no traffic of its own, loopback only
_SWITCHES = (
    "--headless=new",
    "--no-sandbox",                     # tests and CI run as root
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-breakpad",
    "--disable-default-apps",
    "--disable-client-side-phishing-detection",
    "--metrics-recording-only",
    "--proxy-server=http://127.0.0.1:9",  # nothing listens there: all but loopback fails
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
    "--window-size=1024,768",
)


def require_browser() -> None:
    """Skip (on a developer machine) or fail (CI=true) unless Chromium, its driver and
    Selenium are all there."""
    require(CHROMIUM.exists(), f"Chromium ({CHROMIUM}, Debian package chromium)")
    require(CHROMEDRIVER.exists(), f"chromedriver ({CHROMEDRIVER}, Debian package chromium-driver)")
    require(importlib.util.find_spec("selenium") is not None, "the selenium package (test extra)")


class BrowserTimeout(AssertionError):
    """A wait ran out; the message names what was awaited and where the browser was."""


class Browser:
    """One headless Chromium session (see the module docstring)."""

    def __init__(self, directory: Path, *, timeout: float = 10.0) -> None:
        self.dir = directory
        self.timeout = timeout
        self._shots = 0
        self._driver: Any = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> Browser:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.dir.mkdir(parents=True, exist_ok=True)
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for switch in _SWITCHES:
            options.add_argument(switch)
        options.add_argument(f"--user-data-dir={self.dir / 'chromium-profile'}")
        # an explicit driver path: Selenium Manager is never asked to find or fetch one
        service = Service(executable_path=str(CHROMEDRIVER),
                          log_output=str(self.dir / "chromedriver.log"))
        self._driver = webdriver.Chrome(options=options, service=service)
        self._driver.set_page_load_timeout(self.timeout)
        return self

    def close(self) -> None:
        if self._driver is not None:
            try:
                self._driver.quit()
            finally:
                self._driver = None

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc is not None and not isinstance(exc, BrowserTimeout) and self._driver is not None:
                self.snapshot("failure")
        finally:
            self.close()

    @property
    def driver(self) -> Any:
        """The Selenium WebDriver, for what the helpers here do not cover."""
        if self._driver is None:
            raise RuntimeError("the browser is not started")
        return self._driver

    # -- pages ------------------------------------------------------------------------------
    def open(self, url: str) -> None:
        self.driver.get(url)

    @property
    def url(self) -> str:
        return str(self.driver.current_url)

    @property
    def title(self) -> str:
        return str(self.driver.title)

    def source(self) -> str:
        return str(self.driver.page_source)

    def snapshot(self, what: str) -> Path:
        """Save a screenshot and the HTML of the current page; return the PNG's path."""
        self._shots += 1
        stem = f"browser-{self._shots}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', what)[:60]}"
        png = self.dir / f"{stem}.png"
        try:
            self.driver.save_screenshot(str(png))
            (self.dir / f"{stem}.html").write_text(self.source())
        except Exception as exc:  # a snapshot must not hide the failure it documents
            (self.dir / f"{stem}.error").write_text(repr(exc))
        return png

    # -- waits ------------------------------------------------------------------------------
    def until(self, condition: Callable[[Any], Any], what: str, timeout: float | None = None) -> Any:
        """Poll `condition(driver)` until it returns something true (returned), or fail with a
        snapshot after `timeout` seconds (the browser's default when None)."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        limit = self.timeout if timeout is None else timeout
        try:
            return WebDriverWait(self.driver, limit, poll_frequency=0.05).until(condition)
        except TimeoutException:
            shot = self.snapshot(what)
            raise BrowserTimeout(f"timed out after {limit}s waiting for {what}; the browser is at "
                                 f"{self.url} ({self.title!r}); screenshot {shot}") from None

    def wait(self, css: str, timeout: float | None = None) -> Any:
        """The first element matching `css` once it is displayed."""
        from selenium.webdriver.common.by import By

        def shown(driver: Any) -> Any:
            for el in driver.find_elements(By.CSS_SELECTOR, css):
                if el.is_displayed():
                    return el
            return None

        return self.until(shown, f"element {css}", timeout)

    def wait_attribute(self, css: str, name: str, value: str, timeout: float | None = None) -> Any:
        """The element matching `css` once its attribute `name` is `value`."""
        from selenium.webdriver.common.by import By

        def has(driver: Any) -> Any:
            for el in driver.find_elements(By.CSS_SELECTOR, css):
                if el.get_attribute(name) == value:
                    return el
            return None

        return self.until(has, f"{css}[{name}={value!r}]", timeout)

    def wait_url(self, prefix: str, timeout: float | None = None) -> str:
        """The current URL once it starts with `prefix`."""
        self.until(lambda d: str(d.current_url).startswith(prefix), f"a page under {prefix}", timeout)
        return self.url

    def text(self, css: str, timeout: float | None = None) -> str:
        return str(self.wait(css, timeout).text)

    def click(self, css: str, timeout: float | None = None) -> None:
        self.wait(css, timeout).click()

    def fill(self, css: str, value: str, timeout: float | None = None) -> None:
        """Replace what an input holds with `value`, typed as a person would."""
        el = self.wait(css, timeout)
        el.clear()
        el.send_keys(value)
