"""Properties of rating and of the state machine over generated rates and command runs."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction

from hypothesis import given, settings
from hypothesis import strategies as st

from callcredit_server.core import (
    AccountStatus,
    Adjust,
    CallState,
    Command,
    EntryKind,
    GrantPush,
    GrantResult,
    Rate,
    Refused,
    Release,
    ReleaseOutcome,
    StateMachine,
    Tick,
    TopUp,
    UpdateAccount,
    billed_seconds,
    cost,
    max_affordable_seconds,
)

from .helpers import (
    MAX_GRANT_SECONDS,
    RETENTION_MS,
    VALIDITY_SECONDS,
    Sim,
    fingerprint_of,
    granted,
    rate,
    released,
    renew,
    reserve,
    resolve_grant_seconds,
)

any_rate = st.builds(
    rate,
    prefix=st.just(""),
    price=st.integers(0, 10**12),
    first=st.integers(1, 3_600),
    step=st.integers(1, 3_600),
    fee=st.integers(0, 10**9),
)
# Small enough that budgets fall between the costs of nearby durations.
small_rate = st.builds(
    rate,
    prefix=st.just(""),
    price=st.integers(0, 3 * 60_000_000),
    first=st.integers(1, 90),
    step=st.integers(1, 90),
    fee=st.integers(0, 50),
)


@given(any_rate, st.integers(0, 86_399))
def test_cost_never_decreases_with_seconds(r: Rate, seconds: int) -> None:
    assert billed_seconds(r, seconds) <= billed_seconds(r, seconds + 1)
    assert cost(r, seconds) <= cost(r, seconds + 1)
    assert billed_seconds(r, seconds) >= seconds


@given(any_rate, st.integers(0, 86_400))
def test_cost_matches_exact_arithmetic(r: Rate, seconds: int) -> None:
    """The integer formula equals docs/design.md's, computed with exact fractions."""
    if seconds == 0:
        assert cost(r, seconds) == 0
        return
    first, step = r.first_increment_seconds, r.next_increment_seconds
    billed = first + math.ceil(Fraction(max(0, seconds - first), step)) * step
    price = Fraction(billed * r.price_per_minute_micros, 60_000_000)
    assert billed_seconds(r, seconds) == billed
    assert cost(r, seconds) == r.connect_fee + math.ceil(price)


@given(small_rate, st.integers(0, 240), st.integers(0, 1_000))
def test_max_affordable_seconds_is_the_largest_fitting_duration(
    r: Rate, limit: int, budget: int
) -> None:
    brute = max(s for s in range(limit + 1) if s == 0 or cost(r, s) <= budget)
    assert max_affordable_seconds(r, limit, budget) == brute


@given(
    small_rate,
    st.integers(0, 2_000),
    st.integers(0, 500),
    st.lists(st.integers(0, 900), min_size=1, max_size=6),
)
def test_grant_never_exceeds_available(
    r: Rate, balance: int, credit_limit: int, requests: list[int]
) -> None:
    """Each reserve holds at most what is available, and exactly the largest fit."""
    w = Sim()
    w.put_tariff([r])
    w.open_account(balance=balance, credit_limit=credit_limit)
    for i, requested in enumerate(requests):
        available = w.view().available
        g = resolve_grant_seconds(requested)
        step = w.reserve(f"c{i}", requested_seconds=requested)
        if isinstance(step.outcome, Refused):
            assert cost(r, 1) > available
            assert w.view().available == available
            continue
        grant = granted(step)
        assert grant.held <= available
        assert grant.held == cost(r, grant.allowed_seconds)
        assert 1 <= grant.allowed_seconds <= g <= MAX_GRANT_SECONDS
        assert grant.allowed_seconds == g or cost(r, grant.allowed_seconds + 1) > available
        assert grant.final == (grant.allowed_seconds < g)
        assert w.view().available == available - grant.held


