"""The state machine's data: accounts, tariffs, calls, and the values it hands out.

Amounts are int minor units; prices int micros of the minor unit per minute; times
int milliseconds since the Unix epoch (`*_ms`), given by the caller.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, NamedTuple, TypeVar

MAX_PREFIX_DIGITS: Final = 16

# Whether this module runs compiled by mypyc (scripts/build_compiled.py) or as Python.
COMPILED = not __file__.endswith(".py")


class AccountStatus(StrEnum):
    """What an account may do (AccountStatus in the contract)."""

    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    CLOSED = "CLOSED"


class CallState(StrEnum):
    """Where a call is in its life (CallState in the contract)."""

    ACTIVE = "ACTIVE"
    RELEASED = "RELEASED"
    EXPIRED = "EXPIRED"


class EntryKind(StrEnum):
    """Why a ledger entry changed a balance (EntryKind in the contract)."""

    TOP_UP = "TOP_UP"
    ADJUSTMENT = "ADJUSTMENT"
    CALL_CHARGE = "CALL_CHARGE"
    EXPIRY_CHARGE = "EXPIRY_CHARGE"
    REFUND = "REFUND"


@dataclass(frozen=True, slots=True)
class Rate:
    """The price of calls to destinations starting with `prefix`."""

    prefix: str
    price_per_minute_micros: int
    first_increment_seconds: int
    next_increment_seconds: int
    connect_fee: int


@dataclass(frozen=True, slots=True)
class Tariff:
    """Rates in one currency, looked up by the longest matching prefix."""

    tariff_id: str
    currency: str
    rates: tuple[Rate, ...]
    _by_prefix: dict[str, Rate] = field(init=False, repr=False, compare=False, hash=False)
    # The lengths its prefixes have, longest first: a lookup tries only these.
    _lengths: tuple[int, ...] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        by_prefix = {r.prefix: r for r in self.rates}
        lengths = sorted({len(p) for p in by_prefix if len(p) <= MAX_PREFIX_DIGITS}, reverse=True)
        object.__setattr__(self, "_by_prefix", by_prefix)
        object.__setattr__(self, "_lengths", tuple(lengths))

    def rate_for(self, destination: str) -> Rate | None:
        """The rate of the longest prefix of `destination` (digits only), if any."""
        by_prefix = self._by_prefix
        size = len(destination)
        for length in self._lengths:
            if length <= size:
                rate = by_prefix.get(destination[:length])
                if rate is not None:
                    return rate
        return None


# The values built on every step (grants, release results, ledger entries, call
# records) are NamedTuples, built by the new_* functions below: a tuple is the
# cheapest immutable object to build, in Python and compiled alike (a frozen
# dataclass's __init__ sets each field through object.__setattr__, ~3 us for a
# CallRecord; mypyc compiles the class but keeps that generated __init__).


class Grant(NamedTuple):
    """How long a call may last (Grant in the contract)."""

    call_id: str
    allowed_seconds: int
    final: bool
    validity_seconds: int
    held: int


class ReleaseResult(NamedTuple):
    """The answer to a Release, kept so that a repeat gets the same answer."""

    call_id: str
    used_seconds: int
    billed_seconds: int
    charged: int
    shortfall: int
    balance: int


class AccountView(NamedTuple):
    """An account as it stood at one instant (Account in the contract).

    A NamedTuple rather than a frozen dataclass: every remembered top-up keeps
    one, and a start from a snapshot builds a million of them.
    """

    account_id: str
    currency: str
    status: AccountStatus
    tariff_id: str
    balance: int
    reserved: int
    available: int
    credit_limit: int
    max_concurrent_calls: int
    active_calls: int
    low_balance_threshold: int = 0  # 0: off
    burn_micros: int = 0  # the open calls' price_per_minute_micros, summed


class LedgerEntry(NamedTuple):
    """One signed change of a balance. Entries of an account sum to its balance."""

    entry_id: int
    account_id: str
    kind: EntryKind
    amount: int
    balance_after: int
    call_id: str
    reference: str
    idempotency_key: str
    created_at_ms: int


class CallRecord(NamedTuple):
    """A call as it stood at one instant: what is written to history and read back."""

    call_id: str
    call_seq: int
    account_id: str
    destination: str
    state: CallState
    allowed_seconds: int
    used_seconds: int
    held: int
    charged: int
    shortfall: int
    rate: Rate
    started_at_ms: int
    ended_at_ms: int | None
    final: bool
    expires_at_ms: int | None
    last_sequence: int


@dataclass(slots=True, init=False)
class Call:
    """A call the state machine still remembers (open, or ended within the window).

    Its `__init__` is written out (`init=False`): mypyc compiles it, where it would keep
    the one `dataclasses` generates as interpreted Python (each Reserve builds a Call).
    """

    call_id: str
    call_seq: int  # order of reservation across the server: "oldest first"
    account_id: str
    destination: str  # digits, '+' removed
    requested_seconds: int  # as asked at Reserve, to recognise a repeat
    rate: Rate  # frozen at Reserve
    grant_seconds: int  # the g of the last Reserve/Renew, reused by re-grants
    validity_seconds: int
    started_at_ms: int
    expires_at_ms: int
    state: CallState = CallState.ACTIVE
    allowed_seconds: int = 0
    used_seconds: int = 0
    held: int = 0
    final: bool = False
    last_sequence: int = 0
    last_renew: Grant | None = None
    charged: int = 0
    shortfall: int = 0
    ended_at_ms: int | None = None
    release: ReleaseResult | None = None

    def __init__(
        self,
        call_id: str,
        call_seq: int,
        account_id: str,
        destination: str,
        requested_seconds: int,
        rate: Rate,
        grant_seconds: int,
        validity_seconds: int,
        started_at_ms: int,
        expires_at_ms: int,
        state: CallState = CallState.ACTIVE,
        allowed_seconds: int = 0,
        used_seconds: int = 0,
        held: int = 0,
        final: bool = False,
        last_sequence: int = 0,
        last_renew: Grant | None = None,
        charged: int = 0,
        shortfall: int = 0,
        ended_at_ms: int | None = None,
        release: ReleaseResult | None = None,
    ) -> None:
        self.call_id = call_id
        self.call_seq = call_seq
        self.account_id = account_id
        self.destination = destination
        self.requested_seconds = requested_seconds
        self.rate = rate
        self.grant_seconds = grant_seconds
        self.validity_seconds = validity_seconds
        self.started_at_ms = started_at_ms
        self.expires_at_ms = expires_at_ms
        self.state = state
        self.allowed_seconds = allowed_seconds
        self.used_seconds = used_seconds
        self.held = held
        self.final = final
        self.last_sequence = last_sequence
        self.last_renew = last_renew
        self.charged = charged
        self.shortfall = shortfall
        self.ended_at_ms = ended_at_ms
        self.release = release

    def grant(self) -> Grant:
        """The call's current grant."""
        return new_grant(
            self.call_id, self.allowed_seconds, self.final, self.validity_seconds, self.held
        )

    def record(self) -> CallRecord:
        """An immutable copy for history and reads."""
        return _new(
            CallRecord,
            (
                self.call_id,
                self.call_seq,
                self.account_id,
                self.destination,
                self.state,
                self.allowed_seconds,
                self.used_seconds,
                self.held,
                self.charged,
                self.shortfall,
                self.rate,
                self.started_at_ms,
                self.ended_at_ms,
                self.final,
                self.expires_at_ms if self.state is CallState.ACTIVE else None,
                self.last_sequence,
            ),
        )


