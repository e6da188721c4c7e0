"""A reference model of docs/design.md: what every answer, ledger entry and push must be.

The simulator's auditor feeds the model every command the server applied, at the
same instant and in the same order, and compares what the model predicts with
what the state machine answered. The model is written from docs/design.md's text, not
from core/machine.py, and is shaped differently on purpose, so that a shared
mistake is unlikely:

- it keeps no `reserved` counter: an account's holds are summed from its open calls;
- it keeps no expiry heap and no queues of ended calls or keys: what is due or
  past the window is found by scanning;
- it prices calls and finds the affordable duration in closed form (the cost is
  a step function of the increment blocks) instead of by binary search;
- it re-grants every final call of an account, oldest first, without stopping
  early when nothing is left (docs/design.md says "its calls holding a final grant are
  re-granted"; an implementation may stop early only if that changes nothing).

Where docs/design.md leaves a detail open the model follows the server's documented
choice and says so in a comment marked "Decided beyond the brief".

It shares only the contract's value types with the server (Grant, ReleaseResult,
AccountView, LedgerEntry, ...), so that answers can be compared with `==`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from callcredit_server.core import (
    AccountResult,
    AccountStatus,
    AccountView,
    Adjust,
    CallRecord,
    CallState,
    Command,
    CreateAccount,
    EntryKind,
    Grant,
    GrantPush,
    GrantResult,
    LedgerEntry,
    Outcome,
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
    Tariff,
    TariffResult,
    Termination,
    Tick,
    TickResult,
    TopUp,
    UpdateAccount,
)

__all__ = ["Expected", "Model", "ModelError", "billed", "price", "same_outcome"]

MICROS_PER_MINUTE = 60_000_000
MAX_SECONDS = 86_400
MAX_AMOUNT = 10**15
MAX_CREDIT_LIMIT = 10**15
MAX_PRICE_PER_MINUTE_MICROS = 10**12
MAX_INCREMENT_SECONDS = 3_600
MAX_CONNECT_FEE = 10**9
MAX_PREFIX_DIGITS = 16
_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_DESTINATION = re.compile(r"\+?[0-9]{1,32}")
_CURRENCY = re.compile(r"[A-Z]{3}")
_PREFIX = re.compile(r"[0-9]{0,16}")


class ModelError(AssertionError):
    """The model was driven in a way docs/design.md does not allow (a simulator bug)."""


# ------------------------------------------------------------------ rating


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def billed(rate: Rate, seconds: int) -> int:
    """docs/design.md: 0 if s == 0, else first + ceil(max(0, s - first) / next) * next."""
    if seconds <= 0:
        return 0
    first, step = rate.first_increment_seconds, rate.next_increment_seconds
    return first + _ceil_div(max(0, seconds - first), step) * step


def price(rate: Rate, seconds: int) -> int:
    """docs/design.md: 0 if s == 0, else connect_fee + ceil(billed(s) * ppm / 60,000,000)."""
    if seconds <= 0:
        return 0
    return rate.connect_fee + _ceil_div(
        billed(rate, seconds) * rate.price_per_minute_micros, MICROS_PER_MINUTE
    )


def affordable(rate: Rate, limit_seconds: int, budget: int) -> int:
    """The largest duration <= limit_seconds whose price fits in `budget` (0 if none).

    Closed form: ceil(b * ppm / M) <= budget - fee  <=>  b * ppm <= (budget - fee) * M,
    so the billed seconds may be at most B = (budget - fee) * M // ppm; the longest
    duration billed at most B is the end of the last whole increment block <= B.
    """
    if limit_seconds <= 0 or budget < rate.connect_fee:
        return 0
    if rate.price_per_minute_micros == 0:
        return limit_seconds
    most_billed = (budget - rate.connect_fee) * MICROS_PER_MINUTE // rate.price_per_minute_micros
    first, step = rate.first_increment_seconds, rate.next_increment_seconds
    if most_billed < first:
        return 0
    return min(limit_seconds, first + (most_billed - first) // step * step)


# ------------------------------------------------------------------ state


@dataclass(slots=True)
class _Call:
    call_id: str
    call_seq: int
    account_id: str
    destination: str
    requested_seconds: int
    rate: Rate
    grant_seconds: int
    validity_seconds: int
    started_at_ms: int
    expires_at_ms: int
    allowed_seconds: int
    held: int
    final: bool
    state: CallState = CallState.ACTIVE
    used_seconds: int = 0
    last_sequence: int = 0
    last_renew: Grant | None = None
    charged: int = 0
    shortfall: int = 0
    ended_at_ms: int | None = None
    release: ReleaseResult | None = None

    def grant(self) -> Grant:
        return Grant(
            self.call_id, self.allowed_seconds, self.final, self.validity_seconds, self.held
        )

    def record(self) -> CallRecord:
        active = self.state is CallState.ACTIVE
        return CallRecord(
            call_id=self.call_id,
            call_seq=self.call_seq,
            account_id=self.account_id,
            destination=self.destination,
            state=self.state,
            allowed_seconds=self.allowed_seconds,
            used_seconds=self.used_seconds,
            held=self.held,
            charged=self.charged,
            shortfall=self.shortfall,
            rate=self.rate,
            started_at_ms=self.started_at_ms,
            ended_at_ms=self.ended_at_ms,
            final=self.final,
            expires_at_ms=self.expires_at_ms if active else None,
            last_sequence=self.last_sequence,
        )


@dataclass(slots=True)
class _Account:
    account_id: str
    currency: str
    tariff_id: str
    credit_limit: int
    max_concurrent_calls: int
    status: AccountStatus = AccountStatus.ACTIVE
    balance: int = 0
    # Open calls in the order they were reserved ("oldest first" is call_seq order).
    open_calls: dict[str, _Call] = field(default_factory=dict)

    def holds(self) -> int:
        return sum(call.held for call in self.open_calls.values())

    def available(self) -> int:
        return self.balance + self.credit_limit - self.holds()

    def view(self) -> AccountView:
        holds = self.holds()
        return AccountView(
            account_id=self.account_id,
            currency=self.currency,
            status=self.status,
            tariff_id=self.tariff_id,
            balance=self.balance,
            reserved=holds,
            available=self.balance + self.credit_limit - holds,
            credit_limit=self.credit_limit,
            max_concurrent_calls=self.max_concurrent_calls,
            active_calls=len(self.open_calls),
            burn_micros=sum(c.rate.price_per_minute_micros for c in self.open_calls.values()),
        )


@dataclass(frozen=True, slots=True)
class _Key:
    fields: tuple[str, int, str]  # (kind, amount, reference or reason)
    answer: AccountView
    at_ms: int


@dataclass(slots=True)
class Expected:
    """What one command must do: its answer, whether it is journaled, entries, pushes."""

    outcome: Outcome
    changed: bool
    entries: list[LedgerEntry]
    pushes: list[Push]
    expired: int


def same_outcome(expected: Outcome, actual: Outcome) -> bool:
    """Equal answers; a refusal is compared by its reason (messages are prose)."""
    if isinstance(expected, Refused):
        return isinstance(actual, Refused) and actual.reason is expected.reason
    return expected == actual


def _refused(reason: Reason) -> Refused:
    return Refused(reason, "")


# ------------------------------------------------------------------ input limits


def _input_problem(command: Command) -> str:
    """The first of docs/design.md's "Limits on input" that `command` breaks, or ""."""
    ids: list[str] = []
    problems: list[str] = []

    def within(name: str, value: int, low: int, high: int) -> None:
        if not low <= value <= high:
            problems.append(name)

    match command:
        case CreateAccount():
            ids += [command.account_id, command.tariff_id]
            if not _CURRENCY.fullmatch(command.currency):
                problems.append("currency")
            within("credit_limit", command.credit_limit, 0, MAX_CREDIT_LIMIT)
            within("max_concurrent_calls", command.max_concurrent_calls, 0, 1_000_000)
        case UpdateAccount():
            ids.append(command.account_id)
            if command.tariff_id is not None:
                ids.append(command.tariff_id)
            if command.credit_limit is not None:
                within("credit_limit", command.credit_limit, 0, MAX_CREDIT_LIMIT)
            if command.max_concurrent_calls is not None:
                within("max_concurrent_calls", command.max_concurrent_calls, 0, 1_000_000)
        case TopUp():
            ids += [command.account_id, command.idempotency_key]
            within("amount", command.amount, 1, MAX_AMOUNT)
        case Adjust():
            ids += [command.account_id, command.idempotency_key]
            within("amount", command.amount, -MAX_AMOUNT, MAX_AMOUNT)
            if command.amount == 0:
                problems.append("amount")
        case PutTariff():
            tariff = command.tariff
            ids.append(tariff.tariff_id)
            if not _CURRENCY.fullmatch(tariff.currency):
                problems.append("currency")
            prefixes = [r.prefix for r in tariff.rates]
            if len(set(prefixes)) != len(prefixes):
                problems.append("prefix")
            for r in tariff.rates:
                if not _PREFIX.fullmatch(r.prefix):
                    problems.append("prefix")
                within("price", r.price_per_minute_micros, 0, MAX_PRICE_PER_MINUTE_MICROS)
                within("first", r.first_increment_seconds, 1, MAX_INCREMENT_SECONDS)
                within("next", r.next_increment_seconds, 1, MAX_INCREMENT_SECONDS)
                within("fee", r.connect_fee, 0, MAX_CONNECT_FEE)
        case Reserve():
            ids += [command.call_id, command.account_id]
            if not _DESTINATION.fullmatch(command.destination):
                problems.append("destination")
            within("requested_seconds", command.requested_seconds, 0, MAX_SECONDS)
        case Renew():
            ids.append(command.call_id)
            within("sequence", command.sequence, 1, 2**63 - 1)
            within("used_seconds", command.used_seconds, 0, MAX_SECONDS)
            within("requested_seconds", command.requested_seconds, 0, MAX_SECONDS)
        case Release():
            ids.append(command.call_id)
            within("used_seconds", command.used_seconds, 0, MAX_SECONDS)
        case Tick():
            pass
    problems += [f"id {value!r}" for value in ids if not _ID.fullmatch(value)]
    return ", ".join(problems)