@given(
    small_rate,
    st.integers(0, 600),
    st.lists(st.tuples(st.integers(0, 400), st.integers(0, 700)), max_size=8),
    st.integers(0, 900),
)
def test_total_charged_is_cost_of_total_used_whatever_the_renewals(
    r: Rate, requested: int, renewals: list[tuple[int, int]], extra: int
) -> None:
    """With funds enough, the call is charged cost(used) once, and allowed tracks use."""
    w = Sim()
    w.put_tariff([r])
    w.open_account(balance=10**12)
    allowed = granted(w.reserve("c", requested_seconds=requested)).allowed_seconds
    assert allowed == resolve_grant_seconds(requested)
    used = 0
    for sequence, (more, asked) in enumerate(renewals, start=1):
        used = min(used + more, 86_400)
        w.advance(min(more, VALIDITY_SECONDS))  # renewing within validity
        grant = granted(w.renew("c", sequence, used, asked))
        allowed = max(allowed, used + resolve_grant_seconds(asked))
        assert (grant.allowed_seconds, grant.final) == (allowed, False)
        assert grant.held == cost(r, allowed)
    final_used = min(used + extra, allowed)
    result = released(w.release("c", final_used))
    assert (result.charged, result.shortfall) == (cost(r, final_used), 0)
    assert w.view().balance == 10**12 - cost(r, final_used)


@given(
    small_rate,
    st.integers(0, 300),
    st.lists(st.tuples(st.integers(0, 100), st.integers(0, 200)), max_size=6),
    st.integers(0, 1_000),
    st.booleans(),
)
def test_charged_plus_shortfall_is_cost_of_used_when_funds_run_short(
    r: Rate,
    balance: int,
    renewals: list[tuple[int, int]],
    used_at_release: int,
    expire_first: bool,
) -> None:
    """An overrun is charged as far as funds go; an expiry charges the allowance and a
    late release re-rates it down, never up."""
    w = Sim()
    w.put_tariff([r])
    w.open_account(balance=balance)
    step = w.reserve("c")
    if isinstance(step.outcome, Refused):
        return
    used = 0
    for sequence, (more, asked) in enumerate(renewals, start=1):
        used += more
        granted(w.renew("c", sequence, used, asked))
    used_at_release = max(used, used_at_release)
    record = w.call("c")
    if expire_first:
        w.advance(121)
        w.apply(Tick(RETENTION_MS))
        assert w.call("c").charged == cost(r, record.allowed_seconds) == record.held
    result = released(w.release("c", used_at_release))
    price = cost(r, used_at_release)
    assert result.charged + result.shortfall == price
    if expire_first:
        assert result.charged == min(price, record.held)
    else:
        assert result.charged == min(price, balance)
    assert w.view().balance == balance - result.charged


# ----------------------------------------------------- random command sequences


@dataclass(frozen=True)
class Op:
    """One generated command, read against the state it meets (see command_of)."""

    kind: str
    call: int
    account: int
    x: int
    y: int


KINDS = (
    *("reserve",) * 3,
    *("renew",) * 3,
    *("release",) * 2,
    "top_up",
    "adjust",
    "credit",
    "status",
    "tick",
    *("advance",) * 2,
)
REQUESTED = (0, 1, 7, 30, 60, 90, 600, 700)
STATUSES = (*(AccountStatus.ACTIVE,) * 4, *(AccountStatus.SUSPENDED,) * 3, AccountStatus.CLOSED)
ADVANCE_MS = (0, 1_000, 10_000, 60_000, 119_000, 120_001, 300_000, 3_600_000)
RETENTIONS_MS = (60_000, 600_000, RETENTION_MS)


def decode(n: int) -> Op:
    """One integer per Op: a single draw each keeps long runs cheap to generate."""
    n, kind = divmod(n, len(KINDS))
    n, call = divmod(n, 3)
    n, account = divmod(n, 2)
    n, y = divmod(n, 8)
    return Op(KINDS[kind], call, account, n % 1_000, y)


OP_CODES = len(KINDS) * 3 * 2 * 8 * 1_000
ops = st.integers(0, OP_CODES - 1).map(decode)


def command_of(op: Op, machine: StateMachine) -> Command | int:
    """The command an Op stands for, or milliseconds to let pass.

    Renew and Release usually continue what the call reported last (so they are
    accepted), and sometimes repeat, go back, or report less.
    """
    call_id = f"c{op.call}"
    account_id = f"A{op.account}"
    known = machine.calls.get(call_id)
    used = known.used_seconds if known else 0
    sequence = known.last_sequence if known else 0
    match op.kind:
        case "reserve":
            destination = "84901234567" if op.x % 3 else "+15551234567"
            return reserve(call_id, account_id, destination, REQUESTED[op.y])
        case "renew":
            if op.y == 7:
                return renew(call_id, sequence + 1, max(used - 1, 0))
            if op.y == 6:
                return renew(call_id, max(sequence - op.x % 2, 1), used + op.x % 60)
            return renew(call_id, sequence + 1, used + op.x % 150, REQUESTED[op.y])
        case "release":
            return Release(call_id, used + op.x % 200)
        case "top_up":
            return TopUp(account_id, op.x % 300 + 1, f"k{op.y % 4}", "")
        case "adjust":
            return Adjust(account_id, op.x % 600 - 300 or 1, f"k{op.y % 4}", "")
        case "credit":
            return UpdateAccount(account_id, credit_limit=op.x)
        case "status":
            return UpdateAccount(account_id, status=STATUSES[op.y])
        case "tick":
            return Tick(retention_ms=RETENTIONS_MS[op.y % 3])
        case _:
            return ADVANCE_MS[op.y]


