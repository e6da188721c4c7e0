"""The balance state machine: every rule of docs/design.md, one command at a time.

`StateMachine.apply(command, now_ms)` is a function of (state, time, command).
Each handler runs all of its checks first, in the order docs/design.md gives, each
returning a named refusal; after the line marked `# -- commit point --` the
command must succeed, and only then does state change. A refused command changes
nothing (expiries that fell due before it are time passing, not the command).

`Step.changed` says whether the command must be journaled: replaying every
changed command at its time rebuilds the same state, because nothing here reads
a clock, a random source or the environment.
"""

from __future__ import annotations

import gc
import heapq
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, Final, NamedTuple

from mypy_extensions import mypyc_attr

from callcredit_server.core import image as image_format
from callcredit_server.core.commands import (
    Adjust,
    Command,
    CreateAccount,
    PutTariff,
    Release,
    Renew,
    Reserve,
    Takeover,
    Tick,
    TopUp,
    UpdateAccount,
)
from callcredit_server.core.events import Event, EventKind, new_event
from callcredit_server.core.model import (
    Account,
    AccountStatus,
    AccountView,
    Call,
    CallRecord,
    CallState,
    CurrencyTotals,
    EntryKind,
    KeyRecord,
    LedgerEntry,
    Rate,
    ReleaseResult,
    Tariff,
    _new,
    key_answer,
    new_key_record,
    new_ledger_entry,
    new_release_result,
)
from callcredit_server.core.outcomes import (
    AccountResult,
    GrantPush,
    Outcome,
    Push,
    Reason,
    Refused,
    TakeoverResult,
    TariffResult,
    Termination,
    TickResult,
    grant_result,
    release_outcome,
)
from callcredit_server.core.rating import affordable, billed_seconds, cost
from callcredit_server.core.validation import MAX_BALANCE, is_valid, violations

# Expiry is bounded work per step (TigerBeetle expires pending transfers in
# bounded batches too): a burst of due calls is spread over the next steps.
MAX_EXPIRIES_PER_STEP: Final = 10_000
# Stale deadlines (left by renewals) the expiry heap may hold beyond two per
# remembered call before it is rebuilt from the open calls.
STALE_EXPIRIES_SLACK: Final = 1_024


class InvariantViolation(Exception):
    """A bug: the state broke a rule that no input may break. The server must stop."""


class Step(NamedTuple):
    """What one command did: the answer, and what must be journaled and pushed."""

    outcome: Outcome
    changed: bool
    entries: list[LedgerEntry]
    calls: list[CallRecord]  # the calls it touched, as they are after it; empty if events are off
    pushes: list[Push]
    events: list[Event]  # in the order they happened; empty if the machine's events are off
    ended: list[str]  # the ids of the calls it ended (released or expired), events on or off


def _refuse(reason: Reason, message: str) -> Refused:
    return Refused(reason, message)


_Handler = Callable[["StateMachine", Any], Outcome]


