"""Input limits (docs/design.md, Contract): checked before anything else, changing nothing.

`violations` returns the field violations of one command, empty when valid.
`is_valid` answers the same question without building them: the state machine asks
it on every step, and only a refused command needs the violations spelled out.
"""

from __future__ import annotations

import re
from typing import Final, cast

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
from callcredit_server.core.model import MAX_PREFIX_DIGITS

ID_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
ID_RULE = "must be 1-128 characters of [A-Za-z0-9._:@-]"
DESTINATION_PATTERN = re.compile(r"\+?[0-9]{1,32}")
CURRENCY_PATTERN = re.compile(r"[A-Z]{3}")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
PREFIX_PATTERN = re.compile(rf"[0-9]{{0,{MAX_PREFIX_DIGITS}}}")
MAX_AMOUNT: Final = 10**15
MAX_CREDIT_LIMIT: Final = 10**15
MAX_LOW_BALANCE_THRESHOLD: Final = 10**15
MAX_BALANCE: Final = 10**18  # keeps every balance well inside int64
MAX_EPOCH: Final = 2**62  # a lease epoch (bigint in the journal)
MAX_PRICE_PER_MINUTE_MICROS: Final = 10**12
MAX_INCREMENT_SECONDS: Final = 3_600
MAX_CONNECT_FEE: Final = 10**9
MAX_SECONDS: Final = 86_400
MAX_RATES_PER_TARIFF: Final = 10_000
MAX_CALLS: Final = 1_000_000  # max_concurrent_calls
MAX_TEXT_CHARS: Final = 256  # top-up reference, adjustment reason
MAX_SEQUENCE: Final = 2**63 - 1

Violations = list[tuple[str, str]]
_ID_MATCH: Final = ID_PATTERN.fullmatch  # compiled: a C static, not a dict lookup per call


def is_id(text: str) -> bool:
    """`ID_PATTERN.fullmatch(text)`, as a bool: the one id check (violations, is_valid,
    the servicer)."""
    return _ID_MATCH(text) is not None


def _id(out: Violations, name: str, value: str) -> None:
    if not is_id(value):
        out.append((name, ID_RULE))


