"""The lease's decisions (lease.py), with time as an argument: no database, no clock."""

from __future__ import annotations

import pytest

from callcredit_server.lease import Action, Lease, LeaseRow, LeaseSettings, Role

SETTINGS = LeaseSettings(lease_ms=5_000, renew_ms=1_000)
MARGIN = SETTINGS.margin_ms


def live(epoch: int = 3, owner: str = "other", remaining_ms: int = 4_000) -> LeaseRow:
    return LeaseRow(owner, epoch, "10.0.0.2:50051", remaining_ms)


def primary(at_ms: int = 0) -> Lease:
    lease = Lease(SETTINGS, "me")
    assert lease.observe(live(remaining_ms=0), at_ms) is Action.TAKE
    lease.taken(lease.next_epoch(), at_ms, "10.0.0.1:50051")
    return lease


def test_a_live_lease_is_left_alone_and_its_primary_is_known() -> None:
    lease = Lease(SETTINGS, "me")
    assert lease.observe(live(), 0) is Action.WAIT
    assert (lease.role, lease.primary, lease.epoch) == (Role.STANDBY, "10.0.0.2:50051", 3)
    assert not lease.serving(0)


@pytest.mark.parametrize("remaining_ms", [0, -1, -60_000])
def test_an_expired_lease_is_taken_at_the_next_epoch(remaining_ms: int) -> None:
    lease = Lease(SETTINGS, "me")
    assert lease.observe(live(epoch=3, remaining_ms=remaining_ms), 0) is Action.TAKE
    assert lease.primary == ""  # nobody to send clients to
    assert lease.next_epoch() == 4


def test_an_empty_journal_has_no_row_and_the_first_epoch_is_1() -> None:
    lease = Lease(SETTINGS, "me")
    assert lease.observe(None, 0) is Action.TAKE
    assert lease.next_epoch() == 1


def test_taking_another_epoch_than_decided_is_a_bug() -> None:
    lease = Lease(SETTINGS, "me")
    lease.observe(live(epoch=3, remaining_ms=0), 0)
    with pytest.raises(ValueError, match="taken epoch 5"):
        lease.taken(5, 0, "a:1")


def test_the_primary_serves_from_the_send_time_less_the_margin() -> None:
    lease = primary(at_ms=10_000)
    assert lease.role is Role.PRIMARY and lease.epoch == 4
    assert lease.serving(10_000)
    assert lease.valid_for_ms(10_000) == 5_000 - MARGIN
    assert lease.serving(15_000 - MARGIN - 1)
    assert not lease.serving(15_000 - MARGIN)


def test_renewals_are_due_every_renew_interval_and_extend_from_their_send_time() -> None:
    lease = primary(at_ms=0)
    assert lease.due(999) is Action.WAIT
    assert lease.due(1_000) is Action.RENEW
    # The renewal was sent at 1,000 and answered late (at 3,000): it counts from 1,000.
    assert lease.renewed(True, sent_at_ms=1_000) is Action.WAIT
    assert lease.valid_for_ms(3_000) == 1_000 + 5_000 - MARGIN - 3_000
    assert lease.due(1_999) is Action.WAIT
    assert lease.due(2_000) is Action.RENEW


def test_a_refused_renewal_deposes_the_primary_for_good() -> None:
    lease = primary()
    assert lease.renewed(False, sent_at_ms=1_000) is Action.STEP_DOWN
    assert lease.role is Role.DEPOSED and not lease.serving(1_000)
    assert lease.observe(live(remaining_ms=0), 2_000) is Action.WAIT  # never takes again
    assert lease.due(2_000) is Action.WAIT
    assert lease.renewed(True, sent_at_ms=2_000) is Action.WAIT
    assert lease.role is Role.DEPOSED


def test_renewals_that_cannot_reach_the_database_are_retried_until_the_lease_runs_out() -> None:
    lease = primary(at_ms=0)
    for now in range(1_000, 5_000 - MARGIN, 100):
        assert lease.renewal_failed(now) is Action.RENEW
        assert lease.serving(now)
    assert lease.renewal_failed(5_000 - MARGIN) is Action.STEP_DOWN
    assert lease.role is Role.DEPOSED


def test_a_paused_primary_steps_down_at_its_first_look_at_the_clock() -> None:
    lease = primary(at_ms=0)
    assert lease.due(60_000) is Action.STEP_DOWN  # SIGSTOP for a minute, then SIGCONT
    assert not lease.serving(60_000)


@pytest.mark.parametrize(
    "row",
    [None, live(epoch=5, owner="other"), live(epoch=4, owner="someone-else")],
    ids=["row gone", "another epoch", "another owner"],
)
def test_a_primary_that_sees_the_lease_moved_on_steps_down(row: LeaseRow | None) -> None:
    lease = primary()
    assert lease.observe(row, 500) is Action.STEP_DOWN
    assert lease.role is Role.DEPOSED


def test_a_primary_that_sees_its_own_lease_waits() -> None:
    lease = primary()
    assert lease.observe(live(epoch=4, owner="me"), 500) is Action.WAIT
    assert lease.role is Role.PRIMARY


@pytest.mark.parametrize(
    ("lease_ms", "renew_ms", "problem"),
    [
        (999, 100, "--lease-seconds"),
        (60_001, 1_000, "--lease-seconds"),
        (5_000, 0, "--lease-renew-seconds"),
        (5_000, 2_501, "--lease-renew-seconds"),
    ],
)
def test_unusable_settings_are_refused(lease_ms: int, renew_ms: int, problem: str) -> None:
    settings = LeaseSettings(lease_ms, renew_ms)
    assert any(problem in p for p in settings.problems())
    with pytest.raises(ValueError, match=problem):
        Lease(settings, "me")


def test_the_margin_grows_with_the_lease() -> None:
    assert LeaseSettings(5_000, 1_000).margin_ms == 100
    assert LeaseSettings(60_000, 1_000).margin_ms == 600
