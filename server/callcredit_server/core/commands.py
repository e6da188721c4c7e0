"""Commands: every change the state machine accepts, as plain values.

A command is what the journal records (with the time it was applied), so it
carries every setting its outcome depends on: a Reserve carries its resolved
grant and validity, a Tick its retention, so replay is exact whatever the flags
of the restarted server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from callcredit_server.core.model import AccountStatus, Tariff


@dataclass(frozen=True, slots=True)
class CreateAccount:
    account_id: str
    currency: str
    tariff_id: str
    credit_limit: int
    max_concurrent_calls: int
    low_balance_threshold: int = 0  # 0: off


@dataclass(frozen=True, slots=True)
class UpdateAccount:
    account_id: str
    status: AccountStatus | None = None
    tariff_id: str | None = None
    credit_limit: int | None = None
    max_concurrent_calls: int | None = None
    low_balance_threshold: int | None = None


@dataclass(frozen=True, slots=True)
class TopUp:
    account_id: str
    amount: int
    idempotency_key: str
    reference: str


@dataclass(frozen=True, slots=True)
class Adjust:
    account_id: str
    amount: int
    idempotency_key: str
    reason: str


@dataclass(frozen=True, slots=True)
class PutTariff:
    tariff: Tariff


# The dialer's three commands, one per operation, are NamedTuples: the cheapest
# immutable value to build (a quarter of a frozen dataclass's __init__). No two of
# them can be equal: they differ in length or in the type of their second field.
class Reserve(NamedTuple):
    call_id: str
    account_id: str
    destination: str
    requested_seconds: int
    grant_seconds: int  # g = min(requested or default, max), resolved by the server
    validity_seconds: int


class Renew(NamedTuple):
    call_id: str
    sequence: int
    used_seconds: int
    requested_seconds: int
    grant_seconds: int
    validity_seconds: int


class Release(NamedTuple):
    call_id: str
    used_seconds: int


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passes: expire calls past their validity, forget what left the window."""

    retention_ms: int


@dataclass(frozen=True, slots=True)
class Takeover:
    """A new primary's first command (hot standby, docs/operations.md): every open
    call's validity restarts now, so the seconds during which no server answered its
    dialer do not expire it. Calls past their deadline are NOT expired first."""

    epoch: int  # the lease epoch the new primary took, for the record


Command = (
    CreateAccount
    | UpdateAccount
    | TopUp
    | Adjust
    | PutTariff
    | Reserve
    | Renew
    | Release
    | Tick
    | Takeover
)