def _range(out: Violations, name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        out.append((name, f"must be between {low} and {high}"))


def _text(out: Violations, name: str, value: str) -> None:
    if len(value) > MAX_TEXT_CHARS:
        out.append((name, f"must be at most {MAX_TEXT_CHARS} characters"))
    elif CONTROL_CHARACTERS.search(value):
        # PostgreSQL text cannot hold NUL, and no reference needs a control character.
        out.append((name, "must not contain control characters"))


def _currency(out: Violations, value: str) -> None:
    if not CURRENCY_PATTERN.fullmatch(value):
        out.append(("currency", "must be three upper-case letters (ISO 4217)"))


def _seconds(out: Violations, name: str, value: int) -> None:
    _range(out, name, value, 0, MAX_SECONDS)


def violations(command: Command) -> Violations:
    """Every way `command` breaks the input limits."""
    out: Violations = []
    match command:
        case CreateAccount():
            _id(out, "account_id", command.account_id)
            _currency(out, command.currency)
            _id(out, "tariff_id", command.tariff_id)
            _range(out, "credit_limit", command.credit_limit, 0, MAX_CREDIT_LIMIT)
            _range(out, "max_concurrent_calls", command.max_concurrent_calls, 0, MAX_CALLS)
            _range(
                out,
                "low_balance_threshold",
                command.low_balance_threshold,
                0,
                MAX_LOW_BALANCE_THRESHOLD,
            )
        case UpdateAccount():
            _id(out, "account_id", command.account_id)
            if command.tariff_id is not None:
                _id(out, "tariff_id", command.tariff_id)
            if command.credit_limit is not None:
                _range(out, "credit_limit", command.credit_limit, 0, MAX_CREDIT_LIMIT)
            if command.max_concurrent_calls is not None:
                _range(
                    out,
                    "max_concurrent_calls",
                    command.max_concurrent_calls,
                    0,
                    MAX_CALLS,
                )
            if command.low_balance_threshold is not None:
                _range(
                    out,
                    "low_balance_threshold",
                    command.low_balance_threshold,
                    0,
                    MAX_LOW_BALANCE_THRESHOLD,
                )
        case TopUp():
            _id(out, "account_id", command.account_id)
            _range(out, "amount", command.amount, 1, MAX_AMOUNT)
            _id(out, "idempotency_key", command.idempotency_key)
            _text(out, "reference", command.reference)
        case Adjust():
            _id(out, "account_id", command.account_id)
            _range(out, "amount", command.amount, -MAX_AMOUNT, MAX_AMOUNT)
            if command.amount == 0:
                out.append(("amount", "must not be zero"))
            _id(out, "idempotency_key", command.idempotency_key)
            _text(out, "reason", command.reason)
        case PutTariff():
            _tariff(out, command)
        case Reserve():
            _id(out, "call_id", command.call_id)
            _id(out, "account_id", command.account_id)
            if not DESTINATION_PATTERN.fullmatch(command.destination):
                out.append(("destination", "must be 1-32 digits after an optional '+'"))
            _seconds(out, "requested_seconds", command.requested_seconds)
        case Renew():
            _id(out, "call_id", command.call_id)
            _range(out, "sequence", command.sequence, 1, MAX_SEQUENCE)
            _seconds(out, "used_seconds", command.used_seconds)
            _seconds(out, "requested_seconds", command.requested_seconds)
        case Release():
            _id(out, "call_id", command.call_id)
            _seconds(out, "used_seconds", command.used_seconds)
        case Tick():
            pass
        case Takeover():
            _range(out, "epoch", command.epoch, 1, MAX_EPOCH)
    return out


def _tariff(out: Violations, command: PutTariff) -> None:
    tariff = command.tariff
    _id(out, "tariff.tariff_id", tariff.tariff_id)
    if not CURRENCY_PATTERN.fullmatch(tariff.currency):
        out.append(("tariff.currency", "must be three upper-case letters (ISO 4217)"))
    if len(tariff.rates) > MAX_RATES_PER_TARIFF:
        out.append(("tariff.rates", f"must hold at most {MAX_RATES_PER_TARIFF} rates"))
        return
    seen: set[str] = set()
    for i, rate in enumerate(tariff.rates):
        name = f"tariff.rates[{i}]"
        if not PREFIX_PATTERN.fullmatch(rate.prefix):
            out.append((f"{name}.prefix", f"must be 0-{MAX_PREFIX_DIGITS} digits"))
        elif rate.prefix in seen:
            out.append((f"{name}.prefix", "must be unique within the tariff"))
        seen.add(rate.prefix)
        _range(
            out,
            f"{name}.price_per_minute_micros",
            rate.price_per_minute_micros,
            0,
            MAX_PRICE_PER_MINUTE_MICROS,
        )
        for field_name in ("first_increment_seconds", "next_increment_seconds"):
            _range(out, f"{name}.{field_name}", getattr(rate, field_name), 1, MAX_INCREMENT_SECONDS)
        _range(out, f"{name}.connect_fee", rate.connect_fee, 0, MAX_CONNECT_FEE)


# ------------------------------------------------------------ fast path

# is_valid(c) == (violations(c) == []) for every command; tests/core/test_validation.py
# holds the two to that over every limit. Only the commands of the hot path get a
# predicate of their own; the others ask violations(). `Final`: compiled, each is read
# from a C static, not looked up in the module's dict per call.
_DESTINATION_MATCH: Final = DESTINATION_PATTERN.fullmatch
_CURRENCY_MATCH: Final = CURRENCY_PATTERN.fullmatch


def _reserve_ok(c: Reserve) -> bool:
    return (
        is_id(c.call_id)
        and is_id(c.account_id)
        and _DESTINATION_MATCH(c.destination) is not None
        and 0 <= c.requested_seconds <= MAX_SECONDS
    )


def _renew_ok(c: Renew) -> bool:
    return (
        is_id(c.call_id)
        and 1 <= c.sequence <= MAX_SEQUENCE
        and 0 <= c.used_seconds <= MAX_SECONDS
        and 0 <= c.requested_seconds <= MAX_SECONDS
    )


def _release_ok(c: Release) -> bool:
    return is_id(c.call_id) and 0 <= c.used_seconds <= MAX_SECONDS


def _create_account_ok(c: CreateAccount) -> bool:
    return (
        is_id(c.account_id)
        and _CURRENCY_MATCH(c.currency) is not None
        and is_id(c.tariff_id)
        and 0 <= c.credit_limit <= MAX_CREDIT_LIMIT
        and 0 <= c.max_concurrent_calls <= MAX_CALLS
        and 0 <= c.low_balance_threshold <= MAX_LOW_BALANCE_THRESHOLD
    )


def is_valid(command: Command) -> bool:
    """Whether `command` is within the input limits: `not violations(command)`, faster.
    By exact type, most frequent first: direct calls where compiled, no dict of them."""
    kind = type(command)
    if kind is Renew:
        return _renew_ok(cast(Renew, command))
    if kind is Reserve:
        return _reserve_ok(cast(Reserve, command))
    if kind is Release:
        return _release_ok(cast(Release, command))
    if kind is Tick:
        return True
    if kind is CreateAccount:
        return _create_account_ok(cast(CreateAccount, command))
    return not violations(command)
