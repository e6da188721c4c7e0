"""Clients given several targets fail fast too, naming every target and why it failed
(the hot standby setup itself: tests/ha/test_clients_follow.py)."""

from __future__ import annotations

from tests.security.test_fail_fast import BOUND, WITHIN, admin_error, closed_port, reserve_error

REFUSED = "connection refused (is the server running, on this port?)"


async def test_several_unreachable_targets_are_each_named_with_the_cause() -> None:
    first, second = f"127.0.0.1:{closed_port()}", f"127.0.0.1:{closed_port()}"
    expected = f"cannot reach {first}: {REFUSED}; cannot reach {second}: {REFUSED}"
    admin = await admin_error(f"{first},{second}")
    dialer, seconds = await reserve_error(f"{first},{second}")
    for error in (admin, dialer):
        assert (error.reason, error.message) == ("UNAVAILABLE", expected)
    assert BOUND <= seconds < WITHIN
