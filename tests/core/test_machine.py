"""The state machine against docs/design.md: accounts, calls, expiry, re-grant, idempotency.

Unless a test says otherwise the tariff "T" charges 1 đ/s billed per second with no
connect fee, so cost(s) == s and every amount below can be checked by eye. The
server settings are those of helpers.py: grant 60 s, max grant 600 s, validity 120 s.
Every step is followed by Sim.check() (audit empty, money conserved, final flags right).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from callcredit_server.core import (
    AccountStatus,
    Adjust,
    CallState,
    Command,
    CreateAccount,
    EntryKind,
    Grant,
    GrantPush,
    InvariantViolation,
    LedgerEntry,
    PutTariff,
    Rate,
    Reason,
    Release,
    ReleaseResult,
    Reserve,
    Tariff,
    Termination,
    Tick,
    TickResult,
    TopUp,
    UpdateAccount,
)
from callcredit_server.core.machine import MAX_EXPIRIES_PER_STEP, STALE_EXPIRIES_SLACK

from .helpers import (
    DESTINATION,
    PER_SECOND,
    RETENTION_MS,
    T0_MS,
    VALIDITY_SECONDS,
    Sim,
    account_of,
    granted,
    rate,
    refusal,
    released,
    renew,
    reserve,
    state_of,
)

VALIDITY_MS = VALIDITY_SECONDS * 1_000
PER_SECOND_60_60 = rate(first=60, step=60)
PER_SECOND_30_6 = rate(first=30, step=6)
FEE_10 = rate(fee=10)
FEE_500 = rate(fee=500)
VND_19_66 = rate(price=1_179_600_000)


def new_sim(rates: tuple[Rate, ...] = (rate(),)) -> Sim:
    w = Sim()
    w.put_tariff(rates)
    return w


def grant(call_id: str, allowed: int, final: bool, held: int) -> Grant:
    return Grant(call_id, allowed, final, VALIDITY_SECONDS, held)


# ----------------------------------------------------------------------- accounts


def test_create_account_starts_empty_and_active(sim: Sim) -> None:
    step = sim.apply(CreateAccount("A", "VND", "T", 250, 3))
    assert step.changed
    assert account_of(step) == sim.view()
    view = sim.view()
    assert (view.status, view.balance, view.reserved, view.available) == (
        AccountStatus.ACTIVE,
        0,
        0,
        250,
    )
    assert (view.credit_limit, view.max_concurrent_calls, view.active_calls) == (250, 3, 0)


def test_the_totals_per_currency_follow_every_change_and_the_audit_recounts_them(
    sim: Sim,
) -> None:
    """Metrics read them instead of a pass over every account; the Sim audits each step."""
    sim.put_tariff(tariff_id="U", currency="USD")
    sim.open_account("A", balance=1_000)
    sim.open_account("B", balance=70)
    sim.open_account("C", balance=500, tariff_id="U", currency="USD")
    sim.reserve("c1")
    sim.reserve("c2", "B")
    sim.reserve("u1", "C")
    sim.renew("c1", 1, 60)
    sim.release("c2", 30)
    vnd, usd = sim.machine.totals["VND"], sim.machine.totals["USD"]
    a, b, c = sim.view("A"), sim.view("B"), sim.view("C")
    assert (vnd.balance, vnd.reserved, vnd.open_calls) == (
        a.balance + b.balance,
        a.reserved + b.reserved,
        1,
    )
    assert (usd.balance, usd.reserved, usd.open_calls) == (c.balance, c.reserved, 1)
    assert vnd.reserved > 0 and vnd.balance < 1_070
    vnd.balance += 1  # a bug that moved the totals and not the balance
    assert [p for p in sim.machine.audit() if "totals per currency" in p]


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        pytest.param(CreateAccount("A", "VND", "T", 0, 0), Reason.ACCOUNT_EXISTS, id="exists"),
        pytest.param(
            CreateAccount("B", "VND", "nope", 0, 0), Reason.TARIFF_NOT_FOUND, id="create-tariff"
        ),
        pytest.param(
            CreateAccount("B", "USD", "T", 0, 0), Reason.CURRENCY_MISMATCH, id="create-currency"
        ),
        pytest.param(
            UpdateAccount("A", tariff_id="nope"), Reason.TARIFF_NOT_FOUND, id="update-tariff"
        ),
        pytest.param(
            UpdateAccount("A", tariff_id="U"), Reason.CURRENCY_MISMATCH, id="update-currency"
        ),
        pytest.param(
            PutTariff(Tariff("T", "USD", (rate(),))),
            Reason.CURRENCY_MISMATCH,
            id="put-tariff-currency-change",
        ),
        pytest.param(
            UpdateAccount("nobody", credit_limit=5), Reason.ACCOUNT_NOT_FOUND, id="update-unknown"
        ),
        pytest.param(TopUp("nobody", 5, "k", ""), Reason.ACCOUNT_NOT_FOUND, id="top-up-unknown"),
        pytest.param(Adjust("nobody", 5, "k", ""), Reason.ACCOUNT_NOT_FOUND, id="adjust-unknown"),
        pytest.param(reserve("c", "nobody"), Reason.ACCOUNT_NOT_FOUND, id="reserve-unknown"),
        pytest.param(renew("nobody", 1, 0), Reason.CALL_NOT_FOUND, id="renew-unknown"),
        pytest.param(Release("nobody", 0), Reason.CALL_NOT_FOUND, id="release-unknown"),
    ],
)
def test_refusals(sim: Sim, command: Command, reason: Reason) -> None:
    sim.put_tariff(tariff_id="U", currency="USD")
    sim.open_account(balance=100)
    sim.refuse(command, reason)


def test_put_tariff_replaces_rates_in_the_same_currency(sim: Sim) -> None:
    new = Tariff("T", "VND", (rate(price=2 * PER_SECOND),))
    step = sim.apply(PutTariff(new))
    assert step.changed
    assert sim.machine.tariffs["T"] == new


def test_rate_is_frozen_on_the_call_at_reserve(sim: Sim) -> None:
    sim.open_account(balance=1_000)
    assert granted(sim.reserve("old")) == grant("old", 60, False, 60)
    sim.put_tariff([rate(price=2 * PER_SECOND)])
    assert granted(sim.reserve("new")) == grant("new", 60, False, 120)
    assert released(sim.release("old", 30)).charged == 30
    assert released(sim.release("new", 30)).charged == 60
    assert sim.view().balance == 910


def test_tariff_change_prices_new_calls_only(sim: Sim) -> None:
    sim.put_tariff([rate(price=3 * PER_SECOND)], tariff_id="V")
    sim.open_account(balance=1_000)
    granted(sim.reserve("old"))
    assert sim.update(UpdateAccount("A", tariff_id="V")).tariff_id == "V"
    assert granted(sim.reserve("new")) == grant("new", 60, False, 180)
    assert released(sim.release("old", 10)).charged == 10
    assert released(sim.release("new", 10)).charged == 30


@pytest.mark.parametrize(
    ("balance", "credit_limit", "command", "reason"),
    [
        pytest.param(100, 0, Adjust("A", -40, "k", ""), None, id="adjust-to-available-zero"),
        pytest.param(
            100, 0, Adjust("A", -41, "k", ""), Reason.INSUFFICIENT_FUNDS, id="adjust-below-zero"
        ),
        pytest.param(0, 100, Adjust("A", -40, "k", ""), None, id="adjust-into-credit"),
        pytest.param(
            0, 100, Adjust("A", -41, "k", ""), Reason.INSUFFICIENT_FUNDS, id="adjust-past-credit"
        ),
        pytest.param(0, 100, UpdateAccount("A", credit_limit=60), None, id="limit-to-held"),
        pytest.param(
            0,
            100,
            UpdateAccount("A", credit_limit=59),
            Reason.INSUFFICIENT_FUNDS,
            id="limit-below-held",
        ),
        pytest.param(
            50, 100, UpdateAccount("A", credit_limit=10), None, id="limit-lowered-within-funds"
        ),
        pytest.param(
            50,
            100,
            UpdateAccount("A", credit_limit=9),
            Reason.INSUFFICIENT_FUNDS,
            id="limit-lowered-too-far",
        ),
    ],
)
def test_admin_changes_keep_available_non_negative(
    sim: Sim,
    balance: int,
    credit_limit: int,
    command: Adjust | UpdateAccount,
    reason: Reason | None,
) -> None:
    """An open call holds 60; available is balance + credit_limit - 60."""
    sim.open_account(balance=balance, credit_limit=credit_limit)
    granted(sim.reserve("c"))
    if reason is not None:
        sim.refuse(command, reason)
        return
    view = account_of(sim.apply(command))
    assert view.available == 0
    assert view.reserved == 60


def test_negative_adjust_is_an_adjustment_entry(sim: Sim) -> None:
    sim.open_account(balance=100)
    view = account_of(sim.apply(Adjust("A", -30, "fix-1", "goodwill reversal")))
    assert (view.balance, view.available) == (70, 70)
    assert sim.entries[-1] == LedgerEntry(
        entry_id=sim.entries[-2].entry_id + 1,
        account_id="A",
        kind=EntryKind.ADJUSTMENT,
        amount=-30,
        balance_after=70,
        call_id="",
        reference="goodwill reversal",
        idempotency_key="fix-1",
        created_at_ms=T0_MS,
    )


def test_update_without_changes_changes_nothing(sim: Sim) -> None:
    sim.open_account(balance=100, credit_limit=5, cap=2)
    step = sim.apply(
        UpdateAccount(
            "A",
            status=AccountStatus.ACTIVE,
            tariff_id="T",
            credit_limit=5,
            max_concurrent_calls=2,
        )
    )
    assert step.changed is False
    assert account_of(step) == sim.view()


# ------------------------------------------------------------------ idempotency


@pytest.fixture
def keyed(sim: Sim) -> Sim:
    """Account A: TopUp k1 (100, "ref") then Adjust k2 (-10, "fix"); account B empty."""
    sim.open_account()
    sim.open_account("B")
    assert account_of(sim.apply(TopUp("A", 100, "k1", "ref"))).balance == 100
    assert account_of(sim.apply(Adjust("A", -10, "k2", "fix"))).balance == 90
    return sim


@pytest.mark.parametrize(
    ("command", "balance"),
    [
        pytest.param(TopUp("A", 100, "k1", "ref"), 100, id="top-up"),
        pytest.param(Adjust("A", -10, "k2", "fix"), 90, id="adjust"),
    ],
)
def test_repeat_returns_first_answer_even_after_other_changes(
    keyed: Sim, command: TopUp | Adjust, balance: int
) -> None:
    keyed.top_up(1_000)
    granted(keyed.reserve("c"))
    step = keyed.apply(command)
    assert step.changed is False
    assert account_of(step).balance == balance
    assert account_of(step).reserved == 0
    assert keyed.view().balance == 1_090


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(TopUp("A", 101, "k1", "ref"), id="top-up-amount"),
        pytest.param(TopUp("A", 100, "k1", "other"), id="top-up-reference"),
        pytest.param(Adjust("A", 100, "k1", "ref"), id="adjust-reusing-a-top-up-key"),
        pytest.param(Adjust("A", -11, "k2", "fix"), id="adjust-amount"),
        pytest.param(Adjust("A", -10, "k2", "other"), id="adjust-reason"),
        pytest.param(TopUp("A", 10, "k2", "fix"), id="top-up-reusing-an-adjust-key"),
    ],
)
def test_same_key_different_fields_conflicts(keyed: Sim, command: TopUp | Adjust) -> None:
    keyed.refuse(command, Reason.IDEMPOTENCY_KEY_CONFLICT)


def test_same_key_on_another_account_is_independent(keyed: Sim) -> None:
    assert account_of(keyed.apply(TopUp("B", 100, "k1", "ref"))).balance == 100
    assert account_of(keyed.apply(Adjust("B", 7, "k2", "fix"))).balance == 107
    assert keyed.view().balance == 90


def test_top_up_entry_carries_key_and_reference(keyed: Sim) -> None:
    entries = keyed.entries
    assert [
        (e.kind, e.amount, e.balance_after, e.reference, e.idempotency_key) for e in entries
    ] == [
        (EntryKind.TOP_UP, 100, 100, "ref", "k1"),
        (EntryKind.ADJUSTMENT, -10, 90, "fix", "k2"),
    ]


def test_keys_are_forgotten_after_the_window(keyed: Sim) -> None:
    keyed.advance(ms=RETENTION_MS - 1)
    assert keyed.tick().outcome == TickResult(expired=0, forgotten=0)
    assert keyed.apply(TopUp("A", 100, "k1", "ref")).changed is False
    keyed.advance(ms=1)
    step = keyed.tick()
    assert step.outcome == TickResult(expired=0, forgotten=2)
    assert step.changed
    # Forgotten: the same key is a new request now (DESIGN: ids must not be reused).
    assert account_of(keyed.apply(TopUp("A", 100, "k1", "ref"))).balance == 190


def test_tick_with_nothing_to_do_changes_nothing(sim: Sim) -> None:
    sim.open_account(balance=10)
    step = sim.tick()
    assert step.outcome == TickResult(expired=0, forgotten=0)
    assert step.changed is False


# ---------------------------------------------------------------------- reserve

RESERVE_CHECKS = ["input", "known", "account", "status", "cap", "rate", "funds"]
RESERVE_REASONS = {
    "input": Reason.INVALID_ARGUMENT,
    "known": Reason.CALL_ID_CONFLICT,
    "account": Reason.ACCOUNT_NOT_FOUND,
    "status": Reason.ACCOUNT_SUSPENDED,
    "cap": Reason.CONCURRENT_CALL_LIMIT,
    "rate": Reason.NO_RATE_FOR_DESTINATION,
    "funds": Reason.INSUFFICIENT_FUNDS,
}


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(RESERVE_CHECKS[i:], id=f"{RESERVE_CHECKS[i]}-and-every-later-check")
        for i in range(len(RESERVE_CHECKS))
    ]
    + [pytest.param([], id="nothing-broken")],
)
def test_reserve_checks_in_order(broken: list[str]) -> None:
    """Break a check and every check after it: the first broken one answers."""
    w = new_sim((rate("84"),))
    w.open_account(balance=100, cap=2)
    assert granted(w.reserve("c0")) == grant("c0", 60, False, 60)
    if "funds" in broken:
        w.adjust(-40)
    if "cap" in broken:
        w.update(UpdateAccount("A", max_concurrent_calls=1))
    if "status" in broken:
        w.suspend()
    command = reserve(
        "c0" if "known" in broken else "c1",
        "nobody" if "account" in broken else "A",
        "84x" if "input" in broken else "1555" if "rate" in broken else "84905",
    )
    if broken:
        w.refuse(command, RESERVE_REASONS[broken[0]])
    else:
        assert granted(w.apply(command)) == grant("c1", 40, True, 40)


def test_reserve_on_closed_account(sim: Sim) -> None:
    sim.open_account()
    sim.update(UpdateAccount("A", status=AccountStatus.CLOSED))
    sim.refuse(reserve("c"), Reason.ACCOUNT_CLOSED)


@pytest.mark.parametrize(
    ("rates", "balance", "credit_limit", "requested", "expected"),
    [
        pytest.param((rate(),), 1_000, 0, 0, (60, False, 60), id="default-grant"),
        pytest.param((rate(),), 1_000, 0, 30, (30, False, 30), id="requested"),
        pytest.param((rate(),), 1_000, 0, 600, (600, False, 600), id="requested-max"),
        pytest.param((rate(),), 1_000, 0, 601, (600, False, 600), id="requested-over-max"),
        pytest.param((rate(),), 1_000, 0, 86_400, (600, False, 600), id="requested-a-day"),
        pytest.param((rate(),), 60, 0, 0, (60, False, 60), id="funds-exactly-g"),
        pytest.param((rate(),), 45, 0, 0, (45, True, 45), id="funds-cut"),
        pytest.param((rate(),), 1, 0, 0, (1, True, 1), id="one-second"),
        pytest.param((rate(),), 0, 100, 0, (60, False, 60), id="credit-limit"),
        pytest.param((rate(),), 20, 20, 0, (40, True, 40), id="balance-and-credit"),
        pytest.param((PER_SECOND_60_60,), 100, 0, 0, (60, False, 60), id="60/60"),
        pytest.param((PER_SECOND_60_60,), 100, 0, 90, (60, True, 60), id="60/60-funds-cut"),
        pytest.param(
            (PER_SECOND_60_60,), 1_000, 0, 90, (90, False, 120), id="60/60-holds-increment"
        ),
        pytest.param((PER_SECOND_30_6,), 1_000, 0, 31, (31, False, 36), id="30/6"),
        pytest.param((FEE_10,), 40, 0, 0, (30, True, 40), id="connect-fee"),
        pytest.param((VND_19_66,), 1_179, 0, 0, (59, True, 1_160), id="19.66-short"),
        pytest.param((VND_19_66,), 1_180, 0, 0, (60, False, 1_180), id="19.66-exact"),
        pytest.param((rate(price=0),), 0, 0, 0, (60, False, 0), id="free-with-no-money"),
    ],
)
def test_reserve_grant(
    rates: tuple[Rate, ...],
    balance: int,
    credit_limit: int,
    requested: int,
    expected: tuple[int, bool, int],
) -> None:
    """allowed = the largest duration <= g whose cost fits available; hold = its cost."""
    w = new_sim(rates)
    w.open_account(balance=balance, credit_limit=credit_limit)
    step = w.reserve("c", requested_seconds=requested)
    allowed, final, held = expected
    assert granted(step) == grant("c", allowed, final, held)
    assert step.changed
    assert step.entries == []
    assert [(r.call_id, r.state, r.allowed_seconds, r.held) for r in step.calls] == [
        ("c", CallState.ACTIVE, allowed, held)
    ]
    view = w.view()
    assert (view.balance, view.reserved, view.available, view.active_calls) == (
        balance,
        held,
        balance + credit_limit - held,
        1,
    )
    record = w.call("c")
    assert (record.used_seconds, record.final, record.started_at_ms, record.expires_at_ms) == (
        0,
        final,
        T0_MS,
        T0_MS + VALIDITY_MS,
    )


@pytest.mark.parametrize(
    ("rates", "balance"),
    [
        pytest.param((rate(),), 0, id="empty"),
        pytest.param((PER_SECOND_60_60,), 59, id="60/60-less-than-first-increment"),
        pytest.param((FEE_10,), 10, id="connect-fee-only"),
        pytest.param((VND_19_66,), 19, id="19.66-less-than-one-second"),
    ],
)
def test_reserve_insufficient_funds(rates: tuple[Rate, ...], balance: int) -> None:
    w = new_sim(rates)
    w.open_account(balance=balance)
    w.refuse(reserve("c"), Reason.INSUFFICIENT_FUNDS)


def test_concurrent_reserves_cannot_spend_the_same_money(sim: Sim) -> None:
    sim.open_account(balance=100)
    assert granted(sim.reserve("c1")) == grant("c1", 60, False, 60)
    assert granted(sim.reserve("c2")) == grant("c2", 40, True, 40)
    sim.refuse(reserve("c3"), Reason.INSUFFICIENT_FUNDS)
    assert sim.view().available == 0


@pytest.mark.parametrize(
    ("destination", "prefix", "held"),
    [
        pytest.param("84901234567", "8490", 180, id="longest"),
        pytest.param("+84901234567", "8490", 180, id="plus-stripped"),
        pytest.param("+84812345", "84", 120, id="plus-stripped-shorter"),
        pytest.param("+15551234567", "", 60, id="default"),
    ],
)
def test_reserve_takes_longest_prefix_rate(destination: str, prefix: str, held: int) -> None:
    w = new_sim((rate(""), rate("84", price=2 * PER_SECOND), rate("8490", price=3 * PER_SECOND)))
    w.open_account(balance=1_000)
    assert granted(w.reserve("c", destination=destination)) == grant("c", 60, False, held)
    record = w.call("c")
    assert record.rate.prefix == prefix
    assert record.destination == destination.removeprefix("+")


def test_no_rate_for_destination() -> None:
    w = new_sim((rate("84"),))
    w.open_account(balance=1_000)
    w.refuse(reserve("c", destination="+15551234567"), Reason.NO_RATE_FOR_DESTINATION)


@pytest.mark.parametrize(
    "repeat",
    [
        pytest.param(reserve("c"), id="same"),
        pytest.param(reserve("c", destination="+" + DESTINATION), id="same-with-plus"),
    ],
)
def test_reserve_repeat_returns_current_grant(sim: Sim, repeat: Reserve) -> None:
    sim.open_account(balance=1_000)
    first = granted(sim.reserve("c"))
    sim.suspend()  # a repeat is answered before the status check
    step = sim.apply(repeat)
    assert (granted(step), step.changed) == (grant("c", 60, True, 60), False)
    sim.resume()
    step = sim.apply(repeat)
    assert (granted(step), step.changed) == (first, False)
    granted(sim.renew("c", 1, 30))
    step = sim.apply(repeat)
    assert (granted(step), step.changed) == (grant("c", 90, False, 90), False)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(reserve("c", account_id="B"), id="other-account"),
        pytest.param(reserve("c", destination="84901234568"), id="other-destination"),
        pytest.param(reserve("c", requested_seconds=60), id="other-requested"),
    ],
)
def test_call_id_conflict(sim: Sim, command: Reserve) -> None:
    sim.open_account(balance=1_000)
    sim.open_account("B", balance=1_000)
    granted(sim.reserve("c"))
    sim.refuse(command, Reason.CALL_ID_CONFLICT)
    released(sim.release("c", 5))
    sim.refuse(command, Reason.CALL_ID_CONFLICT)


@pytest.mark.parametrize(
    ("cap", "calls"),
    [
        pytest.param(0, 5, id="no-cap"),
        pytest.param(1, 1, id="cap-1"),
        pytest.param(3, 3, id="cap-3"),
    ],
)
def test_concurrent_call_limit(sim: Sim, cap: int, calls: int) -> None:
    sim.open_account(balance=10_000, cap=cap)
    for i in range(calls):
        granted(sim.reserve(f"c{i}"))  # never answered: used 0 still counts
    if cap:
        sim.refuse(reserve("extra"), Reason.CONCURRENT_CALL_LIMIT)
        released(sim.release("c0", 0))
        granted(sim.reserve("extra"))
        sim.refuse(reserve("more"), Reason.CONCURRENT_CALL_LIMIT)


def test_lowered_cap_refuses_new_calls_only(sim: Sim) -> None:
    sim.open_account(balance=1_000)
    granted(sim.reserve("c1"))
    granted(sim.reserve("c2"))
    assert sim.update(UpdateAccount("A", max_concurrent_calls=1)).active_calls == 2
    sim.refuse(reserve("c3"), Reason.CONCURRENT_CALL_LIMIT)
    granted(sim.renew("c1", 1, 10))


# ------------------------------------------------------------------------ renew


@pytest.mark.parametrize(
    ("rates", "balance", "used", "requested", "expected"),
    [
        pytest.param((rate(),), 1_000, 0, 0, (60, False, 60), id="early-renew-adds-nothing"),
        pytest.param((rate(),), 1_000, 10, 0, (70, False, 70), id="one-grant-beyond-use"),
        pytest.param((rate(),), 1_000, 59, 0, (119, False, 119), id="late-renew"),
        pytest.param((rate(),), 1_000, 50, 30, (80, False, 80), id="requested-g"),
        pytest.param((rate(),), 1_000, 10, 30, (60, False, 60), id="smaller-g-never-shrinks"),
        pytest.param((rate(),), 1_000, 100, 0, (160, False, 160), id="overran-before-renew"),
        pytest.param((rate(),), 1_000, 0, 601, (600, False, 600), id="g-capped-at-max"),
        pytest.param((rate(),), 100, 50, 0, (100, True, 100), id="funds-cut"),
        pytest.param((rate(),), 60, 30, 0, (60, True, 60), id="no-funds-left"),
        pytest.param((PER_SECOND_60_60,), 1_000, 30, 0, (90, False, 120), id="60/60"),
        pytest.param((PER_SECOND_60_60,), 100, 30, 0, (60, True, 60), id="60/60-funds-cut"),
        pytest.param((PER_SECOND_60_60,), 120, 30, 0, (90, False, 120), id="60/60-exact"),
        pytest.param((VND_19_66,), 2_000, 30, 0, (90, False, 1_770), id="19.66"),
        pytest.param((VND_19_66,), 1_500, 30, 0, (76, True, 1_495), id="19.66-funds-cut"),
    ],
)
def test_renew_grant(
    rates: tuple[Rate, ...],
    balance: int,
    used: int,
    requested: int,
    expected: tuple[int, bool, int],
) -> None:
    """allowed = max(allowed, used + g), cut to what held + available pays for."""
    w = new_sim(rates)
    w.open_account(balance=balance)
    granted(w.reserve("c"))
    w.advance(10)
    step = w.renew("c", 1, used, requested)
    allowed, final, held = expected
    assert granted(step) == grant("c", allowed, final, held)
    assert step.changed
    assert step.entries == []
    record = w.call("c")
    assert (record.used_seconds, record.last_sequence, record.expires_at_ms) == (
        used,
        1,
        T0_MS + 10_000 + VALIDITY_MS,
    )
    assert (w.view().balance, w.view().reserved) == (balance, held)


def test_renew_sequence_repeats(sim: Sim) -> None:
    sim.open_account(balance=1_000)
    granted(sim.reserve("c"))
    first = granted(sim.renew("c", 1, 10))
    assert first == grant("c", 70, False, 70)
    sim.advance(10)
    step = sim.renew("c", 1, 20, 300)  # a repeat: its other fields are not looked at
    assert (granted(step), step.changed) == (first, False)
    current = granted(sim.renew("c", 3, 20))  # sequences may skip
    assert current == grant("c", 80, False, 80)
    for older in (2, 1):
        step = sim.renew("c", older, 30)
        assert (granted(step), step.changed) == (current, False)
    step = sim.renew("c", 3, 99)
    assert (granted(step), step.changed) == (current, False)
    assert sim.call("c").used_seconds == 20


def test_renew_repeat_is_first_answer_older_is_current_grant(sim: Sim) -> None:
    sim.open_account(balance=100)
    granted(sim.reserve("c"))
    assert granted(sim.renew("c", 1, 10)) == grant("c", 70, False, 70)
    last = granted(sim.renew("c", 2, 50))
    assert last == grant("c", 100, True, 100)
    sim.top_up(50)  # re-grants c: 110 s
    current = grant("c", 110, False, 110)
    assert sim.pushes[-1] == GrantPush(current)
    assert granted(sim.renew("c", 2, 50)) == last
    assert granted(sim.renew("c", 1, 10)) == current


def test_renew_with_lower_used_seconds_is_invalid(sim: Sim) -> None:
    sim.open_account(balance=1_000)
    granted(sim.reserve("c"))
    granted(sim.renew("c", 1, 30))
    refused = sim.refuse(renew("c", 2, 29), Reason.INVALID_ARGUMENT)
    assert [name for name, _ in refused.field_violations] == ["used_seconds"]
    refused = sim.refuse(Release("c", 29), Reason.INVALID_ARGUMENT)
    assert [name for name, _ in refused.field_violations] == ["used_seconds"]
    assert granted(sim.renew("c", 2, 30)) == grant("c", 90, False, 90)


def test_ringing_call_stays_alive_by_renewing_with_zero(sim: Sim) -> None:
    sim.open_account(balance=1_000)
    granted(sim.reserve("c"))
    for sequence in range(1, 6):
        sim.advance(VALIDITY_SECONDS)
        assert granted(sim.renew("c", sequence, 0)) == grant("c", 60, False, 60)
    sim.advance(VALIDITY_SECONDS)
    assert sim.tick().outcome == TickResult(expired=0, forgotten=0)
    assert sim.call("c").state is CallState.ACTIVE
    assert sim.view().reserved == 60


# ---------------------------------------------------------------------- release


@pytest.mark.parametrize(
    ("rates", "balance", "credit_limit", "used", "expected"),
    [
        pytest.param((rate(),), 1_000, 0, 0, (0, 0, 0, 1_000), id="unanswered"),
        pytest.param((rate(),), 1_000, 0, 45, (45, 0, 45, 955), id="within-grant"),
        pytest.param((rate(),), 1_000, 0, 60, (60, 0, 60, 940), id="whole-grant"),
        pytest.param((rate(),), 1_000, 0, 100, (100, 0, 100, 900), id="overrun-covered"),
        pytest.param((rate(),), 60, 0, 100, (60, 40, 100, 0), id="overrun-shortfall"),
        pytest.param((rate(),), 70, 0, 100, (70, 30, 100, 0), id="overrun-held-plus-available"),
        pytest.param((rate(),), 0, 50, 80, (50, 30, 80, -50), id="overrun-into-credit"),
        pytest.param((PER_SECOND_60_60,), 1_000, 0, 1, (60, 0, 60, 940), id="60/60-1s"),
        pytest.param((PER_SECOND_60_60,), 1_000, 0, 61, (120, 0, 120, 880), id="60/60-61s"),
        pytest.param((PER_SECOND_30_6,), 1_000, 0, 31, (36, 0, 36, 964), id="30/6-31s"),
        pytest.param((FEE_500,), 1_000, 0, 0, (0, 0, 0, 1_000), id="fee-not-for-unanswered"),
        pytest.param((FEE_500,), 1_000, 0, 1, (501, 0, 1, 499), id="fee"),
        pytest.param((VND_19_66,), 10_000, 0, 59, (1_160, 0, 59, 8_840), id="19.66"),
    ],
)
def test_release_charges_cost_of_used(
    rates: tuple[Rate, ...],
    balance: int,
    credit_limit: int,
    used: int,
    expected: tuple[int, int, int, int],
) -> None:
    w = new_sim(rates)
    w.open_account(balance=balance, credit_limit=credit_limit)
    granted(w.reserve("c"))
    w.advance(30)
    step = w.release("c", used)
    charged, shortfall, billed, balance_after = expected
    assert released(step) == ReleaseResult("c", used, billed, charged, shortfall, balance_after)
    assert step.changed
    charges = [(e.kind, e.amount, e.balance_after, e.call_id) for e in step.entries]
    assert charges == ([(EntryKind.CALL_CHARGE, -charged, balance_after, "c")] if charged else [])
    view = w.view()
    assert (view.balance, view.reserved, view.available, view.active_calls) == (
        balance_after,
        0,
        balance_after + credit_limit,
        0,
    )
    record = w.call("c")
    assert (record.state, record.used_seconds, record.held, record.charged) == (
        CallState.RELEASED,
        used,
        0,
        charged,
    )
    assert (record.shortfall, record.ended_at_ms, record.expires_at_ms) == (
        shortfall,
        T0_MS + 30_000,
        None,
    )
    assert step.calls == [record]


def test_release_is_idempotent_and_final(sim: Sim) -> None:
    sim.open_account(balance=1_000)
    granted(sim.reserve("c"))
    first = released(sim.release("c", 45))
    assert first == ReleaseResult("c", 45, 45, 45, 0, 955)
    sim.top_up(100)
    step = sim.release("c", 45)
    assert (released(step), step.changed) == (first, False)
    sim.refuse(Release("c", 46), Reason.CALL_ALREADY_ENDED)
    sim.refuse(Release("c", 0), Reason.CALL_ALREADY_ENDED)
    sim.refuse(renew("c", 1, 45), Reason.CALL_ALREADY_ENDED)
    sim.refuse(reserve("c"), Reason.CALL_ALREADY_ENDED)
    assert sim.view().balance == 1_055


@pytest.mark.parametrize("events", [True, False])
def test_a_step_names_the_calls_it_ended_with_events_on_or_off(events: bool) -> None:
    """What the writer unroutes by: its machine builds no call records (events off)."""
    sim = Sim()
    sim.machine.events = events
    sim.put_tariff()
    sim.open_account(balance=1_000)
    assert sim.reserve("a").ended == sim.reserve("b").ended == []
    assert sim.apply(renew("a", 1, 5)).ended == []
    assert sim.release("a", 9).ended == ["a"]
    assert sim.release("a", 9).ended == []  # the repeat ends nothing
    sim.advance(seconds=VALIDITY_SECONDS + 1)
    step = sim.tick()
    assert step.ended == ["b"]
    assert step.calls == ([sim.machine.call("b")] if events else [])


def test_release_total_is_cost_of_total_not_sum_of_pieces() -> None:
    """19.66 đ/s over three 20 s renewals: 1,180 đ once, not 3 x 394 đ."""
    w = new_sim((VND_19_66,))
    w.open_account(balance=10_000)
    granted(w.reserve("c", requested_seconds=20))
    for sequence, used in enumerate((20, 40), start=1):
        granted(w.renew("c", sequence, used, 20))
    assert released(w.release("c", 60)).charged == 1_180


# ----------------------------------------------------------------------- expiry


def test_call_expires_after_validity(sim: Sim) -> None:
    sim.open_account(balance=1_000)
    granted(sim.reserve("c"))
    sim.advance(ms=VALIDITY_MS)  # the last instant of validity: still alive
    step = sim.tick()
    assert (step.outcome, step.changed) == (TickResult(expired=0, forgotten=0), False)
    sim.advance(ms=1)
    step = sim.tick()
    assert (step.outcome, step.changed) == (TickResult(expired=1, forgotten=0), True)
    now = T0_MS + VALIDITY_MS + 1
    assert step.entries == [
        LedgerEntry(
            entry_id=step.entries[0].entry_id,
            account_id="A",
            kind=EntryKind.EXPIRY_CHARGE,
            amount=-60,
            balance_after=940,
            call_id="c",
            reference="",
            idempotency_key="",
            created_at_ms=now,
        )
    ]
    record = sim.call("c")
    assert (record.state, record.charged, record.held, record.ended_at_ms) == (
        CallState.EXPIRED,
        60,
        0,
        now,
    )
    assert step.calls == [record]
    view = sim.view()
    assert (view.balance, view.reserved, view.available, view.active_calls) == (940, 0, 940, 0)


@pytest.mark.parametrize(
    ("command", "outcome_reason"),
    [
        pytest.param(Tick(RETENTION_MS), None, id="tick"),
        pytest.param(TopUp("A", 5, "k", ""), None, id="top-up"),
        pytest.param(reserve("other"), None, id="another-reserve"),
        pytest.param(renew("c", 1, 10), Reason.CALL_ALREADY_ENDED, id="late-renew"),
        pytest.param(reserve("c"), Reason.CALL_ALREADY_ENDED, id="reserve-repeat"),
        pytest.param(TopUp("A", 0, "k", ""), Reason.INVALID_ARGUMENT, id="refused-command"),
    ],
)
def test_any_command_after_the_deadline_expires_the_call(
    sim: Sim, command: Tick | TopUp | Reserve, outcome_reason: Reason | None
) -> None:
    """Expiry is time passing: it happens before the command, whatever the command."""
    sim.open_account(balance=1_000)
    granted(sim.reserve("c"))
    sim.advance(ms=VALIDITY_MS + 1)
    step = sim.apply(command)
    if outcome_reason is not None:
        assert refusal(step).reason is outcome_reason
    assert step.changed
    assert (step.entries[0].kind, step.entries[0].amount) == (EntryKind.EXPIRY_CHARGE, -60)
    assert sim.call("c").state is CallState.EXPIRED


@pytest.mark.parametrize(
    ("rates", "requested", "charged"),
    [
        pytest.param((PER_SECOND_60_60,), 90, 120, id="60/60-cost-of-allowed-90s"),
        pytest.param((VND_19_66,), 59, 1_160, id="19.66-59s"),
        pytest.param((FEE_500,), 10, 510, id="connect-fee"),
        pytest.param((rate(price=0),), 60, 0, id="free"),
    ],
)
def test_expiry_charges_cost_of_allowed(
    rates: tuple[Rate, ...], requested: int, charged: int
) -> None:
    w = new_sim(rates)
    w.open_account(balance=10_000)
    granted(w.reserve("c", requested_seconds=requested))
    w.advance(ms=VALIDITY_MS + 1)
    step = w.tick()
    assert [(e.kind, e.amount) for e in step.entries] == (
        [(EntryKind.EXPIRY_CHARGE, -charged)] if charged else []
    )
    assert (w.call("c").charged, w.view().balance) == (charged, 10_000 - charged)


def test_renew_moves_the_deadline(sim: Sim) -> None:
    sim.open_account(balance=1_000)
    granted(sim.reserve("c"))
    sim.advance(100)
    assert granted(sim.renew("c", 1, 90)) == grant("c", 150, False, 150)
    sim.advance(ms=VALIDITY_MS)
    assert sim.tick().outcome == TickResult(expired=0, forgotten=0)
    sim.advance(ms=1)
    assert sim.tick().outcome == TickResult(expired=1, forgotten=0)
    assert (sim.call("c").charged, sim.view().balance) == (150, 850)


@pytest.fixture
def expired(sim: Sim) -> Sim:
    """Account A (1,000) whose call "c" (renewed at 10 s, 70 s allowed) expired."""
    sim.open_account(balance=1_000)
    granted(sim.reserve("c"))
    granted(sim.renew("c", 1, 10))
    sim.advance(ms=VALIDITY_MS + 1)
    assert sim.tick().outcome == TickResult(expired=1, forgotten=0)
    assert sim.view().balance == 930
    return sim


@pytest.mark.parametrize(
    ("used", "expected"),
    [
        pytest.param(10, (10, 0, 60, 990), id="as-last-reported"),
        pytest.param(20, (20, 0, 50, 980), id="within-allowed"),
        pytest.param(70, (70, 0, 0, 930), id="all-allowed"),
        pytest.param(100, (70, 30, 0, 930), id="overrun-never-above-charged"),
    ],
)
def test_late_release_re_rates_and_refunds(
    expired: Sim, used: int, expected: tuple[int, int, int, int]
) -> None:
    charged, shortfall, refund, balance = expected
    expired.advance(3_600)
    step = expired.release("c", used)
    assert released(step) == ReleaseResult("c", used, used, charged, shortfall, balance)
    assert step.changed
    assert [(e.kind, e.amount, e.call_id) for e in step.entries] == (
        [(EntryKind.REFUND, refund, "c")] if refund else []
    )
    record = expired.call("c")
    assert (record.state, record.used_seconds, record.charged, record.shortfall) == (
        CallState.EXPIRED,
        used,
        charged,
        shortfall,
    )
    # A repeat is answered from memory; a different report is refused.
    repeat = expired.release("c", used)
    assert (released(repeat), repeat.changed) == (released(step), False)
    expired.refuse(Release("c", used + 1), Reason.CALL_ALREADY_ENDED)
    expired.refuse(renew("c", 2, used), Reason.CALL_ALREADY_ENDED)
    assert expired.view().balance == balance


def test_late_release_below_last_report_is_invalid(expired: Sim) -> None:
    expired.refuse(Release("c", 9), Reason.INVALID_ARGUMENT)


def test_late_release_after_the_window_is_call_not_found(expired: Sim) -> None:
    expired.advance(ms=RETENTION_MS)
    # The call, and the key of the top-up that funded the account at T0.
    assert expired.tick().outcome == TickResult(expired=0, forgotten=2)
    assert expired.machine.call("c") is None
    expired.refuse(Release("c", 10), Reason.CALL_NOT_FOUND)
    expired.refuse(renew("c", 2, 10), Reason.CALL_NOT_FOUND)


def test_ended_calls_are_forgotten_after_retention(sim: Sim) -> None:
    sim.open_account(balance=1_000)
    granted(sim.reserve("done"))
    released(sim.release("done", 5))  # ended at T0
    sim.advance(ms=RETENTION_MS - 60_000)
    granted(sim.reserve("open"))
    sim.advance(ms=60_000 - 1)
    assert sim.tick().outcome == TickResult(expired=0, forgotten=0)
    step = sim.release("done", 5)
    assert (released(step).charged, step.changed) == (5, False)
    sim.advance(ms=1)
    # "done" and the top-up key of T0; open calls are never forgotten.
    assert sim.tick().outcome == TickResult(expired=0, forgotten=2)
    assert sim.machine.call("done") is None
    assert sim.call("open").state is CallState.ACTIVE
    sim.refuse(Release("done", 5), Reason.CALL_NOT_FOUND)
    sim.refuse(renew("done", 1, 5), Reason.CALL_NOT_FOUND)


# --------------------------------------------------------------------- re-grant


def two_final_calls() -> Sim:
    """Account A with 100: c1 (older) used 30 of 60, final; c2 got 40 of 60, final."""
    w = new_sim()
    w.open_account(balance=100)
    assert granted(w.reserve("c1")) == grant("c1", 60, False, 60)
    assert granted(w.reserve("c2")) == grant("c2", 40, True, 40)
    w.advance(30)
    assert granted(w.renew("c1", 1, 30)) == grant("c1", 60, True, 60)
    w.advance(10)
    return w


def top_up(amount: int) -> Callable[[Sim], object]:
    return lambda w: w.apply(TopUp("A", amount, f"t{amount}", ""))


def resume_after_top_up(w: Sim) -> object:
    w.suspend()
    w.apply(TopUp("A", 50, "t", ""))  # no re-grant while suspended
    assert [p for p in w.pushes if isinstance(p, GrantPush)] == []
    return w.resume()


@pytest.mark.parametrize(
    ("trigger", "pushed"),
    [
        pytest.param(top_up(50), [("c1", 90, False, 90), ("c2", 60, False, 60)], id="top-up"),
        pytest.param(top_up(30), [("c1", 90, False, 90)], id="top-up-oldest-first"),
        pytest.param(top_up(20), [("c1", 80, True, 80)], id="top-up-partial"),
        pytest.param(
            lambda w: w.apply(Adjust("A", 50, "a", "")),
            [("c1", 90, False, 90), ("c2", 60, False, 60)],
            id="positive-adjust",
        ),
        pytest.param(
            lambda w: w.apply(UpdateAccount("A", credit_limit=50)),
            [("c1", 90, False, 90), ("c2", 60, False, 60)],
            id="credit-limit-raise",
        ),
        pytest.param(
            lambda w: w.apply(Release("c1", 30)), [("c2", 60, False, 60)], id="other-release"
        ),
        pytest.param(
            resume_after_top_up,
            [("c1", 90, False, 90), ("c2", 60, False, 60)],
            id="resume",
        ),
        pytest.param(lambda w: w.apply(Adjust("A", -1, "a", "")), [], id="negative-adjust"),
        pytest.param(lambda w: w.apply(UpdateAccount("A", credit_limit=0)), [], id="same-limit"),
    ],
)
def test_regrant_extends_final_grants_oldest_first(
    trigger: Callable[[Sim], object], pushed: list[tuple[str, int, bool, int]]
) -> None:
    w = two_final_calls()
    before = {c: w.call(c) for c in ("c1", "c2")}
    w.pushes.clear()
    trigger(w)
    grants = [p.grant for p in w.pushes if isinstance(p, GrantPush)]
    assert grants == [grant(c, allowed, final, held) for c, allowed, final, held in pushed]
    for call_id in ("c1", "c2"):
        if call_id in {c for c, *_ in pushed}:  # a re-grant resets validity
            record = w.call(call_id)
            assert record.expires_at_ms == w.now_ms + VALIDITY_MS
            assert (record.allowed_seconds, record.held) == next(
                (a, h) for c, a, _, h in pushed if c == call_id
            )
        elif w.call(call_id).state is CallState.ACTIVE:
            assert w.call(call_id).expires_at_ms == before[call_id].expires_at_ms
            assert w.call(call_id).allowed_seconds == before[call_id].allowed_seconds


def test_regrant_step_records_the_calls_it_pushed() -> None:
    w = two_final_calls()
    step = w.apply(TopUp("A", 30, "t", ""))
    assert [r.call_id for r in step.calls] == ["c1"]
    assert step.pushes == [GrantPush(grant("c1", 90, False, 90))]
    assert step.calls[0].expires_at_ms == w.now_ms + VALIDITY_MS


def test_late_release_refund_regrants() -> None:
    w = new_sim()
    w.open_account(balance=100)
    granted(w.reserve("c1"))
    w.advance(100)
    assert granted(w.reserve("c2")) == grant("c2", 40, True, 40)
    w.advance(ms=20_001)
    assert w.tick().outcome == TickResult(expired=1, forgotten=0)  # c1: charged 60
    assert w.view().available == 0
    step = w.release("c1", 10)
    assert released(step) == ReleaseResult("c1", 10, 10, 10, 0, 90)
    assert step.pushes == [GrantPush(grant("c2", 60, False, 60))]
    assert w.view().available == 30


def test_expiry_does_not_change_available() -> None:
    """The expiry charge is the hold it frees: nothing to re-grant."""
    w = two_final_calls()
    w.advance(ms=VALIDITY_MS - 40_000 + 1)  # now T0 + 120.001 s: c2 (reserved at T0) is due
    step = w.tick()
    assert step.outcome == TickResult(expired=1, forgotten=0)
    assert step.pushes == []
    assert w.call("c2").state is CallState.EXPIRED
    assert w.view().available == 0


# ---------------------------------------------------------------------- suspend


def test_suspend_terminates_refuses_and_gives_no_time(sim: Sim) -> None:
    sim.open_account(balance=1_000)
    granted(sim.reserve("c1"))
    granted(sim.reserve("c2"))
    granted(sim.renew("c1", 1, 10))
    step = sim.suspend()
    assert step.changed
    assert account_of(step).status is AccountStatus.SUSPENDED
    assert step.pushes == [
        Termination("c1", "ACCOUNT_SUSPENDED"),
        Termination("c2", "ACCOUNT_SUSPENDED"),
    ]
    assert sorted(r.call_id for r in step.calls) == ["c1", "c2"]
    assert [(r.state, r.final) for r in step.calls] == [(CallState.ACTIVE, True)] * 2
    sim.refuse(reserve("c3"), Reason.ACCOUNT_SUSPENDED)
    sim.advance(20)
    assert granted(sim.renew("c1", 2, 20)) == grant("c1", 70, True, 70)
    assert granted(sim.renew("c2", 1, 0)) == grant("c2", 60, True, 60)
    assert sim.call("c2").expires_at_ms == sim.now_ms + VALIDITY_MS  # still a renewal
    again = sim.suspend()
    assert (again.changed, again.pushes) == (False, [])
    step = sim.release("c1", 20)
    assert released(step) == ReleaseResult("c1", 20, 20, 20, 0, 980)
    assert step.pushes == []  # no re-grant while suspended
    account_of(sim.apply(TopUp("A", 10, "t", "")))  # money may still come in
    sim.advance(ms=VALIDITY_MS + 1)
    assert sim.tick().outcome == TickResult(expired=1, forgotten=0)
    assert sim.view().balance == 930


def test_resume_regrants_calls_renewed_while_suspended(sim: Sim) -> None:
    sim.open_account(balance=1_000)
    granted(sim.reserve("c"))
    sim.suspend()
    sim.advance(30)
    assert granted(sim.renew("c", 1, 30)) == grant("c", 60, True, 60)
    sim.advance(5)
    step = sim.resume()
    assert account_of(step).status is AccountStatus.ACTIVE
    assert step.pushes == [GrantPush(grant("c", 90, False, 90))]
    assert sim.call("c").expires_at_ms == sim.now_ms + VALIDITY_MS
    granted(sim.reserve("c2"))


@pytest.mark.parametrize(
    ("rates", "requested", "used", "regranted"),
    [
        pytest.param((rate(),), 0, 0, (60, False, 60), id="final-lifted"),
        # 60/60: a 30 s grant holds a paid minute; used 20 + g 30 = 50 s fit in it.
        pytest.param((PER_SECOND_60_60,), 30, 20, (50, False, 60), id="paid-increment"),
        pytest.param((PER_SECOND_60_60,), 30, 40, (60, True, 60), id="paid-increment-cut"),
    ],
)
def test_resume_with_nothing_available_regrants(
    rates: tuple[Rate, ...], requested: int, used: int, regranted: tuple[int, bool, int]
) -> None:
    """Resume re-grants as a Renew would, even with available == 0: the status cut the
    grants, not funds (DESIGN: final = allowed < used + g). Fixed in _regrant."""
    w = new_sim(rates)
    w.open_account(balance=60)
    first = granted(w.reserve("c", requested_seconds=requested))
    assert (first.final, first.held, w.view().available) == (False, 60, 0)
    w.suspend()
    w.advance(used)
    if used:
        assert granted(w.renew("c", 1, used, requested)).final
    assert w.call("c").final
    w.advance(1)
    step = w.resume()
    allowed, final, held = regranted
    assert step.pushes == [GrantPush(grant("c", allowed, final, held))]
    assert w.call("c").expires_at_ms == w.now_ms + VALIDITY_MS
    assert granted(w.apply(reserve("c", requested_seconds=requested))) == grant(
        "c", allowed, final, held
    )


# ------------------------------------------------------------------------ close


def test_close_needs_no_open_calls_then_refuses_every_change(sim: Sim) -> None:
    sim.open_account(balance=100)
    sim.put_tariff(tariff_id="V")
    granted(sim.reserve("c"))
    close = UpdateAccount("A", status=AccountStatus.CLOSED)
    sim.refuse(close, Reason.ACCOUNT_HAS_OPEN_CALLS)
    sim.suspend()
    sim.refuse(close, Reason.ACCOUNT_HAS_OPEN_CALLS)
    released(sim.release("c", 10))
    view = account_of(sim.apply(close))
    assert (view.status, view.balance, view.active_calls) == (AccountStatus.CLOSED, 90, 0)
    for command in (
        TopUp("A", 10, "new", ""),
        Adjust("A", -10, "new", ""),
        Adjust("A", 10, "new", ""),
        UpdateAccount("A", status=AccountStatus.ACTIVE),
        UpdateAccount("A", status=AccountStatus.SUSPENDED),
        UpdateAccount("A", status=AccountStatus.CLOSED),
        UpdateAccount("A", credit_limit=10),
        UpdateAccount("A", tariff_id="V"),
        UpdateAccount("A", max_concurrent_calls=3),
        reserve("c2"),
    ):
        sim.refuse(command, Reason.ACCOUNT_CLOSED)
    assert sim.view() == view  # reads still work
    assert sim.call("c").charged == 10
    assert sim.machine.open_calls("A") == []


def test_closed_account_answers_repeats_of_earlier_requests(sim: Sim) -> None:
    """The code answers a repeat (same key, same fields) before the closed check."""
    sim.open_account()
    first = account_of(sim.apply(TopUp("A", 100, "k", "ref")))
    sim.update(UpdateAccount("A", status=AccountStatus.CLOSED))
    step = sim.apply(TopUp("A", 100, "k", "ref"))
    assert (account_of(step), step.changed) == (first, False)


def test_late_release_on_closed_account_is_refused(expired: Sim) -> None:
    """The code: a refund is a change, and a closed account takes none (see report)."""
    expired.update(UpdateAccount("A", status=AccountStatus.CLOSED))
    expired.refuse(Release("c", 10), Reason.ACCOUNT_CLOSED)


# ------------------------------------------------------------------------- time


def test_time_going_back_is_a_bug(sim: Sim) -> None:
    sim.open_account(balance=100)
    sim.advance(ms=5)
    sim.top_up(1)
    before = state_of(sim.machine)
    with pytest.raises(InvariantViolation):
        sim.machine.apply(Tick(RETENTION_MS), sim.now_ms - 1)
    assert state_of(sim.machine) == before
    assert sim.machine.now_ms == sim.now_ms
    sim.top_up(1)  # the same instant again is fine


def test_expiry_is_bounded_per_step_yet_no_overdue_call_is_answered_active() -> None:
    """Past MAX_EXPIRIES_PER_STEP due calls wait for the next step; a request about one
    of them expires it first. (Reserve repeats did not: fixed in _reserve.)"""
    w = Sim(check_every_step=False)
    w.put_tariff()
    w.open_account(balance=10**9)
    count = MAX_EXPIRIES_PER_STEP + 2
    for i in range(count):
        w.reserve(f"c{i}")
    w.advance(ms=VALIDITY_MS + 1)
    last = f"c{count - 1}"
    step = w.apply(reserve(last))
    assert refusal(step).reason is Reason.CALL_ALREADY_ENDED
    assert len(step.entries) == MAX_EXPIRIES_PER_STEP + 1
    assert w.call(last).state is CallState.EXPIRED
    assert w.call(f"c{count - 2}").state is CallState.ACTIVE  # not reached yet
    assert w.tick().outcome == TickResult(expired=1, forgotten=0)
    assert (w.view().balance, w.view().reserved) == (10**9 - 60 * count, 0)
    w.check()


def test_renewing_far_more_often_than_validity_keeps_the_expiry_heap_bounded(sim: Sim) -> None:
    sim.put_tariff([rate(price=60_000_000)])
    sim.open_account("A", balance=10**9)
    sim.reserve("c1")
    for sequence in range(1, 20_001):
        sim.apply(renew("c1", sequence, 0))
    assert len(sim.machine._expiries) <= 2 * len(sim.machine.calls) + STALE_EXPIRIES_SLACK
    sim.advance(seconds=121)
    sim.tick()
    assert sim.call("c1").state is CallState.EXPIRED
