"""The console in a real browser, as an operator uses it: headless Chromium, Selenium,
a real console process and a real server."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from callcredit_server.console.security import hash_password
from tests.console.conftest import new_account, open_call, screenshot_path
from tests.console.processes import admin_cli, console_process

LIVE_WITHIN_SECONDS = 2.0


def _by() -> Any:
    from selenium.webdriver.common.by import By

    return By


def wait_for(browser: Any, timeout_seconds: float, condition: Any) -> Any:
    """Poll ``condition(browser)``; an element htmx replaced meanwhile is polled again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(
        browser,
        timeout_seconds,
        poll_frequency=0.05,
        ignored_exceptions=(StaleElementReferenceException,),
    )
    return wait.until(condition)


def text_of(browser: Any, element_id: str) -> str:
    return str(browser.find_element(_by().ID, element_id).text)


def ledger(target: str, account_id: str) -> list[dict[str, Any]]:
    answer = admin_cli(target, "entries", "list", account_id, "--limit", "1000")
    return list(answer["entries"] if isinstance(answer, dict) else answer)


def test_account_page_is_live_and_draws_the_burn_down(
    server: str, console: str, browser: Any, tmp_path: Path
) -> None:
    new_account(server, "live-1", dollars=50)
    with open_call(server, "live-1", "live-1-call"):
        browser.get(f"{console}/accounts/live-1")
        wait_for(browser, 5, lambda b: text_of(b, "open-calls") == "1")
        browser.execute_script("window.notReloaded = true;")
        wait_for(browser, 5, lambda b: text_of(b, "balance") == "$50.00")

        # The chart is drawn: the history line and, with a call burning money, the
        # projection to empty, both with a real size on the page. (Polled: htmx may
        # swap the chart in just after the page loads.)
        by = _by()

        def chart_drawn(b: Any) -> bool:
            history = b.find_element(by.CSS_SELECTOR, "#burndown polyline.history")
            projection = b.find_element(by.CSS_SELECTOR, "#burndown polyline.projection")
            chart = b.find_element(by.ID, "burndown")
            return bool(
                len(history.get_attribute("points").split()) >= 2
                and len(projection.get_attribute("points").split()) == 2
                and chart.size["width"] > 500
                and chart.size["height"] > 100
                and history.size["height"] > 0
                and projection.size["width"] > 10
            )

        wait_for(browser, 5, chart_drawn)
        wait_for(browser, 5, lambda b: text_of(b, "burn-rate") == "$0.60/min")
        wait_for(browser, 5, lambda b: text_of(b, "empty-in") != "—")

        # A top-up from the CLI shows without a reload, within two seconds of its answer
        # (the CLI's own start-up, about a second of imports, is not the console's).
        admin_cli(server, "topup", "live-1", "2500", "--idempotency-key", "live-1-cli")
        answered = time.monotonic()
        wait_for(browser, LIVE_WITHIN_SECONDS, lambda b: text_of(b, "balance") == "$75.00")
        shown_after_seconds = time.monotonic() - answered
        print(f"the CLI's top-up showed {shown_after_seconds:.3f} s after its answer")
        assert browser.execute_script("return window.notReloaded === true;")
        assert shown_after_seconds < LIVE_WITHIN_SECONDS
        # The step up is on the chart too.
        points = browser.find_element(by.CSS_SELECTOR, "#burndown polyline.history")
        assert len(points.get_attribute("points").split()) >= 3
        browser.save_screenshot(str(screenshot_path(tmp_path)))


def chart_levels(browser: Any) -> list[int]:
    """The history line's heights, left to right, each once."""
    points = browser.find_element(_by().CSS_SELECTOR, "#burndown polyline.history")
    levels: list[int] = []
    for pair in points.get_attribute("points").split():
        y = int(pair.split(",")[1])
        if not levels or levels[-1] != y:
            levels.append(y)
    return levels


def test_the_chart_shows_what_happened_before_the_console_started(
    server: str, browser: Any, tmp_path: Path
) -> None:
    new_account(server, "past-1", dollars=50)
    admin_cli(server, "topup", "past-1", "2500", "--idempotency-key", "past-1-1")
    with console_process(tmp_path / "console.log", server) as url:
        browser.get(f"{url}/accounts/past-1")
        # The console saw none of it live: it reads the account's last hours from the
        # changefeed and redraws. Created at $0, topped up to $50, then to $75: three
        # levels, each higher than the one before (a smaller y is higher up).
        wait_for(browser, 5, lambda b: len(chart_levels(b)) == 3)
        levels = chart_levels(browser)
        assert levels[0] > levels[1] > levels[2]


def submit_form(browser: Any, form_id: str, **fields: str) -> None:
    by = _by()
    form = browser.find_element(by.ID, form_id)
    for name, value in fields.items():
        field = form.find_element(by.NAME, name)
        field.clear()
        field.send_keys(value)
    form.find_element(by.CSS_SELECTOR, "button[type=submit]").click()


