"""Outcomes: what the state machine answers, as named values.

A refusal is a `Refused` with a `Reason` (docs/design.md, Errors); it changed nothing.
Pushes are what the server must tell dialers beyond the answer itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from callcredit_server.core.model import AccountView, Grant, ReleaseResult, Tariff, _new


class Reason(StrEnum):
    """Why a request was refused: each is the contract's ErrorReason of the same name
    (error_reason.proto; errors.py maps them, tests/test_error_reasons.py checks)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    ACCOUNT_NOT_FOUND = "ACCOUNT_NOT_FOUND"
    TARIFF_NOT_FOUND = "TARIFF_NOT_FOUND"
    CALL_NOT_FOUND = "CALL_NOT_FOUND"
    ACCOUNT_EXISTS = "ACCOUNT_EXISTS"
    CALL_ID_CONFLICT = "CALL_ID_CONFLICT"
    IDEMPOTENCY_KEY_CONFLICT = "IDEMPOTENCY_KEY_CONFLICT"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    ACCOUNT_SUSPENDED = "ACCOUNT_SUSPENDED"
    ACCOUNT_CLOSED = "ACCOUNT_CLOSED"
    NO_RATE_FOR_DESTINATION = "NO_RATE_FOR_DESTINATION"
    CALL_ALREADY_ENDED = "CALL_ALREADY_ENDED"
    CURRENCY_MISMATCH = "CURRENCY_MISMATCH"
    # Beyond the brief (docs/design.md, Decisions beyond the brief): closing an
    # account that still has open calls.
    ACCOUNT_HAS_OPEN_CALLS = "ACCOUNT_HAS_OPEN_CALLS"
    CONCURRENT_CALL_LIMIT = "CONCURRENT_CALL_LIMIT"


class AccessReason(StrEnum):
    """Refusals decided before the state machine, never by it (so not a `Reason`).

    A dialer token may act only on its tenant's accounts (auth.py); the writer refuses
    a Renew or Release of another tenant's call before applying it.
    """

    PERMISSION_DENIED = "PERMISSION_DENIED"


@dataclass(frozen=True, slots=True)
class Refused:
    reason: Reason | AccessReason
    message: str
    field_violations: tuple[tuple[str, str], ...] = ()


# The answers of every step are NamedTuples (as the values they carry, model.py): a
# tuple is the cheapest immutable object to build. No two of them can be equal: what
# they hold differs in length.
class AccountResult(NamedTuple):
    account: AccountView


@dataclass(frozen=True, slots=True)
class TariffResult:
    tariff: Tariff


class GrantResult(NamedTuple):
    grant: Grant


class ReleaseOutcome(NamedTuple):
    result: ReleaseResult


# The hot path's two outcomes, built as model.new_grant builds a Grant: a NamedTuple's
# own __new__ stays interpreted Python when compiled (~2,300 instructions a call).
def grant_result(grant: Grant) -> GrantResult:
    return _new(GrantResult, (grant,))


def release_outcome(result: ReleaseResult) -> ReleaseOutcome:
    return _new(ReleaseOutcome, (result,))


@dataclass(frozen=True, slots=True)
class TickResult:
    expired: int
    forgotten: int


@dataclass(frozen=True, slots=True)
class TakeoverResult:
    restarted: int  # open calls whose validity restarted


Outcome = (
    Refused
    | AccountResult
    | TariffResult
    | GrantResult
    | ReleaseOutcome
    | TickResult
    | TakeoverResult
)


@dataclass(frozen=True, slots=True)
class GrantPush:
    """A call's final grant was extended: tell the stream that carries it."""

    grant: Grant

    @property
    def call_id(self) -> str:
        return self.grant.call_id


@dataclass(frozen=True, slots=True)
class Termination:
    """Order the dialer carrying `call_id` to hang up now."""

    call_id: str
    reason: str


Push = GrantPush | Termination
