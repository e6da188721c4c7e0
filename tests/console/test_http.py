"""The console over plain HTTP (httpx against a real console process): CSRF, the login
wall, headers, and the live stream's timing."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import pytest

from callcredit_server.console.security import LOGIN_FAILURES_MAX, hash_password
from callcredit_server.launch import serving
from tests.console.conftest import new_account
from tests.console.processes import admin_cli, console_process

PASSWORD = "operator password 2"


def form_fields(page: str) -> dict[str, str]:
    return dict(re.findall(r'name="(csrf|idempotency_key)" value="([^"]*)"', page))


def balance(target: str, account_id: str) -> int:
    return int(admin_cli(target, "account", "show", account_id)["balance"])


def test_a_post_without_its_sessions_csrf_token_is_refused_and_changes_nothing(
    server: str, console: str
) -> None:
    new_account(server, "csrf-1", dollars=1)
    with httpx.Client(base_url=console) as alice, httpx.Client(base_url=console) as mallory:
        fields = form_fields(alice.get("/accounts/csrf-1").text)
        mallory_fields = form_fields(mallory.get("/accounts/csrf-1").text)
        top_up = {"amount": "5", "note": "", "confirmed": "yes"}
        attempts = [
            (alice, {**top_up, "idempotency_key": fields["idempotency_key"]}),  # no token
            (alice, {**top_up, **fields, "csrf": "0" * 64}),  # a made-up token
            (alice, {**top_up, **fields, "csrf": mallory_fields["csrf"]}),  # another session's
            (mallory, {**top_up, **fields}),  # Alice's token without Alice's cookie
        ]
        for client, data in attempts:
            assert client.post("/accounts/csrf-1/top-up", data=data).status_code == 403
        assert alice.post("/logout", data={}).status_code == 403
        assert balance(server, "csrf-1") == 100
        answer = alice.post("/accounts/csrf-1/top-up", data={**top_up, **fields})
        assert answer.status_code == 303 and balance(server, "csrf-1") == 600


def test_pages_carry_protective_headers_and_a_strict_cookie(console: str) -> None:
    answer = httpx.get(f"{console}/accounts/nobody")
    assert answer.status_code == 404  # the server's refusal, shown
    assert "ACCOUNT_NOT_FOUND" in answer.text
    assert answer.headers["x-frame-options"] == "DENY"
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert answer.headers["cache-control"] == "no-store"
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie


def test_the_live_stream_says_changed_within_two_seconds(server: str, console: str) -> None:
    new_account(server, "sse-1", dollars=1)
    new_account(server, "sse-other", dollars=1)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        with httpx.stream("GET", f"{console}/live?account=sse-1", timeout=10) as stream:
            for line in stream.iter_lines():
                lines.append((time.monotonic(), line))
                if line.startswith("event: changed"):
                    return

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 10
    while not lines and time.monotonic() < deadline:  # until the stream's first line
        time.sleep(0.02)
    admin_cli(server, "topup", "sse-other", "100", "--idempotency-key", "sse-other-1")
    time.sleep(1.0)  # a change of sse-1 would have been told well within this
    assert not any(line.startswith("event:") for _, line in lines), "another account's change"
    admin_cli(server, "topup", "sse-1", "100", "--idempotency-key", "sse-1-1")
    answered = time.monotonic()  # the CLI's start-up (a second of imports) is not counted
    reader.join(10)
    changed = [at for at, line in lines if line.startswith("event: changed")]
    assert changed and changed[0] - answered < 2.0


def test_a_request_through_a_proxy_needs_the_login_even_on_loopback(console: str) -> None:
    for header in ("X-Forwarded-For", "Forwarded"):
        answer = httpx.get(f"{console}/accounts", headers={header: "for=203.0.113.9"})
        assert (answer.status_code, answer.headers.get("location")) == (303, "/login")
    assert httpx.get(f"{console}/accounts/nobody").status_code == 404  # direct: no login


@pytest.fixture(scope="module")
def guarded(server: str, tmp_path_factory: pytest.TempPathFactory) -> object:
    """A console on 127.0.0.2 (not the machine's own address): a login is required."""
    folder = tmp_path_factory.mktemp("guarded")
    config = folder / "console.toml"
    config.write_text(f'operator_password_hash = "{hash_password(PASSWORD, bytes(16))}"\n')
    with console_process(
        folder / "console.log", server, "127.0.0.2:0", ["--config", str(config)]
    ) as url:
        yield url


def test_off_loopback_everything_but_the_login_needs_one(guarded: str) -> None:
    with httpx.Client(base_url=guarded) as client:
        for path in ("/", "/accounts", "/accounts/a", "/accounts/a/live"):
            answer = client.get(path)
            assert (answer.status_code, answer.headers.get("location")) == (303, "/login"), path
        assert client.get("/live").status_code == 401
        assert client.get("/static/htmx.min.js").status_code == 200
        page = client.get("/login").text
        fields = form_fields(page)
        assert client.post("/accounts/a/status", data=fields).status_code == 401
        answer = client.post("/login", data={**fields, "secret": PASSWORD})
        assert (answer.status_code, answer.headers["location"]) == (303, "/accounts")
        assert client.get("/accounts/a").status_code == 404  # past the wall: no such account


def test_guessing_is_braked(guarded: str) -> None:
    with httpx.Client(base_url=guarded) as client:
        fields = form_fields(client.get("/login").text)
        codes = [
            client.post("/login", data={**fields, "secret": f"guess {i}"}).status_code
            for i in range(LOGIN_FAILURES_MAX + 1)
        ]
        assert codes == [401] * LOGIN_FAILURES_MAX + [429]
        # Even the right password waits until the window has passed.
        assert client.post("/login", data={**fields, "secret": PASSWORD}).status_code == 429


def test_the_console_follows_the_feed_again_after_the_server_restarts(
    tmp_path: Path,
) -> None:
    database = f"sqlite:///{tmp_path / 'journal.db'}"

    def args(port: int) -> list[str]:
        return ["--listen", f"127.0.0.1:{port}", "--database-url", database]

    with serving(args(0), tmp_path / "first.log") as first:
        port = first.port
        admin_cli(first.target, "tariff", "put", "t-usd", "--currency", "USD", "--rate", ":1:1/1")
        new_account(first.target, "restart-1", dollars=1)
        with console_process(tmp_path / "console.log", first.target) as console:
            first.stop()
            with serving(args(port), tmp_path / "second.log"):
                lines: list[str] = []

                def read() -> None:
                    url = f"{console}/live?account=restart-1"
                    with httpx.stream("GET", url, timeout=30) as stream:
                        for line in stream.iter_lines():
                            lines.append(line)
                            if line.startswith("event: changed"):
                                return

                reader = threading.Thread(target=read)
                reader.start()
                target = f"127.0.0.1:{port}"
                admin_cli(target, "topup", "restart-1", "100", "--idempotency-key", "after")
                reader.join(15)
                assert "event: changed" in lines


def ledger_ids(page: str) -> list[int]:
    ledger = page[page.index('id="ledger"') :]
    ledger = ledger[: ledger.index("</table>")]
    return [int(entry_id) for entry_id in re.findall(r'<td class="num">(\d+)</td>', ledger)]


def test_the_ledger_is_listed_newest_first_and_pages_back(server: str, console: str) -> None:
    new_account(server, "ledger-1", dollars=1)
    for i in range(1, 3):
        admin_cli(server, "topup", "ledger-1", "100", "--idempotency-key", f"ledger-1-{i}")
    newest = ledger_ids(httpx.get(f"{console}/accounts/ledger-1").text)
    assert len(newest) == 3 and newest == sorted(newest, reverse=True)
    older = ledger_ids(httpx.get(f"{console}/accounts/ledger-1?after={newest[0]}").text)
    assert older == newest[1:]
