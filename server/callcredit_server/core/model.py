"""The state machine's data: accounts, tariffs, calls, and the values it hands out.

Amounts are int minor units; prices int micros of the minor unit per minute; times
int milliseconds since the Unix epoch (`*_ms`), given by the caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple, TypeVar

MAX_PREFIX_DIGITS = 16


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


@dataclass(frozen=True, slots=True)
class Grant:
    """How long a call may last (Grant in the contract)."""

    call_id: str
    allowed_seconds: int
    final: bool
    validity_seconds: int
    held: int


@dataclass(frozen=True, slots=True)
class ReleaseResult:
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


@dataclass(frozen=True, slots=True)
class LedgerEntry:
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


@dataclass(frozen=True, slots=True)
class CallRecord:
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


@dataclass(slots=True)
class Call:
    """A call the state machine still remembers (open, or ended within the window)."""

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

    def grant(self) -> Grant:
        """The call's current grant."""
        return new_grant(
            self.call_id, self.allowed_seconds, self.final, self.validity_seconds, self.held
        )

    def record(self) -> CallRecord:
        """An immutable copy for history and reads."""
        return new_call_record(
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
        )


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
    open_calls: dict[str, Call] = field(default_factory=dict)
    # Open calls whose grant is final, by call_seq: candidates for a re-grant.
    final_calls: dict[int, Call] = field(default_factory=dict)
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


def burn_rate_per_minute(burn_micros: int) -> int:
    """Minor units per minute that open calls priced at `burn_micros` spend (rounded up)."""
    return -(-burn_micros // 1_000_000)


def seconds_until_empty(available: int, burn_micros: int) -> int | None:
    """How long `available` lasts at `burn_micros` per minute (rounded down); None: no burn."""
    if burn_micros <= 0:
        return None
    return max(available, 0) * 60_000_000 // burn_micros


_T = TypeVar("_T")
_NT = TypeVar("_NT", bound=tuple[Any, ...])


def _new(cls: type[_NT], values: tuple[Any, ...]) -> _NT:
    """A NamedTuple from all of its fields in order, without the keyword-parsing __new__.

    tuple.__new__ skips the generated __new__ (~5x faster for 10 fields); callers
    pass every field, in order, so the value is the one the constructor would build.
    """
    return tuple.__new__(cls, values)


def positional_constructor(cls: type[_T]) -> Callable[..., _T]:
    """A constructor of the frozen, slotted dataclass `cls` taking every field in order.

    A frozen dataclass's __init__ assigns each field through object.__setattr__, ~3 us
    for a CallRecord's 16 fields; this one stores each through its slot descriptor, a
    third of that. The state machine builds records, grants and entries on every step.
    It builds the same value as cls(*values): no defaults, no __post_init__ (refused).
    """
    params = dataclasses.fields(cls)  # type: ignore[arg-type]
    if not hasattr(cls, "__slots__") or hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} must be slotted and have no __post_init__")
    names = [f"v{i}" for i in range(len(params))]
    body = "".join(f"    set{i}(obj, v{i})\n" for i in range(len(params)))
    source = f"def new({', '.join(names)}):\n    obj = new_object(cls)\n{body}    return obj\n"
    scope: dict[str, Any] = {"new_object": object.__new__, "cls": cls}
    for i, param in enumerate(params):
        scope[f"set{i}"] = cls.__dict__[param.name].__set__
    exec(source, scope)
    new: Callable[..., _T] = scope["new"]
    new.__qualname__ = new.__name__ = f"new_{cls.__name__}"
    return new


# Typed here, so that mypy checks every call as it would the class's own constructor.
new_grant: Callable[[str, int, bool, int, int], Grant] = positional_constructor(Grant)
new_release_result: Callable[[str, int, int, int, int, int], ReleaseResult] = (
    positional_constructor(ReleaseResult)
)
new_ledger_entry: Callable[[int, str, EntryKind, int, int, str, str, str, int], LedgerEntry] = (
    positional_constructor(LedgerEntry)
)
new_call_record: Callable[
    [
        str,  # call_id
        int,  # call_seq
        str,  # account_id
        str,  # destination
        CallState,  # state
        int,  # allowed_seconds
        int,  # used_seconds
        int,  # held
        int,  # charged
        int,  # shortfall
        Rate,  # rate
        int,  # started_at_ms
        int | None,  # ended_at_ms
        bool,  # final
        int | None,  # expires_at_ms
        int,  # last_sequence
    ],
    CallRecord,
] = positional_constructor(CallRecord)