def test_a_top_up_from_the_page_lands_once_when_submitted_twice(
    server: str, console: str, browser: Any
) -> None:
    new_account(server, "form-1", dollars=10)
    browser.get(f"{console}/accounts/form-1")
    submit_form(browser, "top-up", amount="12.34", note="page twice")
    wait_for(browser, 5, lambda b: text_of(b, "question") == "Top up $12.34 to form-1?")
    # The page's own confirmation form sent twice: once by script, once by its button.
    status = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const form = document.getElementById("confirm");
        fetch(form.action, {method: "POST", body: new URLSearchParams(new FormData(form))})
            .then((response) => done(response.status), (error) => done(String(error)));
        """
    )
    assert status == 200  # the redirect to the account page, followed
    browser.find_element(_by().ID, "confirm-button").click()
    wait_for(browser, 5, lambda b: "Top-up applied" in b.page_source)
    wait_for(browser, 5, lambda b: text_of(b, "balance") == "$22.34")
    top_ups = [entry for entry in ledger(server, "form-1") if entry["reference"] == "page twice"]
    assert len(top_ups) == 1 and int(top_ups[0]["amount"]) == 1_234


def test_a_refused_action_shows_the_servers_reason(server: str, console: str, browser: Any) -> None:
    new_account(server, "refused-1", dollars=1)
    browser.get(f"{console}/accounts/refused-1")
    submit_form(browser, "adjust", amount="-5", note="too much")
    wait_for(
        browser, 5, lambda b: text_of(b, "question") == "Remove $5.00 from refused-1 (adjustment)?"
    )
    browser.find_element(_by().ID, "confirm-button").click()
    problem = wait_for(browser, 5, lambda b: text_of(b, "problem"))
    assert problem.startswith("INSUFFICIENT_FUNDS:")
    assert [entry["kind"] for entry in ledger(server, "refused-1")] == ["ENTRY_KIND_TOP_UP"]


def test_suspend_and_resume_from_the_page(server: str, console: str, browser: Any) -> None:
    new_account(server, "status-1", dollars=1)
    browser.get(f"{console}/accounts/status-1")
    submit_form(browser, "status")
    wait_for(browser, 5, lambda b: text_of(b, "question") == "Suspend status-1?")
    browser.find_element(_by().ID, "confirm-button").click()
    wait_for(browser, 5, lambda b: text_of(b, "account-status") == "suspended")
    submit_form(browser, "status")
    # The confirmation replaces the page: wait for it, as for the first one above.
    wait_for(browser, 5, lambda b: text_of(b, "question") == "Resume status-1?")
    browser.find_element(_by().ID, "confirm-button").click()
    wait_for(browser, 5, lambda b: text_of(b, "account-status") == "active")


def test_off_loopback_the_console_needs_a_login(server: str, browser: Any, tmp_path: Path) -> None:
    new_account(server, "login-1", dollars=3)
    password = "operator password 1"
    config = tmp_path / "console.toml"
    config.write_text(f'operator_password_hash = "{hash_password(password, bytes(16))}"\n')
    token = "admin-token-never-shown-1234"
    with console_process(
        tmp_path / "console.log",
        server,
        "127.0.0.2:0",
        ["--config", str(config)],
        CALLCREDIT_TOKEN=token,
    ) as url:
        by = _by()
        browser.get(f"{url}/accounts/login-1")
        assert browser.current_url == f"{url}/login"
        browser.find_element(by.ID, "secret").send_keys("wrong password")
        browser.find_element(by.CSS_SELECTOR, "#login button").click()
        wait_for(browser, 5, lambda b: text_of(b, "problem") == "That is not the password.")
        browser.find_element(by.ID, "secret").send_keys(password)
        browser.find_element(by.CSS_SELECTOR, "#login button").click()
        wait_for(browser, 5, lambda b: b.current_url == f"{url}/accounts")
        browser.get(f"{url}/accounts/login-1")
        wait_for(browser, 5, lambda b: text_of(b, "balance") == "$3.00")
        assert token not in browser.page_source

        # Logging out ends the session on the console: the page asks again.
        browser.find_element(by.CSS_SELECTOR, "header form button").click()
        wait_for(browser, 5, lambda b: b.current_url == f"{url}/login")
        browser.get(f"{url}/accounts/login-1")
        assert browser.current_url == f"{url}/login"

        # The admin token logs in too, and is not echoed anywhere.
        browser.find_element(by.ID, "secret").send_keys(token)
        browser.find_element(by.CSS_SELECTOR, "#login button").click()
        wait_for(browser, 5, lambda b: b.current_url == f"{url}/accounts")
        assert token not in browser.page_source


@pytest.fixture(autouse=True)
def _report_browser_logs(browser: Any) -> Any:
    """A failing test shows what the page's console said (a script error, a 4xx)."""
    yield
    try:
        for entry in browser.get_log("browser"):
            print("browser:", entry)
    except Exception:  # a driver that cannot report logs reports nothing
        pass


def test_the_accounts_list_searches_and_follows_changes(
    server: str, console: str, browser: Any
) -> None:
    new_account(server, "list-a1", dollars=5)
    new_account(server, "list-a2", dollars=6)
    new_account(server, "other-b", dollars=7)
    by = _by()
    browser.get(f"{console}/accounts?q=list-")
    rows = browser.find_elements(by.CSS_SELECTOR, "#accounts tbody tr")
    assert [row.find_element(by.TAG_NAME, "a").text for row in rows] == ["list-a1", "list-a2"]
    assert "$6.00" in rows[1].text and "active" in rows[1].text
    browser.execute_script("window.notReloaded = true;")
    admin_cli(server, "topup", "list-a2", "100", "--idempotency-key", "list-a2-1")
    wait_for(
        browser,
        LIVE_WITHIN_SECONDS,
        lambda b: "$7.00" in b.find_elements(by.CSS_SELECTOR, "#accounts tbody tr")[1].text,
    )
    assert browser.execute_script("return window.notReloaded === true;")
    browser.find_element(by.LINK_TEXT, "list-a1").click()
    wait_for(browser, 5, lambda b: text_of(b, "balance") == "$5.00")
