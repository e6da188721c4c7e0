"""A driver for state machine tests: a clock, the server's settings, invariant checks.

`Sim` applies commands the way the server loop will (time given, grant resolved from
the server settings) and checks after every step what must hold whatever the input:
`StateMachine.audit()` is empty, balances equal the sum of every entry handed out,
each entry's `balance_after` follows from the one before, and every open call's
`final` flag says exactly what docs/design.md says it says.
"""

from __future__ import annotations

import copy
import copyreg
import dataclasses
from collections.abc import Iterable
from typing import Any

from callcredit_server.core import (
    COMPILED,
    AccountResult,
    AccountStatus,
    AccountView,
    Adjust,
    CallRecord,
    Command,
    CreateAccount,
    Grant,
    GrantResult,
    LedgerEntry,
    Push,
    PutTariff,
    Rate,
    Reason,
    Refused,
    Release,
    ReleaseOutcome,
    ReleaseResult,
    Renew,
    Reserve,
    StateMachine,
    Step,
    Tariff,
    TariffResult,
    Tick,
    TopUp,
    UpdateAccount,
)
from callcredit_server.core.model import Call

T0_MS = 1_750_000_000_000  # any instant; tests move forward from here
DEFAULT_GRANT_SECONDS = 60  # --grant-seconds
MAX_GRANT_SECONDS = 600  # --max-grant-seconds
VALIDITY_SECONDS = 120  # --validity-seconds
RETENTION_MS = 24 * 3_600 * 1_000  # the idempotency / reconciliation window
PER_SECOND = 60_000_000  # price_per_minute_micros of exactly one minor unit per second
DESTINATION = "84901234567"

# Attributes of StateMachine that describe the step in progress, not the state; and
# the expiry heap, whose stale entries (of calls that renewed or ended) any step may
# drop: the deadlines that count are each open call's expires_at_ms.
_STEP_ATTRIBUTES = frozenset(
    {
        "now_ms",
        "_changed",
        "_entries",
        "_touched",
        "_pushes",
        "_events",
        "_ended_now",
        "_accounts_touched",
        "_balances_before",
        "_ledger_total_before",
        "_expired",
        "_expiries",
    }
)


def rate(
    prefix: str = "",
    price: int = PER_SECOND,
    first: int = 1,
    step: int = 1,
    fee: int = 0,
) -> Rate:
    """A rate; by default 1 minor unit per second, billed per second, no connect fee."""
    return Rate(
        prefix=prefix,
        price_per_minute_micros=price,
        first_increment_seconds=first,
        next_increment_seconds=step,
        connect_fee=fee,
    )


def resolve_grant_seconds(requested_seconds: int) -> int:
    """g = min(requested or --grant-seconds, --max-grant-seconds), as the server does."""
    return min(requested_seconds or DEFAULT_GRANT_SECONDS, MAX_GRANT_SECONDS)


def reserve(
    call_id: str, account_id: str = "A", destination: str = DESTINATION, requested_seconds: int = 0
) -> Reserve:
    return Reserve(
        call_id=call_id,
        account_id=account_id,
        destination=destination,
        requested_seconds=requested_seconds,
        grant_seconds=resolve_grant_seconds(requested_seconds),
        validity_seconds=VALIDITY_SECONDS,
    )


def renew(call_id: str, sequence: int, used_seconds: int, requested_seconds: int = 0) -> Renew:
    return Renew(
        call_id=call_id,
        sequence=sequence,
        used_seconds=used_seconds,
        requested_seconds=requested_seconds,
        grant_seconds=resolve_grant_seconds(requested_seconds),
        validity_seconds=VALIDITY_SECONDS,
    )


def _rebuilt(value: Any) -> tuple[type[Any], tuple[Any, ...]]:
    return type(value), tuple(getattr(value, f.name) for f in dataclasses.fields(value) if f.init)


# Compiled by mypyc, a frozen dataclass cannot be deep-copied field by field (its
# __setstate__ assigns them), nor can a Call (its compiled __init__ runs on creation
# and wants every field): state_of copies the ones the state holds by constructor.
if COMPILED:
    for built in (Rate, Tariff, Call):
        copyreg.pickle(built, _rebuilt)


def state_of(machine: StateMachine) -> dict[str, object]:
    """A deep copy of everything the machine remembers, to compare before and after."""
    # Compiled by mypyc, the machine's attributes are native fields that mypyc lists.
    names = getattr(StateMachine, "__mypyc_attrs__", ()) or vars(machine)
    kept = {k: getattr(machine, k) for k in names if k not in _STEP_ATTRIBUTES}
    return copy.deepcopy(kept)


def fingerprint_of(machine: StateMachine) -> tuple[object, ...]:
    """The state as comparable values: cheaper than state_of(), for generated runs.

    Calls hold only immutable values, so shallow copies are enough; an account is
    its numbers plus the ids of its open and final calls. Calls that ended at the
    same instant may be queued in either order (a snapshot rebuilds them by
    call_seq): they leave the window together, so the queue is compared sorted.
    """
    accounts = [
        (
            a.account_id,
            a.currency,
            a.tariff_id,
            a.status,
            a.credit_limit,
            a.max_concurrent_calls,
            a.balance,
            a.reserved,
            a.low_balance_threshold,
            a.low,
            a.burn_micros,
            tuple(a.open_calls),
            tuple(sorted(a.final_calls)),
        )
        for a in machine.accounts.values()
    ]
    return (
        accounts,
        [copy.copy(call) for call in machine.calls.values()],
        dict(machine.tariffs),
        dict(machine._keys),
        tuple(sorted(machine._ended)),
        tuple(machine._key_times),
        machine.last_entry_id,
        machine.last_call_seq,
        machine.ledger_total,
    )