# ------------------------------------------------------------------ the model


class Model:
    """Accounts, tariffs and calls as docs/design.md describes them, changed by `apply`."""

    def __init__(self) -> None:
        self.now_ms = 0
        self.tariffs: dict[str, Tariff] = {}
        self.accounts: dict[str, _Account] = {}
        self.calls: dict[str, _Call] = {}  # open, or ended within the window
        self.keys: dict[tuple[str, str], _Key] = {}
        self.forgotten: dict[str, CallRecord] = {}  # left the window: history only
        self.last_entry_id = 0
        self.last_call_seq = 0
        # No open call expires before this (a lower bound, so most commands need not
        # scan every call for expiries; it is exact right after a scan).
        self._quiet_until_ms = 0
        self._out = Expected(TickResult(0, 0), False, [], [], 0)

    def clone(self) -> Model:
        """An independent copy (calls hold only immutable values besides numbers)."""
        other = Model()
        other.now_ms = self.now_ms
        other.tariffs = dict(self.tariffs)
        other.calls = {call_id: copy.copy(call) for call_id, call in self.calls.items()}
        for account_id, account in self.accounts.items():
            twin = copy.copy(account)
            twin.open_calls = {call_id: other.calls[call_id] for call_id in account.open_calls}
            other.accounts[account_id] = twin
        other.keys = dict(self.keys)
        other.forgotten = dict(self.forgotten)
        other.last_entry_id = self.last_entry_id
        other.last_call_seq = self.last_call_seq
        other._quiet_until_ms = self._quiet_until_ms
        return other

    # ------------------------------------------------------------------ reads

    def view(self, account_id: str) -> AccountView | None:
        account = self.accounts.get(account_id)
        return None if account is None else account.view()

    def call(self, call_id: str) -> CallRecord | None:
        call = self.calls.get(call_id)
        return None if call is None else call.record()

    def release_of(self, call_id: str) -> ReleaseResult | None:
        call = self.calls.get(call_id)
        return None if call is None else call.release

    def key_ids(self) -> list[tuple[str, str]]:
        return sorted(self.keys)

    def open_call_ids(self, account_id: str) -> list[str]:
        return list(self.accounts[account_id].open_calls)

    # ------------------------------------------------------------------ apply

    def apply(self, command: Command, now_ms: int) -> Expected:
        """What applying `command` at `now_ms` must answer and change."""
        if now_ms < self.now_ms:
            raise ModelError(f"the model's time went back: {now_ms} < {self.now_ms}")
        self.now_ms = now_ms
        self._out = Expected(TickResult(0, 0), False, [], [], 0)
        # Time passes first: a call silent past its validity has expired, whatever
        # the command is (docs/design.md, Expiry; a Renew that comes late finds it ended).
        self._out.expired = self._expire_due()
        if _input_problem(command):
            self._out.outcome = _refused(Reason.INVALID_ARGUMENT)
        else:
            self._out.outcome = self._dispatch(command)
        return self._out

    def _dispatch(self, command: Command) -> Outcome:
        match command:
            case CreateAccount():
                return self._create_account(command)
            case UpdateAccount():
                return self._update_account(command)
            case TopUp():
                fields = ("TOP_UP", command.amount, command.reference)
                return self._money(command.account_id, command.idempotency_key, fields)
            case Adjust():
                fields = ("ADJUSTMENT", command.amount, command.reason)
                return self._money(command.account_id, command.idempotency_key, fields)
            case PutTariff():
                return self._put_tariff(command)
            case Reserve():
                return self._reserve(command)
            case Renew():
                return self._renew(command)
            case Release():
                return self._release(command)
            case Tick():
                return self._tick(command)
        raise ModelError(f"not a command: {command!r}")

    # ------------------------------------------------------------ accounts

    def _create_account(self, c: CreateAccount) -> Outcome:
        if c.account_id in self.accounts:
            return _refused(Reason.ACCOUNT_EXISTS)
        tariff = self.tariffs.get(c.tariff_id)
        if tariff is None:
            return _refused(Reason.TARIFF_NOT_FOUND)
        if tariff.currency != c.currency:
            return _refused(Reason.CURRENCY_MISMATCH)
        account = _Account(
            c.account_id, c.currency, c.tariff_id, c.credit_limit, c.max_concurrent_calls
        )
        self.accounts[c.account_id] = account
        self._out.changed = True
        return AccountResult(account.view())

    def _update_account(self, c: UpdateAccount) -> Outcome:
        account = self.accounts.get(c.account_id)
        if account is None:
            return _refused(Reason.ACCOUNT_NOT_FOUND)
        if account.status is AccountStatus.CLOSED:
            return _refused(Reason.ACCOUNT_CLOSED)  # "every change on it is refused"
        if c.tariff_id is not None:
            tariff = self.tariffs.get(c.tariff_id)
            if tariff is None:
                return _refused(Reason.TARIFF_NOT_FOUND)
            if tariff.currency != account.currency:
                return _refused(Reason.CURRENCY_MISMATCH)
        if c.credit_limit is not None and account.balance + c.credit_limit - account.holds() < 0:
            return _refused(Reason.INSUFFICIENT_FUNDS)  # "a lower credit_limit ... is refused"
        if c.status is AccountStatus.CLOSED and account.open_calls:
            # Decided beyond the brief (docs/design.md; the brief says only "from an account
            # with no open calls"): the server names the refusal ACCOUNT_HAS_OPEN_CALLS.
            return _refused(Reason.ACCOUNT_HAS_OPEN_CALLS)
        grew = resumed = False
        if c.tariff_id is not None and c.tariff_id != account.tariff_id:
            account.tariff_id = c.tariff_id
            self._out.changed = True
        if c.max_concurrent_calls is not None and c.max_concurrent_calls != (
            account.max_concurrent_calls
        ):
            account.max_concurrent_calls = c.max_concurrent_calls
            self._out.changed = True
        if c.credit_limit is not None and c.credit_limit != account.credit_limit:
            grew = c.credit_limit > account.credit_limit
            account.credit_limit = c.credit_limit
            self._out.changed = True
        if c.status is not None and c.status is not account.status:
            account.status = c.status
            self._out.changed = True
            if c.status is AccountStatus.SUSPENDED:
                # "each open call gets a pushed termination"; renewals give no more time.
                for call in account.open_calls.values():
                    call.final = True
                    self._out.pushes.append(
                        Termination(call.call_id, Reason.ACCOUNT_SUSPENDED.value)
                    )
            elif c.status is AccountStatus.ACTIVE:
                grew = resumed = True
        if grew:
            self._regrant(account, resumed=resumed)
        return AccountResult(account.view())

    def _money(self, account_id: str, key: str, fields: tuple[str, int, str]) -> Outcome:
        account = self.accounts.get(account_id)
        if account is None:
            return _refused(Reason.ACCOUNT_NOT_FOUND)
        # Decided beyond the brief (docs/design.md): the order of these checks. A repeat is
        # answered before the status is looked at, so a retried top-up keeps its first answer.
        remembered = self.keys.get((account_id, key))
        if remembered is not None:
            if remembered.fields == fields:
                return AccountResult(remembered.answer)
            return _refused(Reason.IDEMPOTENCY_KEY_CONFLICT)
        if account.status is AccountStatus.CLOSED:
            return _refused(Reason.ACCOUNT_CLOSED)
        kind, amount, text = fields
        if amount < 0 and account.available() + amount < 0:
            return _refused(Reason.INSUFFICIENT_FUNDS)
        self._out.changed = True
        self._post(account, EntryKind(kind), amount, call_id="", reference=text, key=key)
        if amount > 0:
            self._regrant(account)
        answer = account.view()
        self.keys[(account_id, key)] = _Key(fields, answer, self.now_ms)
        return AccountResult(answer)

    def _put_tariff(self, c: PutTariff) -> Outcome:
        existing = self.tariffs.get(c.tariff.tariff_id)
        if existing is not None and existing.currency != c.tariff.currency:
            return _refused(Reason.CURRENCY_MISMATCH)
        self.tariffs[c.tariff.tariff_id] = c.tariff
        self._out.changed = True
        return TariffResult(c.tariff)

    # ------------------------------------------------------------ calls

    def _rate(self, tariff: Tariff, destination: str) -> Rate | None:
        """The rate of the longest prefix of `destination`."""
        best: Rate | None = None
        for r in tariff.rates:
            if destination.startswith(r.prefix) and (
                best is None or len(r.prefix) > len(best.prefix)
            ):
                best = r
        return best

    def _reserve(self, c: Reserve) -> Outcome:
        destination = c.destination.removeprefix("+")
        known = self.calls.get(c.call_id)
        if known is not None:
            if (known.account_id, known.destination, known.requested_seconds) != (
                c.account_id,
                destination,
                c.requested_seconds,
            ):
                return _refused(Reason.CALL_ID_CONFLICT)
            if known.state is not CallState.ACTIVE:
                return _refused(Reason.CALL_ALREADY_ENDED)
            return GrantResult(known.grant())
        account = self.accounts.get(c.account_id)
        if account is None:
            return _refused(Reason.ACCOUNT_NOT_FOUND)
        if account.status is AccountStatus.SUSPENDED:
            return _refused(Reason.ACCOUNT_SUSPENDED)
        if account.status is AccountStatus.CLOSED:
            return _refused(Reason.ACCOUNT_CLOSED)
        if account.max_concurrent_calls and (
            len(account.open_calls) >= account.max_concurrent_calls
        ):
            return _refused(Reason.CONCURRENT_CALL_LIMIT)
        rate = self._rate(self.tariffs[account.tariff_id], destination)
        if rate is None:
            return _refused(Reason.NO_RATE_FOR_DESTINATION)
        available = account.available()
        g = c.grant_seconds
        allowed = affordable(rate, g, available)
        if allowed == 0:
            return _refused(Reason.INSUFFICIENT_FUNDS)
        hold = price(rate, allowed)
        if hold > available:
            raise ModelError(f"model grants {allowed}s costing {hold} from {available}")
        self.last_call_seq += 1
        call = _Call(
            call_id=c.call_id,
            call_seq=self.last_call_seq,
            account_id=c.account_id,
            destination=destination,
            requested_seconds=c.requested_seconds,
            rate=rate,
            grant_seconds=g,
            validity_seconds=c.validity_seconds,
            started_at_ms=self.now_ms,
            expires_at_ms=self._deadline(c.validity_seconds),
            allowed_seconds=allowed,
            held=hold,
            final=allowed < g,  # final exactly when allowed < used (0) + g
        )
        self.calls[call.call_id] = call
        account.open_calls[call.call_id] = call
        self._out.changed = True
        return GrantResult(call.grant())

    def _renew(self, c: Renew) -> Outcome:
        call = self.calls.get(c.call_id)
        if call is None:
            return _refused(Reason.CALL_NOT_FOUND)
        if call.state is not CallState.ACTIVE:
            return _refused(Reason.CALL_ALREADY_ENDED)
        if c.sequence == call.last_sequence and call.last_renew is not None:
            return GrantResult(call.last_renew)  # "a repeat ... returns the first answer"
        if c.sequence <= call.last_sequence:
            return GrantResult(call.grant())  # "an older sequence returns the current grant"
        if c.used_seconds < call.used_seconds:
            return _refused(Reason.INVALID_ARGUMENT)  # "never lower than a previous report"
        account = self.accounts[call.account_id]
        call.used_seconds = c.used_seconds
        call.last_sequence = c.sequence
        call.grant_seconds = c.grant_seconds
        call.validity_seconds = c.validity_seconds
        if account.status is AccountStatus.ACTIVE:
            self._extend(account, call)
        else:
            call.final = True  # "On a suspended account a Renew extends nothing"
        call.expires_at_ms = self._deadline(call.validity_seconds)
        call.last_renew = call.grant()
        self._out.changed = True
        return GrantResult(call.last_renew)

    def _release(self, c: Release) -> Outcome:
        call = self.calls.get(c.call_id)
        if call is None:
            return _refused(Reason.CALL_NOT_FOUND)
        if call.release is not None:
            if call.release.used_seconds == c.used_seconds:
                return ReleaseOutcome(call.release)  # "a repeat returns the first result"
            return _refused(Reason.CALL_ALREADY_ENDED)
        if c.used_seconds < call.used_seconds:
            return _refused(Reason.INVALID_ARGUMENT)
        account = self.accounts[call.account_id]
        cost_used = price(call.rate, c.used_seconds)
        if call.state is CallState.EXPIRED:
            # A late Release re-rates to cost(used), never above what expiry charged.
            if account.status is AccountStatus.CLOSED:
                return _refused(Reason.ACCOUNT_CLOSED)
            charged = min(cost_used, call.charged)
            refund = call.charged - charged
            if refund:
                self._post(account, EntryKind.REFUND, refund, call_id=call.call_id)
            call.used_seconds = c.used_seconds
            call.charged = charged
            call.shortfall = cost_used - charged
            call.release = self._result(account, call)
            self._out.changed = True
            if refund:
                self._regrant(account)
            return ReleaseOutcome(call.release)
        # Charge cost(used); an overrun is charged only as far as held + available go.
        covered = call.held + account.available()
        self._end(account, call, CallState.RELEASED)
        charge = min(cost_used, covered)
        if charge:
            self._post(account, EntryKind.CALL_CHARGE, -charge, call_id=call.call_id)
        call.used_seconds = c.used_seconds
        call.charged = charge
        call.shortfall = cost_used - charge
        call.release = self._result(account, call)
        self._out.changed = True
        self._regrant(account)
        return ReleaseOutcome(call.release)

    def _result(self, account: _Account, call: _Call) -> ReleaseResult:
        return ReleaseResult(
            call_id=call.call_id,
            used_seconds=call.used_seconds,
            billed_seconds=billed(call.rate, call.used_seconds),
            charged=call.charged,
            shortfall=call.shortfall,
            balance=account.balance,
        )

    def _tick(self, c: Tick) -> Outcome:
        # Decided beyond the brief (docs/design.md): the boundary. Something that ended (or a
        # key used) exactly `retention` ago is forgotten, as the server does.
        cutoff_ms = self.now_ms - c.retention_ms
        gone = [
            call
            for call in self.calls.values()
            if call.ended_at_ms is not None and call.ended_at_ms <= cutoff_ms
        ]
        for call in gone:
            del self.calls[call.call_id]
            self.forgotten[call.call_id] = call.record()
        keys = [k for k, record in self.keys.items() if record.at_ms <= cutoff_ms]
        for k in keys:
            del self.keys[k]
        forgotten = len(gone) + len(keys)
        if forgotten:
            self._out.changed = True
        return TickResult(expired=self._out.expired, forgotten=forgotten)

    # ------------------------------------------------------------ helpers

    def _deadline(self, validity_seconds: int) -> int:
        """When a call renewed now must be heard from again."""
        expires_at_ms = self.now_ms + validity_seconds * 1000
        self._quiet_until_ms = min(self._quiet_until_ms, expires_at_ms)
        return expires_at_ms

    def _expire_due(self) -> int:
        """Close every open call past its validity, charging cost(allowed) (its hold)."""
        if self.now_ms <= self._quiet_until_ms:
            return 0
        due = sorted(
            (
                call
                for account in self.accounts.values()
                for call in account.open_calls.values()
                if call.expires_at_ms < self.now_ms
            ),
            key=lambda call: (call.expires_at_ms, call.call_seq),
        )
        for call in due:
            account = self.accounts[call.account_id]
            charge = call.held
            if charge != price(call.rate, call.allowed_seconds):
                raise ModelError(f"{call.call_id}: hold {charge} is not the cost of its grant")
            self._end(account, call, CallState.EXPIRED)
            if charge:
                self._post(account, EntryKind.EXPIRY_CHARGE, -charge, call_id=call.call_id)
            call.charged = charge
            self._out.changed = True
        self._quiet_until_ms = min(
            (
                call.expires_at_ms
                for account in self.accounts.values()
                for call in account.open_calls.values()
            ),
            default=2**63,
        )
        return len(due)

    def _extend(self, account: _Account, call: _Call) -> None:
        """Grow the allowance to one grant past the use, as far as funds allow."""
        wanted = call.used_seconds + call.grant_seconds
        allowed = affordable(
            call.rate, max(call.allowed_seconds, wanted), call.held + account.available()
        )
        if allowed < call.allowed_seconds:
            raise ModelError(f"{call.call_id}: a grant would shrink")
        call.held = price(call.rate, allowed)
        call.allowed_seconds = allowed
        call.final = allowed < wanted

    def _regrant(self, account: _Account, *, resumed: bool = False) -> None:
        """Re-grant every final call of an ACTIVE account, oldest first (docs/design.md)."""
        del resumed  # the model looks at every final call, resumed or not
        if account.status is not AccountStatus.ACTIVE:
            return
        for call in sorted(account.open_calls.values(), key=lambda call: call.call_seq):
            if not call.final:
                continue
            before = call.grant()
            self._extend(account, call)
            # Decided beyond the brief (docs/design.md): a final call whose grant stays as it
            # was is not "re-granted" (no push, its validity is not reset), as on the server.
            if call.grant() != before:
                call.expires_at_ms = self._deadline(call.validity_seconds)
                self._out.pushes.append(GrantPush(call.grant()))

    def _end(self, account: _Account, call: _Call, state: CallState) -> None:
        del account.open_calls[call.call_id]
        call.held = 0
        call.final = False
        call.state = state
        call.ended_at_ms = self.now_ms

    def _post(
        self,
        account: _Account,
        kind: EntryKind,
        amount: int,
        *,
        call_id: str,
        reference: str = "",
        key: str = "",
    ) -> None:
        account.balance += amount
        self.last_entry_id += 1
        self._out.entries.append(
            LedgerEntry(
                entry_id=self.last_entry_id,
                account_id=account.account_id,
                kind=kind,
                amount=amount,
                balance_after=account.balance,
                call_id=call_id,
                reference=reference,
                idempotency_key=key,
                created_at_ms=self.now_ms,
            )
        )
