"""The console's security decisions: passwords, CSRF tokens, sessions, the login brake."""

from __future__ import annotations

import pytest

from callcredit_server.console.security import (
    LoginBrake,
    Sessions,
    check_password,
    csrf_ok,
    csrf_token,
    hash_password,
    secret_matches,
)

SALT = bytes(range(16))
SECRET = b"s" * 32


def test_a_password_matches_only_its_own_hash() -> None:
    stored = hash_password("correct horse battery", SALT)
    assert stored.startswith("scrypt:") and "correct" not in stored
    assert check_password("correct horse battery", stored)
    assert not check_password("correct horse batterY", stored)
    assert hash_password("correct horse battery", bytes(16)) != stored  # salted


@pytest.mark.parametrize(
    "stored",
    [
        pytest.param("", id="empty"),
        pytest.param("plain-text-password", id="no-scheme"),
        pytest.param("bcrypt:00:11", id="other-scheme"),
        pytest.param("scrypt:zz:11", id="bad-hex"),
        pytest.param("scrypt:0011:2233", id="short-salt"),
        pytest.param("scrypt:" + SALT.hex() + ":", id="no-digest"),
    ],
)
def test_a_malformed_stored_hash_matches_nothing(stored: str) -> None:
    assert not check_password("", stored)
    assert not check_password("plain-text-password", stored)


def test_a_short_salt_is_a_bug() -> None:
    with pytest.raises(ValueError):
        hash_password("x" * 20, b"short")


def test_secret_matches_the_configured_one_only() -> None:
    assert secret_matches("tok-123", "tok-123")
    assert not secret_matches("tok-12", "tok-123")
    assert not secret_matches("", None) and not secret_matches("", "")


def test_a_csrf_token_belongs_to_its_session_and_secret() -> None:
    token = csrf_token(SECRET, "session-a")
    assert csrf_ok(SECRET, "session-a", token)
    assert not csrf_ok(SECRET, "session-b", token)
    assert not csrf_ok(b"t" * 32, "session-a", token)
    assert not csrf_ok(SECRET, None, token)
    assert not csrf_ok(SECRET, "session-a", None)
    assert not csrf_ok(SECRET, "session-a", "")
    assert not csrf_ok(SECRET, "session-a", token[:-1])


def test_sessions_expire_when_idle_and_on_logout() -> None:
    sessions = Sessions(idle_ms=1_000)
    sessions.log_in("a", 0)
    assert sessions.active("a", 900)
    assert sessions.active("a", 1_800)  # use renews it
    assert not sessions.active("a", 2_801)
    assert len(sessions) == 0
    sessions.log_in("b", 0)
    sessions.log_out("b")
    assert not sessions.active("b", 1)
    assert not sessions.active(None, 1)
    assert not sessions.active("never", 1)


def test_sessions_are_bounded_the_least_recently_used_goes_first() -> None:
    sessions = Sessions(max_sessions=2)
    sessions.log_in("a", 0)
    sessions.log_in("b", 1)
    assert sessions.active("a", 2)
    sessions.log_in("c", 3)
    assert len(sessions) == 2
    assert sessions.active("a", 4) and sessions.active("c", 4)
    assert not sessions.active("b", 4)


def test_the_brake_allows_so_many_failures_a_window() -> None:
    brake = LoginBrake(failures_max=3, window_ms=60_000)
    for at_ms in (0, 10, 20):
        assert brake.wait_ms(at_ms) == 0
        brake.failed(at_ms)
    assert brake.wait_ms(30) == 60_000 - 30
    assert brake.wait_ms(59_999) == 1
    assert brake.wait_ms(60_000) == 0  # the first failure left the window
    brake.failed(60_000)
    assert brake.wait_ms(60_001) == 60_010 - 60_001
