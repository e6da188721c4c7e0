"""The shortcuts the hot path takes answer exactly as the plain rules do, and the
per-step invariant check stops a broken step.

- validation: `is_valid(c)` is `not violations(c)`;
- rating: `affordable()` is (max_affordable_seconds, cost of it), `cost()` the formula;
- the `new_*` functions build the value the class's constructor builds;
- `Tariff.rate_for` is the longest matching prefix, whatever lengths the prefixes have;
- the expiry heap: a renewal that shortens the validity still expires on time;
- `_check_step`: a step that breaks `available >= 0` or moves money without (or
  beyond) its ledger entry raises InvariantViolation.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from callcredit_server.core import (
    CallRecord,
    CallState,
    EntryKind,
    Grant,
    GrantResult,
    InvariantViolation,
    LedgerEntry,
    Rate,
    Reason,
    ReleaseOutcome,
    ReleaseResult,
    StateMachine,
    Tariff,
    TickResult,
    cost,
    max_affordable_seconds,
)
from callcredit_server.core.commands import Command, Release, Renew, Reserve
from callcredit_server.core.model import (
    Account,
    Call,
    new_grant,
    new_ledger_entry,
    new_release_result,
)
from callcredit_server.core.outcomes import grant_result, release_outcome
from callcredit_server.core.rating import MICROS_PER_MINUTE, affordable
from callcredit_server.core.validation import is_valid, violations

from .helpers import DESTINATION, T0_MS, VALIDITY_SECONDS, Sim, granted, rate, refusal
from .test_properties import OP_CODES, command_of, decode, two_accounts
from .test_validation import LIMITS

# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(("command", "fields"), LIMITS)
def test_is_valid_agrees_with_violations_on_every_limit(
    command: Command, fields: tuple[str, ...]
) -> None:
    assert is_valid(command) == (violations(command) == [])
    assert is_valid(command) == (not fields)


def _odd_commands() -> list[Command]:
    """Hot-path commands with each field just inside and just outside its limits."""
    ids = ["c", "a" * 128, "a" * 129, "", "a b", "é", "x\n"]
    destinations = ["1", "+84901234567", "+", "", "1" * 32, "1" * 33, "++1", "84a", "\uff18"]
    numbers = [-1, 0, 1, 86_400, 86_401, 2**63 - 1, 2**63]
    out: list[Command] = []
    for text in ids:
        out.append(Reserve(text, "A", "84", 0, 60, 120))
        out.append(Reserve("c", text, "84", 0, 60, 120))
        out.append(Renew(text, 1, 0, 0, 60, 120))
        out.append(Release(text, 0))
    for destination in destinations:
        out.append(Reserve("c", "A", destination, 0, 60, 120))
    for n in numbers:
        out.append(Reserve("c", "A", "84", n, 60, 120))
        out.append(Renew("c", n, 0, 0, 60, 120))
        out.append(Renew("c", 1, n, 0, 60, 120))
        out.append(Renew("c", 1, 0, n, 60, 120))
        out.append(Release("c", n))
    return out


@pytest.mark.parametrize("command", _odd_commands())
def test_is_valid_agrees_with_violations_on_hot_commands(command: Command) -> None:
    assert is_valid(command) == (violations(command) == [])


def test_is_valid_agrees_with_violations_on_generated_commands() -> None:
    rng = random.Random(4)
    sim = two_accounts(rate(), rate(), 100, 100)
    for _ in range(2_000):
        command = command_of(decode(rng.randrange(OP_CODES)), sim.machine)
        if not isinstance(command, int):
            assert is_valid(command) == (violations(command) == []), command


# ---------------------------------------------------------------------- rating


def _reference_cost(r: Rate, seconds: int) -> int:
    """docs/design.md, Money, written out without any shortcut."""
    if seconds == 0:
        return 0
    first, step = r.first_increment_seconds, r.next_increment_seconds
    rest = max(0, seconds - first)
    billed = first + (rest + step - 1) // step * step
    price = billed * r.price_per_minute_micros
    return r.connect_fee + (price + MICROS_PER_MINUTE - 1) // MICROS_PER_MINUTE


def _any_rate(rng: random.Random) -> Rate:
    return rate(
        price=rng.choice((0, 1, 999_999, 60_000_000, 1_179_600_000, rng.randrange(10**12))),
        first=rng.choice((1, 6, 30, 60, rng.randrange(1, 3_601))),
        step=rng.choice((1, 6, 60, rng.randrange(1, 3_601))),
        fee=rng.choice((0, 10, rng.randrange(10**9))),
    )


def test_cost_is_the_formula() -> None:
    rng = random.Random(1)
    for _ in range(3_000):
        r = _any_rate(rng)
        seconds = rng.choice((0, 1, 59, 60, 61, rng.randrange(86_401)))
        assert cost(r, seconds) == _reference_cost(r, seconds), (r, seconds)


def test_affordable_is_the_largest_duration_that_fits_and_its_cost() -> None:
    rng = random.Random(2)
    for _ in range(300):
        r = _any_rate(rng)
        limit = rng.choice((0, 1, 60, rng.randrange(601)))
        budget = rng.choice((-1, 0, cost(r, 1), cost(r, limit), rng.randrange(10**6)))
        seconds, held = affordable(r, limit, budget)
        fitting = [s for s in range(1, limit + 1) if _reference_cost(r, s) <= budget]
        expected = max(fitting, default=0)
        assert seconds == expected == max_affordable_seconds(r, limit, budget)
        assert held == _reference_cost(r, seconds)


# ---------------------------------------------------------------- constructors


def test_new_functions_build_what_the_classes_build() -> None:
    r = rate("84", fee=3)
    assert new_grant("c", 60, True, 120, 7) == Grant("c", 60, True, 120, 7)
    assert new_release_result("c", 1, 2, 3, 4, 5) == ReleaseResult("c", 1, 2, 3, 4, 5)
    grant, result = Grant("c", 60, True, 120, 7), ReleaseResult("c", 1, 2, 3, 4, 5)
    assert grant_result(grant) == GrantResult(grant)
    assert type(grant_result(grant)) is GrantResult
    assert release_outcome(result) == ReleaseOutcome(result)
    assert type(release_outcome(result)) is ReleaseOutcome
    assert new_ledger_entry(9, "A", EntryKind.REFUND, 5, 10, "c", "r", "k", T0_MS) == LedgerEntry(
        9, "A", EntryKind.REFUND, 5, 10, "c", "r", "k", T0_MS
    )
    call = Call("c", 3, "A", "84", 0, r, 60, 120, T0_MS, T0_MS + 1, CallState.ACTIVE, 60, 5, 60)
    record = call.record()
    assert record == CallRecord(
        "c", 3, "A", "84", CallState.ACTIVE, 60, 5, 60, 0, 0, r, T0_MS, None, False, T0_MS + 1, 0
    )
    assert type(record) is CallRecord
    with pytest.raises(AttributeError):
        record.held = 1  # type: ignore[misc]  # immutable


# --------------------------------------------------------------------- tariffs


def test_rate_for_is_the_longest_matching_prefix() -> None:
    rng = random.Random(3)
    for _ in range(200):
        prefixes = {"".join(rng.choice("0123489") for _ in range(rng.randrange(17)))}
        prefixes |= {
            "".join(rng.choice("0123489") for _ in range(rng.randrange(1, 9))) for _ in range(20)
        }
        tariff = Tariff("T", "VND", tuple(rate(p) for p in sorted(prefixes)))
        for _ in range(20):
            destination = "".join(rng.choice("0123489") for _ in range(rng.randrange(1, 20)))
            matching = [p for p in prefixes if destination.startswith(p)]
            expected = max(matching, key=len, default=None)
            found = tariff.rate_for(destination)
            assert (None if found is None else found.prefix) == expected, destination


# ------------------------------------------------------------------ expiry heap


def test_a_renewal_with_a_shorter_validity_expires_at_the_new_deadline(sim: Sim) -> None:
    sim.open_account(balance=10**6)
    granted(sim.reserve("c"))
    sim.advance(seconds=10)
    short = Renew("c", 1, 5, 0, 60, 30)  # a restarted server with --validity-seconds 30
    granted(sim.apply(short))
    sim.advance(seconds=30)  # the last instant of the new validity
    assert sim.tick().outcome == TickResult(expired=0, forgotten=0)
    sim.advance(ms=1)
    assert sim.tick().outcome == TickResult(expired=1, forgotten=0)
    assert sim.call("c").state is CallState.EXPIRED


def test_renewed_calls_expire_in_deadline_order(sim: Sim) -> None:
    """c1 reserved first but renewed later than c2: c2 expires (is charged) first."""
    sim.open_account(balance=10**6)
    granted(sim.reserve("c1"))
    granted(sim.reserve("c2"))
    sim.advance(seconds=1)
    granted(sim.renew("c2", 1, 1))
    sim.advance(seconds=1)
    granted(sim.renew("c1", 1, 2))
    sim.advance(seconds=VALIDITY_SECONDS + 1)
    step = sim.tick()
    assert [e.call_id for e in step.entries] == ["c2", "c1"]


# ------------------------------------------------------------ the step checks


class _Broken(StateMachine):
    """A machine whose bug shows only once `broken` is set (after the setup)."""

    broken = False


class _OverReserves(_Broken):
    """A bug: a renewal holds more than the account has."""

    def _extend(self, account: Account, call: Call) -> None:
        super()._extend(account, call)
        if self.broken:
            account.reserved += account.available + 1


class _LosesTheLedgerTotal(_Broken):
    """A bug: an entry is posted but the ledger total is not moved."""

    def _post(self, account: Account, kind: EntryKind, amount: int, *args: Any, **kw: Any) -> None:
        total = self.ledger_total
        super()._post(account, kind, amount, *args, **kw)
        if self.broken:
            self.ledger_total = total


class _ChargesBesideTheLedger(_Broken):
    """A bug: a charge takes one more unit than its entry says."""

    def _post(self, account: Account, kind: EntryKind, amount: int, *args: Any, **kw: Any) -> None:
        super()._post(account, kind, amount, *args, **kw)
        if self.broken:
            account.balance -= 1


class _ChargesWithoutAnEntry(_Broken):
    """A bug: a free release still takes a unit, and posts nothing."""

    def _close(self, account: Account, call: Call, state: CallState) -> None:
        super()._close(account, call, state)
        if self.broken:
            account.balance -= 1


def _with_a_call(machine: _Broken) -> _Broken:
    sim = Sim()
    sim.machine = machine
    sim.put_tariff()
    sim.open_account(balance=100)
    granted(sim.reserve("c"))
    return machine


@pytest.mark.parametrize(
    ("machine", "command", "finding"),
    [
        pytest.param(_OverReserves(), Renew("c", 1, 1, 0, 60, 120), "available -1", id="over"),
        pytest.param(_LosesTheLedgerTotal(), Release("c", 10), "ledger total", id="total"),
        pytest.param(_ChargesBesideTheLedger(), Release("c", 10), "account A moved", id="more"),
        pytest.param(_ChargesWithoutAnEntry(), Release("c", 0), "account A moved", id="no-entry"),
    ],
)
def test_a_broken_step_is_stopped(machine: _Broken, command: Command, finding: str) -> None:
    _with_a_call(machine)
    machine.broken = True
    with pytest.raises(InvariantViolation, match=finding):
        machine.apply(command, T0_MS + 1_000)


def test_the_same_steps_pass_unbroken() -> None:
    machine = _with_a_call(_Broken())
    granted_step = machine.apply(Renew("c", 1, 1, 0, 60, 120), T0_MS + 1_000)
    assert granted_step.changed
    released = machine.apply(Release("c", 10), T0_MS + 2_000)
    assert [e.amount for e in released.entries] == [-10]
    assert machine.audit() == []


def test_a_refusal_touches_nothing(sim: Sim) -> None:
    sim.open_account(balance=0)
    assert refusal(sim.reserve("c", destination=DESTINATION)).reason is Reason.INSUFFICIENT_FUNDS
    assert sim.machine._accounts_touched == {}