class _NoCalls(Mapping[Any, "Call"]):
    """What an account with no open call holds for its open and final calls: one
    shared, read-only, empty mapping.

    A million accounts, most of them idle, held two empty dicts each (~160 MB,
    docs/benchmarks.md). Read-only, so a write that bypasses Account's methods fails
    instead of filling every idle account at once; a deep copy of the state shares it.
    """

    __slots__ = ()

    def __getitem__(self, key: Any) -> Call:
        raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __contains__(self, key: object) -> bool:
        return False

    def __deepcopy__(self, memo: dict[int, Any]) -> _NoCalls:
        return self


_NO_CALLS = _NoCalls()


def _no_calls() -> Mapping[Any, Call]:
    return _NO_CALLS


_K = TypeVar("_K")


def _with(calls: Mapping[_K, Call], key: _K, call: Call) -> Mapping[_K, Call]:
    """`calls` with `key` -> `call`: changed in place, or a new dict for the first one."""
    if isinstance(calls, dict):
        calls[key] = call
        return calls
    return {key: call}


def _without(calls: Mapping[_K, Call], key: _K) -> Mapping[_K, Call]:
    """`calls` without `key` (KeyError if it is not there); the shared empty one when
    none is left, so an account's memory does not depend on the calls it once had."""
    if len(calls) == 1 and key in calls:
        return _NO_CALLS
    if not isinstance(calls, dict):
        raise KeyError(key)
    del calls[key]
    return calls


@dataclass(slots=True)
class CurrencyTotals:
    """Money and calls of every account in one currency (minor units): the machine keeps
    them as they change, so metrics read them without a pass over the accounts."""

    balance: int = 0
    reserved: int = 0
    open_calls: int = 0