# Compiled by mypyc, a class is closed to Python subclasses unless it says otherwise;
# the simulation and the tests inject bugs by overriding a handler.
@mypyc_attr(allow_interpreted_subclasses=True)
class StateMachine:
    """Accounts, tariffs and calls in memory, changed only through `apply`."""

    # Dispatch by the command's exact type: one dict lookup, where a match statement
    # tries the classes one by one. Built per class, so a subclass's override counts.
    _handlers: ClassVar[dict[type[Any], _Handler]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._handlers = _handlers_of(cls)

    def __init__(self, *, events: bool = True) -> None:
        # Build each step's history, its events (core/events.py) and the records of the
        # calls it touched? The changefeed's projector does; the primary's writer does
        # not (its steps' `events` and `calls` stay empty): the history is derived from
        # the journal off its path (projector.py). Set before any apply.
        self.events = events
        self.accounts: dict[str, Account] = {}
        self.tariffs: dict[str, Tariff] = {}
        # Open calls, and ended ones still within the reconciliation window.
        self.calls: dict[str, Call] = {}
        self.now_ms = 0
        self.last_entry_id = 0
        self.last_call_seq = 0
        self.ledger_total = 0  # sum of every entry's amount: must equal sum of balances
        self.open_call_count = 0  # calls ACTIVE now (metrics read it: O(1), not O(accounts))
        # Per currency, the sums of its accounts' balances and holds and its open calls,
        # kept as they change (audit checks them): a scrape read them from a pass over
        # every account, on the writer's turn, 180 ms with 1M accounts.
        self.totals: dict[str, CurrencyTotals] = {}
        self._expiries: list[tuple[int, int, str]] = []  # (expires_at_ms, call_seq, call_id)
        self._ended: deque[tuple[int, str]] = deque()  # (ended_at_ms, call_id)
        self._keys: dict[tuple[str, str], KeyRecord] = {}
        self._key_times: deque[tuple[str, str]] = deque()  # _keys' keys, oldest first
        # Effects of the step in progress.
        self._changed = False
        self._entries: list[LedgerEntry] = []
        self._touched: dict[str, Call] = {}
        self._pushes: list[Push] = []
        self._events: list[Event] = []
        self._ended_now: list[str] = []
        # What the step's invariant check (_check_step) looks at instead of every
        # account: the accounts it touched, their balances before it touched them,
        # and the ledger total before.
        self._accounts_touched: dict[str, Account] = {}
        self._balances_before: dict[str, int] = {}
        self._ledger_total_before = 0
        self._expired = 0

    # ----------------------------------------------------------------- apply

    def apply(self, command: Command, now_ms: int) -> Step:
        """Apply one command at time `now_ms` (never earlier than the last)."""
        if now_ms < self.now_ms:
            raise InvariantViolation(f"time went back: {now_ms} < {self.now_ms}")
        self.now_ms = now_ms
        self._changed = False
        entries: list[LedgerEntry] = []
        touched: dict[str, Call] = {}
        pushes: list[Push] = []
        events: list[Event] = []
        ended: list[str] = []
        self._entries = entries
        self._touched = touched
        self._pushes = pushes
        self._events = events
        self._ended_now = ended
        self._accounts_touched = {}
        self._balances_before = {}
        self._ledger_total_before = self.ledger_total
        expiries = self._expiries
        due = expiries and expiries[0][0] < now_ms and type(command) is not Takeover
        self._expired = self._expire_due() if due else 0
        if is_valid(command):
            outcome = self._handlers[type(command)](self, command)
        else:
            problems = violations(command)
            text = "; ".join(f"{name}: {why}" for name, why in problems)
            outcome = Refused(Reason.INVALID_ARGUMENT, text, tuple(problems))
        if self._changed:
            self._cross_thresholds()
        self._check_step()
        # Every command builds a Step: from its fields in order, without the NamedTuple's
        # keyword-parsing __new__ (which stays interpreted Python when compiled).
        return _new(
            Step,
            (
                outcome,
                self._changed,
                entries,
                [call.record() for call in touched.values()] if self.events else [],
                pushes,
                events,
                ended,
            ),
        )

    def _top_up(self, c: TopUp) -> Outcome:
        return self._move_money(
            c.account_id, c.amount, c.idempotency_key, c.reference, EntryKind.TOP_UP
        )

    def _adjust(self, c: Adjust) -> Outcome:
        return self._move_money(
            c.account_id, c.amount, c.idempotency_key, c.reason, EntryKind.ADJUSTMENT
        )

    # ------------------------------------------------------------- accounts

    def _create_account(self, c: CreateAccount) -> Outcome:
        if c.account_id in self.accounts:
            return _refuse(Reason.ACCOUNT_EXISTS, f"account {c.account_id!r} exists")
        tariff = self.tariffs.get(c.tariff_id)
        if tariff is None:
            return _refuse(Reason.TARIFF_NOT_FOUND, f"no tariff {c.tariff_id!r}")
        if tariff.currency != c.currency:
            return _refuse(
                Reason.CURRENCY_MISMATCH,
                f"tariff {c.tariff_id!r} is in {tariff.currency}, account in {c.currency}",
            )
        # -- commit point --
        self._changed = True
        account = Account(
            c.account_id,
            c.currency,
            c.tariff_id,
            c.credit_limit,
            c.max_concurrent_calls,
            low_balance_threshold=c.low_balance_threshold,
        )
        self.accounts[c.account_id] = account
        _totals_in(self.totals, c.currency)
        self._touch(account)
        view = account.view()
        if self.events:
            self._events.append(new_event(EventKind.ACCOUNT_CREATED, view, None, None, None))
        return AccountResult(view)

    def _update_account(self, c: UpdateAccount) -> Outcome:
        account = self.accounts.get(c.account_id)
        if account is None:
            return _refuse(Reason.ACCOUNT_NOT_FOUND, f"no account {c.account_id!r}")
        if account.status is AccountStatus.CLOSED:
            return _refuse(Reason.ACCOUNT_CLOSED, f"account {c.account_id!r} is closed")
        if c.tariff_id is not None:
            tariff = self.tariffs.get(c.tariff_id)
            if tariff is None:
                return _refuse(Reason.TARIFF_NOT_FOUND, f"no tariff {c.tariff_id!r}")
            if tariff.currency != account.currency:
                return _refuse(
                    Reason.CURRENCY_MISMATCH,
                    f"tariff {c.tariff_id!r} is in {tariff.currency}, "
                    f"account in {account.currency}",
                )
        if c.credit_limit is not None and account.balance + c.credit_limit < account.reserved:
            return _refuse(
                Reason.INSUFFICIENT_FUNDS,
                f"credit limit {c.credit_limit} would make available negative "
                f"(balance {account.balance}, reserved {account.reserved})",
            )
        if c.status is AccountStatus.CLOSED and account.open_calls:
            return _refuse(
                Reason.ACCOUNT_HAS_OPEN_CALLS,
                f"account {c.account_id!r} has {len(account.open_calls)} open calls",
            )
        # -- commit point --
        self._touch(account)
        grew = resumed = updated = False
        previous_status = account.status
        if c.tariff_id is not None and c.tariff_id != account.tariff_id:
            account.tariff_id = c.tariff_id
            updated = True
        if c.max_concurrent_calls is not None and (
            c.max_concurrent_calls != account.max_concurrent_calls
        ):
            account.max_concurrent_calls = c.max_concurrent_calls
            updated = True
        if c.credit_limit is not None and c.credit_limit != account.credit_limit:
            grew = c.credit_limit > account.credit_limit
            account.credit_limit = c.credit_limit
            updated = True
        if c.low_balance_threshold is not None and (
            c.low_balance_threshold != account.low_balance_threshold
        ):
            account.low_balance_threshold = c.low_balance_threshold
            updated = True
        if c.status is not None and c.status is not account.status:
            account.status = c.status
            updated = True
            if c.status is AccountStatus.SUSPENDED:
                self._suspend_calls(account)
            elif c.status is AccountStatus.ACTIVE:
                grew = resumed = True
        if updated:
            self._changed = True
        if updated and self.events:
            self._events.append(
                new_event(
                    EventKind.ACCOUNT_UPDATED,
                    account.view(),
                    None,
                    None,
                    previous_status,
                )
            )
        if grew:
            self._regrant(account, resumed=resumed)
        return AccountResult(account.view())

    def _suspend_calls(self, account: Account) -> None:
        """Order every open call to hang up; their grants are final from now on."""
        for call in account.open_calls.values():
            account.set_final(call, True)
            self._touched[call.call_id] = call
            self._pushes.append(Termination(call.call_id, Reason.ACCOUNT_SUSPENDED.value))

    def _move_money(
        self,
        account_id: str,
        amount: int,
        key: str,
        text: str,
        kind: EntryKind,
    ) -> Outcome:
        account = self.accounts.get(account_id)
        if account is None:
            return _refuse(Reason.ACCOUNT_NOT_FOUND, f"no account {account_id!r}")
        remembered = self._keys.get((account_id, key))
        if remembered is not None:
            if (remembered.kind, remembered.amount, remembered.text) == (kind, amount, text):
                return AccountResult(key_answer(account_id, remembered))
            return _refuse(
                Reason.IDEMPOTENCY_KEY_CONFLICT,
                f"idempotency key {key!r} was used with different fields",
            )
        if account.status is AccountStatus.CLOSED:
            return _refuse(Reason.ACCOUNT_CLOSED, f"account {account_id!r} is closed")
        if amount < 0 and account.available + amount < 0:
            return _refuse(
                Reason.INSUFFICIENT_FUNDS,
                f"adjustment {amount} exceeds available {account.available}",
            )
        if account.balance + amount > MAX_BALANCE:
            return Refused(
                Reason.INVALID_ARGUMENT,
                f"amount: would take the balance over {MAX_BALANCE}",
                (("amount", f"would take the balance over {MAX_BALANCE}"),),
            )
        # -- commit point --
        self._changed = True
        self._post(account, kind, amount, call_id="", reference=text, key=key)
        if amount > 0:
            self._regrant(account)
        answer = account.view()
        self._remember(account, key, new_key_record(self.now_ms, kind, amount, text, answer))
        return AccountResult(answer)

    def _remember(self, account: Account, key: str, record: KeyRecord) -> None:
        """Remember a TopUp/Adjust under (the account's own id string, key), the tuple
        the dict and the time queue share."""
        account_key = (account.account_id, key)
        self._keys[account_key] = record
        self._key_times.append(account_key)

    def _put_tariff(self, c: PutTariff) -> Outcome:
        existing = self.tariffs.get(c.tariff.tariff_id)
        if existing is not None and existing.currency != c.tariff.currency:
            return _refuse(
                Reason.CURRENCY_MISMATCH,
                f"tariff {c.tariff.tariff_id!r} is in {existing.currency}; "
                "a tariff's currency cannot change",
            )
        # -- commit point --
        self._changed = True
        self.tariffs[c.tariff.tariff_id] = c.tariff
        return TariffResult(c.tariff)

    # ---------------------------------------------------------------- calls

    def _reserve(self, c: Reserve) -> Outcome:
        destination = c.destination.removeprefix("+")
        call = self.calls.get(c.call_id)
        if call is not None:
            # As Renew and Release do: a call past its deadline that the bounded
            # expiry batch has not reached yet must not be answered as ACTIVE.
            self._expire_if_due(call)
            asked = (c.account_id, destination, c.requested_seconds)
            if asked != (call.account_id, call.destination, call.requested_seconds):
                return _refuse(
                    Reason.CALL_ID_CONFLICT,
                    f"call {c.call_id!r} was reserved with different parameters",
                )
            if call.state is not CallState.ACTIVE:
                return _refuse(Reason.CALL_ALREADY_ENDED, f"call {c.call_id!r} has ended")
            return grant_result(call.grant())
        account = self.accounts.get(c.account_id)
        if account is None:
            return _refuse(Reason.ACCOUNT_NOT_FOUND, f"no account {c.account_id!r}")
        if account.status is not AccountStatus.ACTIVE:
            if account.status is AccountStatus.SUSPENDED:
                return _refuse(Reason.ACCOUNT_SUSPENDED, f"account {c.account_id!r} is suspended")
            return _refuse(Reason.ACCOUNT_CLOSED, f"account {c.account_id!r} is closed")
        cap = account.max_concurrent_calls
        if cap and len(account.open_calls) >= cap:
            return _refuse(
                Reason.CONCURRENT_CALL_LIMIT,
                f"account {c.account_id!r} has {cap} open calls, its cap",
            )
        rate = self.tariffs[account.tariff_id].rate_for(destination)
        if rate is None:
            return _refuse(
                Reason.NO_RATE_FOR_DESTINATION,
                f"tariff {account.tariff_id!r} has no rate for {destination}",
            )
        available = account.available
        grant_seconds = c.grant_seconds
        allowed, hold = affordable(rate, grant_seconds, available)
        if allowed == 0:
            return _refuse(
                Reason.INSUFFICIENT_FUNDS,
                f"available {available} does not cover one second "
                f"({cost(rate, 1)}) to {destination}",
            )
        # -- commit point --
        self._changed = True
        self._touch(account)
        call_seq = self.last_call_seq = self.last_call_seq + 1
        call_id = c.call_id
        now_ms = self.now_ms
        final = allowed < grant_seconds
        call = Call(
            call_id,
            call_seq,
            c.account_id,
            destination,
            c.requested_seconds,
            rate,
            grant_seconds,
            c.validity_seconds,
            now_ms,
            now_ms + c.validity_seconds * 1000,
            CallState.ACTIVE,
            allowed,
            0,  # used_seconds
            hold,
            final,
            0,  # last_sequence
            None,  # last_renew
            0,  # charged
            0,  # shortfall
            None,  # ended_at_ms
            None,  # release
        )
        self.calls[call_id] = call
        account.open_call(call)
        self.open_call_count += 1
        account.reserved += hold
        totals = self.totals[account.currency]
        totals.open_calls += 1
        totals.reserved += hold
        account.burn_micros += rate.price_per_minute_micros
        self._push_expiry(call)
        self._touched[call_id] = call
        self._call_event(EventKind.CALL_STARTED, account, call)
        return grant_result(call.grant())

    def _renew(self, c: Renew) -> Outcome:
        call = self.calls.get(c.call_id)
        if call is None:
            return _refuse(Reason.CALL_NOT_FOUND, f"no call {c.call_id!r}")
        if call.expires_at_ms < self.now_ms:
            self._expire_if_due(call)
        if call.state is not CallState.ACTIVE:
            return _refuse(Reason.CALL_ALREADY_ENDED, f"call {c.call_id!r} has ended")
        if c.sequence == call.last_sequence and call.last_renew is not None:
            return grant_result(call.last_renew)
        if c.sequence <= call.last_sequence:
            return grant_result(call.grant())
        if c.used_seconds < call.used_seconds:
            message = f"must not be lower than the {call.used_seconds} already reported"
            return Refused(
                Reason.INVALID_ARGUMENT,
                f"used_seconds: {message}",
                (("used_seconds", message),),
            )
        account = self.accounts[call.account_id]
        # -- commit point --
        self._changed = True
        self._touch(account)
        call.used_seconds = c.used_seconds
        call.last_sequence = c.sequence
        call.grant_seconds = c.grant_seconds
        call.validity_seconds = c.validity_seconds
        if account.status is AccountStatus.ACTIVE:
            self._extend(account, call)
        else:
            account.set_final(call, True)
        self._refresh_validity(call)
        grant = call.last_renew = call.grant()
        self._touched[call.call_id] = call
        return grant_result(grant)

    def _release(self, c: Release) -> Outcome:
        call = self.calls.get(c.call_id)
        if call is None:
            return _refuse(Reason.CALL_NOT_FOUND, f"no call {c.call_id!r}")
        if call.expires_at_ms < self.now_ms:
            self._expire_if_due(call)
        if call.release is not None:
            if call.release.used_seconds == c.used_seconds:
                return release_outcome(call.release)
            return _refuse(
                Reason.CALL_ALREADY_ENDED,
                f"call {c.call_id!r} was released with {call.release.used_seconds} seconds",
            )
        if c.used_seconds < call.used_seconds:
            message = f"must not be lower than the {call.used_seconds} already reported"
            return Refused(
                Reason.INVALID_ARGUMENT,
                f"used_seconds: {message}",
                (("used_seconds", message),),
            )
        account = self.accounts[call.account_id]
        if call.state is CallState.EXPIRED:
            return self._late_release(account, call, c.used_seconds)
        # -- commit point --
        self._changed = True
        price = cost(call.rate, c.used_seconds)
        self._close(account, call, CallState.RELEASED)
        charge = min(price, account.available)
        if charge:
            self._post(account, EntryKind.CALL_CHARGE, -charge, call.call_id)
        call.used_seconds = c.used_seconds
        call.charged = charge
        call.shortfall = price - charge
        result = call.release = self._release_result(account, call)
        self._call_event(EventKind.CALL_ENDED, account, call)
        if account.final_calls:
            self._regrant(account)
        return release_outcome(result)

    def _late_release(self, account: Account, call: Call, used_seconds: int) -> Outcome:
        """Re-rate an expired call to what it used; refund what it was overcharged."""
        if account.status is AccountStatus.CLOSED:
            return _refuse(Reason.ACCOUNT_CLOSED, f"account {account.account_id!r} is closed")
        # -- commit point --
        self._changed = True
        price = cost(call.rate, used_seconds)
        charged = min(price, call.charged)
        refund = call.charged - charged
        if refund:
            self._post(account, EntryKind.REFUND, refund, call.call_id)
        call.used_seconds = used_seconds
        call.charged = charged
        call.shortfall = price - charged
        call.release = self._release_result(account, call)
        self._touched[call.call_id] = call
        if refund:
            self._regrant(account)
        return release_outcome(call.release)

    def _release_result(self, account: Account, call: Call) -> ReleaseResult:
        return new_release_result(
            call.call_id,
            call.used_seconds,
            billed_seconds(call.rate, call.used_seconds),
            call.charged,
            call.shortfall,
            account.balance,
        )

    def _tick(self, c: Tick) -> Outcome:
        """Forget ended calls and idempotency keys older than the retention window."""
        cutoff_ms = self.now_ms - c.retention_ms
        forgotten = 0
        while self._ended and self._ended[0][0] <= cutoff_ms:
            _, call_id = self._ended.popleft()
            del self.calls[call_id]
            forgotten += 1
        keys = self._keys
        key_times = self._key_times
        while key_times and keys[key_times[0]].at_ms <= cutoff_ms:
            del keys[key_times.popleft()]
            forgotten += 1
        if forgotten:
            self._changed = True
        return TickResult(expired=self._expired, forgotten=forgotten)

    def _takeover(self, c: Takeover) -> Outcome:
        """Restart every open call's validity at the new primary's first instant.

        The record stays O(1) in the journal: the calls are not marked touched, so no
        history row is rewritten (an open call's row keeps the deadline of its last
        Reserve or Renew; reads of an open call take its deadline from memory, and the
        journal holds the Takeover from which replay derives it). The expiry heap is
        rebuilt once from the new deadlines (every one moved later: each old entry
        would otherwise be popped and pushed again when it fell due).
        """
        # -- commit point --
        self._changed = True  # journalled even with no call open: the epoch's mark
        expires_at_ms = self.now_ms
        expiries: list[tuple[int, int, str]] = []
        for call in self.calls.values():
            if call.state is CallState.ACTIVE:
                call.expires_at_ms = expires_at_ms + call.validity_seconds * 1000
                expiries.append((call.expires_at_ms, call.call_seq, call.call_id))
        heapq.heapify(expiries)
        self._expiries = expiries
        return TakeoverResult(len(expiries))

    # -------------------------------------------------------------- helpers

    def _touch(self, account: Account) -> None:
        """Note that the step changes `account`, before it does: _check_step looks at it."""
        if account.account_id not in self._balances_before:
            self._accounts_touched[account.account_id] = account
            self._balances_before[account.account_id] = account.balance

    def _extend(self, account: Account, call: Call) -> None:
        """Grow the call's allowance to one grant beyond its use, as funds allow."""
        wanted = call.used_seconds + call.grant_seconds
        allowed_before = call.allowed_seconds
        held = call.held
        budget = held + account.available
        allowed, hold = affordable(call.rate, max(allowed_before, wanted), budget)
        if allowed < allowed_before:
            raise InvariantViolation(f"call {call.call_id} would lose granted seconds")
        account.reserved += hold - held
        self.totals[account.currency].reserved += hold - held
        call.held = hold
        call.allowed_seconds = allowed
        account.set_final(call, allowed < wanted)

    def _regrant(self, account: Account, *, resumed: bool = False) -> None:
        """Extend final grants, oldest call first, now that `available` grew.

        A grant that funds cut holds no unpaid seconds, so once `available` is spent
        the rest cannot change. On resume, though, every grant was cut by the status:
        each is looked at even with nothing available, since its hold may already pay
        for more seconds and its `final` must be lifted.
        """
        if account.status is not AccountStatus.ACTIVE:
            return
        self._touch(account)
        for call_seq in sorted(account.final_calls):
            if account.available <= 0 and not resumed:
                break
            call = account.final_calls[call_seq]
            before = call.grant()
            self._extend(account, call)
            if call.grant() != before:
                self._refresh_validity(call)
                self._touched[call.call_id] = call
                self._pushes.append(GrantPush(call.grant()))

    def _refresh_validity(self, call: Call) -> None:
        """Move the call's deadline to one validity from now.

        The expiry heap must hold, for each open call, an entry no later than its
        deadline. A later deadline keeps the entry it has (when popped, the entry is
        pushed again at the deadline then current); only an earlier one (a shorter
        validity than before) needs an entry of its own. So a renewal, the commonest
        command, does not push.
        """
        expires_at_ms = self.now_ms + call.validity_seconds * 1000
        earlier = expires_at_ms < call.expires_at_ms
        call.expires_at_ms = expires_at_ms
        if earlier:
            self._push_expiry(call)

    def _push_expiry(self, call: Call) -> None:
        heapq.heappush(self._expiries, (call.expires_at_ms, call.call_seq, call.call_id))
        # Each renewal leaves its old deadline behind in the heap; a call renewed far
        # more often than its validity would make the heap grow without bound.
        if len(self._expiries) > 2 * len(self.calls) + STALE_EXPIRIES_SLACK:
            self._expiries = [
                (c.expires_at_ms, c.call_seq, c.call_id)
                for c in self.calls.values()
                if c.state is CallState.ACTIVE
            ]
            heapq.heapify(self._expiries)

    def _expire_due(self) -> int:
        expired = 0
        while (
            self._expiries
            and self._expiries[0][0] < self.now_ms
            and expired < MAX_EXPIRIES_PER_STEP
        ):
            expires_at_ms, call_seq, call_id = heapq.heappop(self._expiries)
            call = self.calls.get(call_id)
            if call is None or call.call_seq != call_seq or call.state is not CallState.ACTIVE:
                continue  # the call ended (or left the window and its id was reused)
            if call.expires_at_ms != expires_at_ms:
                # Renewed since: queue it at its deadline, so that calls expire in
                # (deadline, call_seq) order however their entries were queued.
                heapq.heappush(self._expiries, (call.expires_at_ms, call_seq, call_id))
                continue
            expired += self._expire_if_due(call)
        return expired

    def _expire_if_due(self, call: Call) -> int:
        """Expire `call` if its validity ran out: charge the most it was allowed."""
        if call.state is not CallState.ACTIVE or call.expires_at_ms >= self.now_ms:
            return 0
        self._changed = True
        account = self.accounts[call.account_id]
        charge = call.held
        self._close(account, call, CallState.EXPIRED)
        if charge:
            self._post(account, EntryKind.EXPIRY_CHARGE, -charge, call.call_id)
        call.charged = charge
        self._call_event(EventKind.CALL_ENDED, account, call)
        return 1

    def _close(self, account: Account, call: Call, state: CallState) -> None:
        """End an open call: free its hold and remember it for the window."""
        self._touch(account)
        account.reserved -= call.held
        totals = self.totals[account.currency]
        totals.reserved -= call.held
        totals.open_calls -= 1
        account.burn_micros -= call.rate.price_per_minute_micros
        call.held = 0
        call.state = state
        call.ended_at_ms = self.now_ms
        account.close_call(call)
        self.open_call_count -= 1
        self._ended.append((self.now_ms, call.call_id))
        self._ended_now.append(call.call_id)
        self._touched[call.call_id] = call

    def _post(
        self,
        account: Account,
        kind: EntryKind,
        amount: int,
        call_id: str,
        reference: str = "",
        key: str = "",
    ) -> None:
        """The only place a balance changes: every change is a ledger entry."""
        account_id = account.account_id
        if account_id not in self._balances_before:
            self._accounts_touched[account_id] = account
            self._balances_before[account_id] = account.balance
        balance = account.balance = account.balance + amount
        self.totals[account.currency].balance += amount
        self.ledger_total += amount
        entry_id = self.last_entry_id = self.last_entry_id + 1
        entry = new_ledger_entry(
            entry_id,
            account_id,
            kind,
            amount,
            balance,
            call_id,
            reference,
            key,
            self.now_ms,
        )
        self._entries.append(entry)
        if self.events:
            self._events.append(
                new_event(EventKind.BALANCE_CHANGED, account.view(), entry, None, None)
            )

    def _call_event(self, kind: EventKind, account: Account, call: Call) -> None:
        if self.events:
            self._events.append(new_event(kind, account.view(), None, call.record(), None))

    def _cross_thresholds(self) -> None:
        """LOW_BALANCE or BALANCE_RESTORED for each touched account that crossed (events.py)."""
        for account in self._accounts_touched.values():
            threshold = account.low_balance_threshold
            if account.low:
                if threshold and account.available < threshold:
                    continue
                account.low = False
                kind = EventKind.BALANCE_RESTORED
            elif threshold and account.available < threshold:
                account.low = True
                kind = EventKind.LOW_BALANCE
            else:
                continue
            if self.events:  # the crossing is state (Account.low) either way
                self._events.append(new_event(kind, account.view(), None, None, None))

    def _check_step(self) -> None:
        """The invariants, checked on what the step touched (O(touched), not O(state)).

        Every touched account: reserved >= 0 and available >= 0. Money: the step's
        entries sum to the change of the ledger total, and each touched account's
        balance moved by exactly the sum of its entries, so a balance changed without
        an entry (or an entry without its change) stops the server. Accounts are
        touched before they change (_touch); audit() checks the whole state.
        """
        before = self._balances_before
        moved = bool(self._entries) or self.ledger_total != self._ledger_total_before
        for account_id, account in self._accounts_touched.items():
            reserved = account.reserved
            if reserved < 0 or account.available < 0:
                raise InvariantViolation(
                    f"account {account_id}: available {account.available}, reserved {reserved}"
                )
            if not moved and account.balance != before.get(account_id, account.balance):
                moved = True
        if moved:
            self._check_money()

    def _check_money(self) -> None:
        entries = self._entries
        before = self._balances_before
        if len(entries) == 1 and len(before) == 1:  # the usual case: a charge, a top-up
            entry = entries[0]
            balance_before = before.get(entry.account_id)
            if (
                balance_before is not None
                and self.ledger_total - self._ledger_total_before == entry.amount
                and self.accounts[entry.account_id].balance - balance_before == entry.amount
            ):
                return
        by_account: dict[str, int] = {}
        total = 0
        for entry in self._entries:
            total += entry.amount
            by_account[entry.account_id] = by_account.get(entry.account_id, 0) + entry.amount
        if self.ledger_total - self._ledger_total_before != total:
            raise InvariantViolation(
                f"money not conserved: the ledger total moved by "
                f"{self.ledger_total - self._ledger_total_before}, the step's entries by {total}"
            )
        for account_id, balance_before in self._balances_before.items():
            change = self.accounts[account_id].balance - balance_before
            if change != by_account.pop(account_id, 0):
                raise InvariantViolation(
                    f"money not conserved: account {account_id} moved by {change}, "
                    "its entries by a different amount"
                )
        if by_account:
            raise InvariantViolation(f"entries of accounts the step did not touch: {by_account}")

    # ---------------------------------------------------------------- reads

    def account(self, account_id: str) -> AccountView | None:
        account = self.accounts.get(account_id)
        return None if account is None else account.view()

    def call(self, call_id: str) -> CallRecord | None:
        call = self.calls.get(call_id)
        return None if call is None else call.record()

    def open_calls(self, account_id: str) -> list[CallRecord]:
        """The account's open calls, newest first."""
        account = self.accounts.get(account_id)
        if account is None:
            return []
        return [call.record() for call in account.open_calls.values()][::-1]

    def next_expiry_ms(self) -> int | None:
        """When the earliest open call may expire (possibly a stale, earlier time)."""
        return self._expiries[0][0] if self._expiries else None

    def audit(self) -> list[str]:
        """Check every invariant across the whole state; the problems found."""
        problems: list[str] = []
        balances = 0
        open_calls_seen = 0
        totals: dict[str, CurrencyTotals] = {}
        for account in self.accounts.values():
            balances += account.balance
            open_calls_seen += len(account.open_calls)
            open_calls = account.open_calls
            total = _totals_in(totals, account.currency)
            total.balance += account.balance
            total.reserved += account.reserved
            total.open_calls += len(open_calls)
            # Most accounts have no open call: a start from a snapshot audits them all.
            holds = sum(call.held for call in open_calls.values()) if open_calls else 0
            if holds != account.reserved:
                problems.append(f"{account.account_id}: reserved {account.reserved} != {holds}")
            burn = (
                sum(call.rate.price_per_minute_micros for call in open_calls.values())
                if open_calls
                else 0
            )
            if burn != account.burn_micros:
                problems.append(f"{account.account_id}: burn {account.burn_micros} != {burn}")
            threshold = account.low_balance_threshold
            if account.low != bool(threshold and account.available < threshold):
                problems.append(f"{account.account_id}: low-balance flag {account.low} is wrong")
            if account.available < 0:
                problems.append(f"{account.account_id}: available {account.available} < 0")
            if not open_calls:
                continue
            for call in open_calls.values():
                if call.state is not CallState.ACTIVE or self.calls.get(call.call_id) is not call:
                    problems.append(f"{call.call_id}: open but {call.state}")
                if call.held != cost(call.rate, call.allowed_seconds):
                    problems.append(f"{call.call_id}: held {call.held} != cost of allowed")
                if call.final != (call.call_seq in account.final_calls):
                    problems.append(f"{call.call_id}: final flag and final set disagree")
        if balances != self.ledger_total:
            problems.append(f"sum of balances {balances} != sum of entries {self.ledger_total}")
        if open_calls_seen != self.open_call_count:
            problems.append(f"{open_calls_seen} open calls, counted {self.open_call_count}")
        if totals != self.totals:
            problems.append(f"totals per currency {self.totals} != {totals}")
        return problems

    # ------------------------------------------------------------- images

    def image(self) -> dict[str, Any]:
        """The whole state as plain JSON-able values: what a snapshot stores (the
        format: core/image.py).

        `StateMachine.from_image(m.image())` behaves exactly as `m` on any later
        command: the order-bearing parts (open calls by reservation order, the
        retention queues by time) are rebuilt from what is stored here.
        """
        header = image_format.Header(
            image_format.IMAGE_VERSION,
            self.now_ms,
            self.last_entry_id,
            self.last_call_seq,
            self.ledger_total,
        )
        return image_format.encode(
            header,
            tariffs=[image_format.tariff_row(t) for t in self.tariffs.values()],
            accounts=[image_format.account_row(a) for a in self.accounts.values()],
            calls=[image_format.call_row(c) for c in self.calls.values()],
            keys=[
                image_format.key_row(account_id, key, self._keys[(account_id, key)])
                for account_id, key in self._key_times
            ],
        )

    @classmethod
    def from_image(cls, image: dict[str, Any]) -> StateMachine:
        """Rebuild a state machine from `image()`; raises InvariantViolation if it is
        broken, or of a version this server cannot read."""
        unsupported = image_format.unsupported_version(image)
        if unsupported:
            raise InvariantViolation(unsupported)
        # Building millions of objects would run the cyclic garbage collector over
        # the growing heap again and again (about half the time of a start); what
        # is built here holds no reference cycles, so nothing is left uncollected.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return cls._build(image)
        except (TypeError, ValueError, KeyError) as exc:
            raise InvariantViolation(f"state image is malformed: {exc!r}") from exc
        finally:
            if collecting:
                gc.enable()

    @classmethod
    def _build(cls, image: dict[str, Any]) -> StateMachine:
        machine = cls()
        header = image_format.decode_header(image)
        machine.now_ms = header.now_ms
        machine.last_entry_id = header.last_entry_id
        machine.last_call_seq = header.last_call_seq
        machine.ledger_total = header.ledger_total
        shared_rates: dict[tuple[Any, ...], Rate] = {}
        for row in image["tariffs"]:
            tariff = image_format.tariff_of(row, shared_rates)
            machine.tariffs[tariff.tariff_id] = tariff
        accounts = machine.accounts
        names: dict[str, str] = {}
        totals = machine.totals
        for row in image["accounts"]:
            account = image_format.account_of(row, names)
            accounts[account.account_id] = account
            total = _totals_in(totals, account.currency)
            total.balance += account.balance
            total.reserved += account.reserved
        calls = sorted(
            (image_format.call_of(row, shared_rates) for row in image["calls"]), key=_by_call_seq
        )
        for call in calls:
            machine.calls[call.call_id] = call
            if call.state is CallState.ACTIVE:
                account = machine.accounts[call.account_id]
                account.open_call(call)
                account.burn_micros += call.rate.price_per_minute_micros
                machine.open_call_count += 1
                totals[account.currency].open_calls += 1
                machine._expiries.append((call.expires_at_ms, call.call_seq, call.call_id))
        heapq.heapify(machine._expiries)
        ended = [c for c in calls if c.ended_at_ms is not None]
        machine._ended.extend((c.ended_at_ms or 0, c.call_id) for c in sorted(ended, key=_by_end))
        for row in image["keys"]:
            account_id, key, record = image_format.key_of(row, names)
            machine._remember(machine.accounts[account_id], key, record)
        problems = machine.audit()
        if problems:
            raise InvariantViolation("state image is broken: " + "; ".join(problems))
        return machine


def _handlers_of(cls: type[StateMachine]) -> dict[type[Any], _Handler]:
    """Each command type's handler in `cls`, overrides included (tests inject bugs so)."""
    return {
        CreateAccount: cls._create_account,
        UpdateAccount: cls._update_account,
        TopUp: cls._top_up,
        Adjust: cls._adjust,
        PutTariff: cls._put_tariff,
        Reserve: cls._reserve,
        Renew: cls._renew,
        Release: cls._release,
        Tick: cls._tick,
        Takeover: cls._takeover,
    }


StateMachine._handlers = _handlers_of(StateMachine)


def _totals_in(totals: dict[str, CurrencyTotals], currency: str) -> CurrencyTotals:
    """The totals of `currency` in `totals`, added (all zero) if it has none yet."""
    total = totals.get(currency)
    if total is None:
        total = totals[currency] = CurrencyTotals()
    return total


def _by_call_seq(call: Call) -> int:
    return call.call_seq


def _by_end(call: Call) -> tuple[int, int]:
    return (call.ended_at_ms or 0, call.call_seq)
