"""Headless Chromium (Debian's `chromium` + `chromium-driver`) driven by Selenium.

Both paths are given explicitly, so Selenium Manager never tries the network.
`Browser` adds what the console tests keep doing: open a page, fill a form,
wait for something to show, save a screenshot, read the page's HTML.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


class Browser:
    def __init__(self, base_url: str, artifacts: Path) -> None:
        self.base_url = base_url.rstrip("/")
        self.artifacts = artifacts
        artifacts.mkdir(parents=True, exist_ok=True)
        options = Options()
        options.binary_location = CHROMIUM
        for argument in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1280,900",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
        ):
            options.add_argument(argument)
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(30)
        self.pages: list[str] = []

    def open(self, path: str) -> None:
        self.driver.get(self.base_url + path)
        self.remember()

    def remember(self) -> None:
        """Keep the current page's HTML, for the no-secret check."""
        self.pages.append(self.driver.page_source)

    @property
    def path(self) -> str:
        url: str = self.driver.current_url
        return url[len(self.base_url) :] if url.startswith(self.base_url) else url

    def find(self, css: str) -> WebElement:
        return self.driver.find_element(By.CSS_SELECTOR, css)

    def find_all(self, css: str) -> list[WebElement]:
        return list(self.driver.find_elements(By.CSS_SELECTOR, css))

    def text(self, css: str = "body") -> str:
        return str(self.find(css).text)

    def fill(self, fields: dict[str, str]) -> None:
        for name, value in fields.items():
            element = self.find(f"[name={name}]")
            element.clear()
            element.send_keys(value)

    def click(self, css: str, timeout: float = 30.0) -> None:
        """Click a button of one of the console's forms and wait for the page
        the form leads to: the console has no script, so every button submits
        and loads a new page. Reading before the old page is gone would read
        the old page."""
        wait = WebDriverWait(self.driver, timeout)
        for attempt in range(3):
            # A page still loading (after a reload) can swap the button out
            # between finding and clicking it; such a click submitted nothing.
            wait.until(lambda d: d.execute_script("return document.readyState") == "complete")
            old = self.find("html")
            try:
                self.find(css).click()
                break
            except (StaleElementReferenceException, WebDriverException) as e:
                if not _swapped(e) or attempt == 2:
                    raise
        wait.until(lambda d: _gone(old))
        self.remember()

    def wait_until(
        self, condition: Callable[[], Any], timeout: float = 15.0, reload: bool = False
    ) -> Any:
        """Poll `condition` (reloading the page each time if asked) until truthy."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = condition()
            except Exception:  # the element is not there yet
                result = None
            if result:
                self.remember()
                return result
            if time.monotonic() > deadline:
                self.screenshot("timeout")
                raise AssertionError(f"timed out on {self.path}: {self.text()[:2000]}")
            time.sleep(0.2)
            if reload:
                self.driver.refresh()

    def screenshot(self, name: str) -> Path:
        path = self.artifacts / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def quit(self) -> None:
        self.driver.quit()


def _swapped(error: Exception) -> bool:
    """Whether a WebDriver error says the element's page was replaced.

    Selenium names that StaleElementReferenceException; Chromium 156 at times
    answers with an "unknown error" about a node that does not belong to the
    document instead, which means the same."""
    return isinstance(error, StaleElementReferenceException) or (
        isinstance(error, WebDriverException) and "does not belong to the document" in str(error)
    )


def _gone(element: WebElement) -> bool:
    """Selenium's `staleness_of`, knowing both ways Chromium says so."""
    try:
        element.is_enabled()
    except (StaleElementReferenceException, WebDriverException) as e:
        if _swapped(e):
            return True
        raise
    return False


@contextmanager
def browser(base_url: str, artifacts: Path) -> Iterator[Browser]:
    b = Browser(base_url, artifacts)
    try:
        yield b
    finally:
        b.quit()