@dataclass(slots=True)
class Account:
    """A prepaid balance. `reserved` is the sum of the holds of its open calls."""

    account_id: str
    currency: str
    tariff_id: str
    credit_limit: int
    max_concurrent_calls: int
    status: AccountStatus = AccountStatus.ACTIVE
    balance: int = 0
    reserved: int = 0
    # Its open calls by call_id, in reservation order, and those of them whose grant is
    # final by call_seq (candidates for a re-grant). Read them freely; change them only
    # through open_call, close_call and set_final (an idle account shares _NO_CALLS).
    open_calls: Mapping[str, Call] = field(default_factory=_no_calls)
    final_calls: Mapping[int, Call] = field(default_factory=_no_calls)
    low_balance_threshold: int = 0  # 0: off
    # A LOW_BALANCE event was sent and no BALANCE_RESTORED since: the threshold is
    # disarmed. Always `threshold and available < threshold` at the end of a step.
    low: bool = False
    # Sum of the open calls' price_per_minute_micros: the burn rate (not imaged:
    # rebuilt from the open calls).
    burn_micros: int = 0

    @property
    def available(self) -> int:
        return self.balance + self.credit_limit - self.reserved

    def open_call(self, call: Call) -> None:
        """Add `call` to the open calls (and to the final ones if its grant is final)."""
        self.open_calls = _with(self.open_calls, call.call_id, call)
        if call.final:
            self.final_calls = _with(self.final_calls, call.call_seq, call)

    def close_call(self, call: Call) -> None:
        """Remove the open `call` (not final any more)."""
        self.set_final(call, False)
        self.open_calls = _without(self.open_calls, call.call_id)

    def set_final(self, call: Call, final: bool) -> None:
        """Set whether the open `call`'s grant is final, and the final calls with it."""
        call.final = final
        if final:
            self.final_calls = _with(self.final_calls, call.call_seq, call)
        elif call.call_seq in self.final_calls:
            self.final_calls = _without(self.final_calls, call.call_seq)

    def view(self) -> AccountView:
        return _new(
            AccountView,
            (
                self.account_id,
                self.currency,
                self.status,
                self.tariff_id,
                self.balance,
                self.reserved,
                self.available,
                self.credit_limit,
                self.max_concurrent_calls,
                len(self.open_calls),
                self.low_balance_threshold,
                self.burn_micros,
            ),
        )


class KeyRecord(NamedTuple):
    """A remembered TopUp/Adjust (StateMachine._keys): when, what was asked, and what was
    answered.

    One flat tuple: the answer's fields (an AccountView) but its account_id, which is
    the key's, and its available, which key_answer() derives. A start from a snapshot
    rebuilds one per key still in the window, a million at 1M accounts; a fingerprint
    tuple, an AccountView, a time-queue tuple and their copies of the account's
    strings took ~960 bytes a key (docs/benchmarks.md, issue 12).
    """

    at_ms: int
    kind: EntryKind
    amount: int
    text: str  # the TopUp's reference, the Adjust's reason
    currency: str
    status: AccountStatus
    tariff_id: str
    balance: int
    reserved: int
    credit_limit: int
    max_concurrent_calls: int
    active_calls: int
    low_balance_threshold: int
    burn_micros: int


def new_key_record(
    at_ms: int, kind: EntryKind, amount: int, text: str, answer: AccountView
) -> KeyRecord:
    return _new(
        KeyRecord,
        (at_ms, kind, amount, text, answer.currency, answer.status, answer.tariff_id,
         answer.balance, answer.reserved, answer.credit_limit, answer.max_concurrent_calls,
         answer.active_calls, answer.low_balance_threshold, answer.burn_micros),
    )  # fmt: skip


def key_answer(account_id: str, r: KeyRecord) -> AccountView:
    """The AccountView `r` was built from: the first answer, given again to a repeat."""
    return _new(
        AccountView,
        (account_id, r.currency, r.status, r.tariff_id, r.balance, r.reserved,
         r.balance + r.credit_limit - r.reserved, r.credit_limit, r.max_concurrent_calls,
         r.active_calls, r.low_balance_threshold, r.burn_micros),
    )  # fmt: skip


def burn_rate_per_minute(burn_micros: int) -> int:
    """Minor units per minute that open calls priced at `burn_micros` spend (rounded up)."""
    return -(-burn_micros // 1_000_000)


def seconds_until_empty(available: int, burn_micros: int) -> int | None:
    """How long `available` lasts at `burn_micros` per minute (rounded down); None: no burn."""
    if burn_micros <= 0:
        return None
    return max(available, 0) * 60_000_000 // burn_micros


_NT = TypeVar("_NT", bound=tuple[Any, ...])
_TUPLE_NEW: Final = tuple.__new__


def _new(cls: type[_NT], values: tuple[Any, ...]) -> _NT:
    """A NamedTuple from all of its fields in order, without the keyword-parsing __new__.

    tuple.__new__ skips the generated __new__ (~5x faster for 10 fields); callers
    pass every field, in order, so the value is the one the constructor would build.
    Compiled, `_TUPLE_NEW` is a C static: no method lookup on `tuple` per call.
    """
    return _TUPLE_NEW(cls, values)


def new_grant(
    call_id: str, allowed_seconds: int, final: bool, validity_seconds: int, held: int
) -> Grant:
    return _new(Grant, (call_id, allowed_seconds, final, validity_seconds, held))


def new_release_result(
    call_id: str, used_seconds: int, billed: int, charged: int, shortfall: int, balance: int
) -> ReleaseResult:
    return _new(ReleaseResult, (call_id, used_seconds, billed, charged, shortfall, balance))


def new_ledger_entry(
    entry_id: int,
    account_id: str,
    kind: EntryKind,
    amount: int,
    balance_after: int,
    call_id: str,
    reference: str,
    idempotency_key: str,
    created_at_ms: int,
) -> LedgerEntry:
    return _new(
        LedgerEntry,
        (
            entry_id,
            account_id,
            kind,
            amount,
            balance_after,
            call_id,
            reference,
            idempotency_key,
            created_at_ms,
        ),
    )