def drive(w: Sim, run: list[Op]) -> None:
    """Apply a run with Sim.check() after every step (audit empty, balances == sum of
    the entries of every step, available >= 0, final flags as docs/design.md defines them),
    and check each answer against what the state was just before it."""
    for op in run:
        command = command_of(op, w.machine)
        if isinstance(command, int):
            w.advance(ms=command)
            continue
        before = fingerprint_of(w.machine)
        open_before = {
            call_id: (call.state, call.charged, call.held, w.machine.accounts[call.account_id])
            for call_id, call in w.machine.calls.items()
            if call.release is None
        }
        available_before = {a.account_id: a.available for a in w.machine.accounts.values()}
        step = w.apply(command)
        outcome = step.outcome
        if isinstance(outcome, Refused) and not step.changed:
            assert fingerprint_of(w.machine) == before
        grants = [push.grant for push in step.pushes if isinstance(push, GrantPush)]
        if isinstance(outcome, GrantResult):
            grants.append(outcome.grant)
        for grant in grants:
            rated = w.machine.calls[grant.call_id].rate
            assert grant.held == cost(rated, grant.allowed_seconds)
        if isinstance(outcome, ReleaseOutcome) and outcome.result.call_id in open_before:
            result = outcome.result
            price = cost(w.machine.calls[result.call_id].rate, result.used_seconds)
            assert result.charged + result.shortfall == price
            state, charged, held, account = open_before[result.call_id]
            if state is CallState.EXPIRED:  # re-rated down, never up
                assert result.charged == min(price, charged)
            elif not any(e.kind is EntryKind.EXPIRY_CHARGE for e in step.entries):
                budget = held + available_before[account.account_id]
                assert result.charged == min(price, budget)
    total = sum(a.balance for a in w.machine.accounts.values())
    assert total == sum(e.amount for e in w.entries) == w.machine.ledger_total


def two_accounts(default: Rate, mobile: Rate, balance_0: int, balance_1: int) -> Sim:
    w = Sim()
    w.put_tariff([default, Rate("84", *_fields(mobile))])
    w.open_account("A0", balance=balance_0)
    w.open_account("A1", balance=balance_1)
    return w


@settings(max_examples=150, deadline=None)
@given(
    small_rate,
    small_rate,
    st.integers(0, 600),
    st.integers(0, 600),
    st.lists(ops, min_size=10, max_size=50),
)
def test_money_is_conserved_over_any_command_sequence(
    default: Rate, mobile: Rate, balance_0: int, balance_1: int, run: list[Op]
) -> None:
    """Generated runs Hypothesis can shrink to a minimal failing one."""
    drive(two_accounts(default, mobile, balance_0, balance_1), run)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**64 - 1))
def test_money_is_conserved_over_seeded_runs(seed: int) -> None:
    """Uniform runs from a seed (Hypothesis prints the seed of a failure): they reach
    re-grants and late-release refunds far more often than shrinkable runs do."""
    rng = random.Random(seed)

    def any_rate() -> Rate:
        return rate(
            price=rng.randrange(3 * 60_000_000),
            first=rng.choice((1, 6, 30, 60)),
            step=rng.choice((1, 6, 60)),
            fee=rng.choice((0, 0, 10, 100)),
        )

    w = two_accounts(any_rate(), any_rate(), rng.randrange(400), rng.randrange(400))
    drive(w, [decode(rng.randrange(OP_CODES)) for _ in range(60)])


def _fields(r: Rate) -> tuple[int, int, int, int]:
    return (
        r.price_per_minute_micros,
        r.first_increment_seconds,
        r.next_increment_seconds,
        r.connect_fee,
    )