def granted(step: Step) -> Grant:
    assert isinstance(step.outcome, GrantResult), step.outcome
    return step.outcome.grant


def released(step: Step) -> ReleaseResult:
    assert isinstance(step.outcome, ReleaseOutcome), step.outcome
    return step.outcome.result


def account_of(step: Step) -> AccountView:
    assert isinstance(step.outcome, AccountResult), step.outcome
    return step.outcome.account


def refusal(step: Step) -> Refused:
    assert isinstance(step.outcome, Refused), step.outcome
    return step.outcome


class Sim:
    """A StateMachine, a clock that only moves forward, and checks after every step."""

    def __init__(self, *, check_every_step: bool = True) -> None:
        self.machine = StateMachine()
        self.now_ms = T0_MS
        self.check_every_step = check_every_step
        self.entries: list[LedgerEntry] = []
        self.pushes: list[Push] = []
        self._keys = 0

    # -- time

    def advance(self, seconds: int = 0, ms: int = 0) -> None:
        self.now_ms += seconds * 1_000 + ms

    # -- applying

    def apply(self, command: Command) -> Step:
        step = self.machine.apply(command, self.now_ms)
        if not step.changed:
            assert step.entries == [] and step.pushes == [] and step.calls == []
            assert step.events == []
        self.entries.extend(step.entries)
        self.pushes.extend(step.pushes)
        if self.check_every_step:
            self.check()
        return step

    def refuse(self, command: Command, reason: Reason) -> Refused:
        """Apply a command that must be refused with `reason` and change nothing."""
        before = state_of(self.machine)
        views = {a: self.machine.account(a) for a in self.machine.accounts}
        step = self.apply(command)
        refused = refusal(step)
        assert refused.reason is reason, refused
        assert step.changed is False
        assert (step.entries, step.calls, step.pushes, step.events, step.ended) == ([],) * 5
        assert {a: self.machine.account(a) for a in self.machine.accounts} == views
        assert state_of(self.machine) == before
        return refused

    def check(self) -> None:
        """What holds after every step, whatever the input."""
        machine = self.machine
        assert machine.audit() == []
        assert sum(e.amount for e in self.entries) == machine.ledger_total
        running: dict[str, int] = {}
        last_id = 0
        for entry in self.entries:
            assert entry.entry_id > last_id
            last_id = entry.entry_id
            running[entry.account_id] = running.get(entry.account_id, 0) + entry.amount
            assert entry.balance_after == running[entry.account_id]
        for account in machine.accounts.values():
            assert account.balance == running.get(account.account_id, 0)
            assert account.available >= 0
            for call in account.open_calls.values():
                if account.status is AccountStatus.ACTIVE:
                    cut = call.allowed_seconds < call.used_seconds + call.grant_seconds
                    assert call.final == cut, call
                else:
                    assert call.final, call

    # -- admin

    def put_tariff(
        self, rates: Iterable[Rate] = (rate(),), tariff_id: str = "T", currency: str = "VND"
    ) -> Tariff:
        tariff = Tariff(tariff_id, currency, tuple(rates))
        step = self.apply(PutTariff(tariff))
        assert isinstance(step.outcome, TariffResult), step.outcome
        return step.outcome.tariff

    def open_account(
        self,
        account_id: str = "A",
        *,
        balance: int = 0,
        credit_limit: int = 0,
        cap: int = 0,
        tariff_id: str = "T",
        currency: str = "VND",
    ) -> AccountView:
        command = CreateAccount(account_id, currency, tariff_id, credit_limit, cap)
        view = account_of(self.apply(command))
        if balance:
            view = self.top_up(balance, account_id)
        return view

    def next_key(self) -> str:
        self._keys += 1
        return f"key-{self._keys}"

    def top_up(self, amount: int, account_id: str = "A") -> AccountView:
        return account_of(self.apply(TopUp(account_id, amount, self.next_key(), "test")))

    def adjust(self, amount: int, account_id: str = "A") -> AccountView:
        return account_of(self.apply(Adjust(account_id, amount, self.next_key(), "test")))

    def update(self, command: UpdateAccount) -> AccountView:
        return account_of(self.apply(command))

    def suspend(self, account_id: str = "A") -> Step:
        return self.apply(UpdateAccount(account_id, status=AccountStatus.SUSPENDED))

    def resume(self, account_id: str = "A") -> Step:
        return self.apply(UpdateAccount(account_id, status=AccountStatus.ACTIVE))

    def tick(self, retention_ms: int = RETENTION_MS) -> Step:
        return self.apply(Tick(retention_ms))

    # -- calls

    def reserve(
        self,
        call_id: str,
        account_id: str = "A",
        destination: str = DESTINATION,
        requested_seconds: int = 0,
    ) -> Step:
        return self.apply(reserve(call_id, account_id, destination, requested_seconds))

    def renew(
        self, call_id: str, sequence: int, used_seconds: int, requested_seconds: int = 0
    ) -> Step:
        return self.apply(renew(call_id, sequence, used_seconds, requested_seconds))

    def release(self, call_id: str, used_seconds: int) -> Step:
        return self.apply(Release(call_id, used_seconds))

    # -- reads

    def view(self, account_id: str = "A") -> AccountView:
        view = self.machine.account(account_id)
        assert view is not None
        return view

    def call(self, call_id: str) -> CallRecord:
        record = self.machine.call(call_id)
        assert record is not None
        return record
