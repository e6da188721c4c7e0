"""Fixtures of the console tests: a real server, a real console, a real browser.

The browser is Debian's headless Chromium driven by Selenium through Debian's
chromedriver, both given by path so that Selenium Manager never downloads anything.
Without them the browser tests skip, saying why, except under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from callcredit.dialer import DialerClient
from tests.conftest import missing_component
from tests.console.processes import admin_cli, console_process
from tests.service.processes import server_process

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if shutil.which(path) is None:
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


@pytest.fixture(scope="session")
def browser_ready() -> None:
    missing = browser_missing()
    if missing is None:
        return
    missing_component(missing)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A callcredit-server on SQLite with tariff t-usd (USD, $0.60/min) and t-vnd."""
    folder = tmp_path_factory.mktemp("server")
    with server_process(f"sqlite:///{folder / 'journal.db'}") as (_, target):
        admin_cli(target, "tariff", "put", "t-usd", "--currency", "USD", "--rate", ":60000000:1/1")
        yield target


@pytest.fixture(scope="module")
def console(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The console on loopback (no login) for `server`; its base URL."""
    log = tmp_path_factory.mktemp("console") / "console.log"
    with console_process(log, server) as url:
        yield url


@pytest.fixture
def browser(browser_ready: None) -> Iterator[object]:
    """A headless Chromium (selenium.webdriver.Chrome); typed object so that this module
    imports without selenium, which the skip above reports."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1500",
    ):
        options.add_argument(argument)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        try:
            yield driver
        finally:
            driver.quit()


@contextmanager
def open_call(target: str, account_id: str, call_id: str) -> Iterator[None]:
    """A call in progress on `account_id` (answered; the dialer library renews it) until
    the block ends, then released."""
    started = threading.Event()
    stop = threading.Event()
    failure: list[BaseException] = []

    async def run() -> None:
        async with DialerClient(target) as dialer:
            call = await dialer.reserve(call_id, account_id, "84901234567")
            call.answered()
            started.set()
            await asyncio.to_thread(stop.wait)
            await call.release()

    def thread() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:
            failure.append(exc)
            started.set()

    worker = threading.Thread(target=thread, name=f"call-{call_id}")
    worker.start()
    try:
        if not started.wait(10) or failure:
            raise AssertionError(f"the call did not start: {failure}")
        yield
    finally:
        stop.set()
        worker.join(10)


def new_account(target: str, account_id: str, *, dollars: int) -> None:
    """An account on t-usd with `dollars` on it, topped up from the CLI."""
    admin_cli(target, "account", "create", account_id, "--currency", "USD", "--tariff", "t-usd")
    admin_cli(
        target, "topup", account_id, str(dollars * 100), "--idempotency-key", f"{account_id}-0"
    )


SCREENSHOT_ENV = "CALLCREDIT_CONSOLE_SCREENSHOT"
"""Where test_browser saves its screenshot of an account page (docs/console.png is one)."""


def screenshot_path(tmp_path: Path) -> Path:
    return Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "console.png")
