"""The state image: what a snapshot stores of a StateMachine, record kind by record kind.

An image is a JSON object: the version, five scalars, and a list of rows per record
kind (tariffs, accounts, calls, idempotency keys). A row is a JSON array, not an
object: a snapshot holds millions of them, and field names would double its size.
Each row's fields, in order, are those of its NamedTuple below. A snapshot writes and
a start reads them by the million, so neither goes through these types: the writers
(`<kind>_row`) list the fields in order (building the NamedTuple by name made the
snapshot child ~4x slower at it: docs/benchmarks.md, "Start-up and the snapshot's tail,
again"), and the readers (`<kind>_of`) unpack a row into locals named as the fields, in
the fields' order (the NamedTuple's attribute access made a start from a snapshot 1.7x
slower, scripts/bench_core.py --mix from-image). tests/core/test_image.py checks both
against the NamedTuples by name.

Compatibility: every image a released version wrote must load in every later one.
A change to any row below (a field added, removed, reordered or re-encoded) bumps
IMAGE_VERSION, keeps a reader of the older versions, and commits a golden image of
the new version beside the others (tests/core/golden/). The current version's golden
image must equal what `StateMachine.image()` writes, so a change that forgets the bump
fails there.

Decoding a malformed row raises TypeError, ValueError or KeyError; the machine turns
those (and a version it cannot read) into InvariantViolation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from callcredit_server.core.model import (
    _NO_CALLS,
    Account,
    AccountStatus,
    Call,
    CallState,
    EntryKind,
    Grant,
    KeyRecord,
    Rate,
    ReleaseResult,
    Tariff,
    _new,
)

# 2: accounts carry their low-balance threshold and whether it fired (AccountRow), and
# remembered answers the threshold and burn rate (ViewRow). Version 1 rows lack them:
# read as threshold 0 (off), not fired, nothing burning.
IMAGE_VERSION = 2
READABLE_VERSIONS = frozenset({1, IMAGE_VERSION})
_ACCOUNT_V1_FIELDS = 8
_VIEW_V1_FIELDS = 10

# Enum lookups by value through a dict: calling the enum costs ~10x more.
_ACCOUNT_STATUS = {status.value: status for status in AccountStatus}
_CALL_STATE = {state.value: state for state in CallState}
_ENTRY_KIND = {kind.value: kind for kind in EntryKind}


class RateRow(NamedTuple):
    prefix: str
    price_per_minute_micros: int
    first_increment_seconds: int
    next_increment_seconds: int
    connect_fee: int


class TariffRow(NamedTuple):
    tariff_id: str
    currency: str
    rates: list[list[Any]]  # RateRow each


class AccountRow(NamedTuple):
    account_id: str
    currency: str
    tariff_id: str
    credit_limit: int
    max_concurrent_calls: int
    status: str  # AccountStatus value
    balance: int
    reserved: int
    low_balance_threshold: int  # version 2
    low: bool  # version 2: a LOW_BALANCE event fired and no BALANCE_RESTORED since


class GrantRow(NamedTuple):
    """The last renewal's answer (a Grant without its call id)."""

    allowed_seconds: int
    final: bool
    validity_seconds: int
    held: int


class ReleaseRow(NamedTuple):
    """The release's answer (a ReleaseResult without its call id)."""

    used_seconds: int
    billed_seconds: int
    charged: int
    shortfall: int
    balance: int


class CallRow(NamedTuple):
    call_id: str
    call_seq: int
    account_id: str
    destination: str
    requested_seconds: int
    rate: list[Any]  # RateRow
    grant_seconds: int
    validity_seconds: int
    started_at_ms: int
    expires_at_ms: int
    state: str  # CallState value
    allowed_seconds: int
    used_seconds: int
    held: int
    final: bool
    last_sequence: int
    last_renew: list[Any] | None  # GrantRow
    charged: int
    shortfall: int
    ended_at_ms: int | None
    release: list[Any] | None  # ReleaseRow


class ViewRow(NamedTuple):
    """An AccountView, its status as the enum's value."""

    account_id: str
    currency: str
    status: str
    tariff_id: str
    balance: int
    reserved: int
    available: int
    credit_limit: int
    max_concurrent_calls: int
    active_calls: int
    low_balance_threshold: int  # version 2
    burn_micros: int  # version 2


class KeyRow(NamedTuple):
    """A remembered TopUp/Adjust: when, whose, which key, what was asked and answered."""

    at_ms: int
    account_id: str
    key: str
    kind: str
    amount: int
    text: str
    answer: list[Any]  # ViewRow


class Header(NamedTuple):
    """The image's scalars (the object keys besides the rows)."""

    version: int
    now_ms: int
    last_entry_id: int
    last_call_seq: int
    ledger_total: int


def unsupported_version(image: dict[str, Any]) -> str | None:
    """Why this server cannot read `image`, or None if it can."""
    version = image.get("format")
    if version in READABLE_VERSIONS:
        return None
    return f"unsupported snapshot version {version!r} (this server reads {IMAGE_VERSION})"


def encode(
    header: Header,
    tariffs: list[list[Any]],
    accounts: list[list[Any]],
    calls: list[list[Any]],
    keys: list[list[Any]],
) -> dict[str, Any]:
    return {
        "format": header.version,
        "now_ms": header.now_ms,
        "last_entry_id": header.last_entry_id,
        "last_call_seq": header.last_call_seq,
        # A string: the sum over all accounts may outgrow 64 bits, balances cannot.
        "ledger_total": str(header.ledger_total),
        "tariffs": tariffs,
        "accounts": accounts,
        "calls": calls,
        "keys": keys,
    }


def decode_header(image: dict[str, Any]) -> Header:
    return Header(
        version=image["format"],
        now_ms=image["now_ms"],
        last_entry_id=image["last_entry_id"],
        last_call_seq=image["last_call_seq"],
        ledger_total=int(image["ledger_total"]),
    )


# Each kind of row: `<kind>_row` writes one as a JSON-able list, `<kind>_of` reads it.


def rate_row(rate: Rate) -> list[Any]:
    r = rate
    return [r.prefix, r.price_per_minute_micros, r.first_increment_seconds,
            r.next_increment_seconds, r.connect_fee]  # fmt: skip


def rate_of(row: list[Any], shared: dict[tuple[Any, ...], Rate]) -> Rate:
    """The Rate of a row; one per distinct rate of the image (calls to a prefix share it)."""
    key = tuple(row)
    rate = shared.get(key)
    if rate is None:
        (prefix, price_per_minute_micros, first_increment_seconds, next_increment_seconds,
         connect_fee) = row  # fmt: skip
        rate = shared[key] = Rate(
            prefix=prefix,
            price_per_minute_micros=price_per_minute_micros,
            first_increment_seconds=first_increment_seconds,
            next_increment_seconds=next_increment_seconds,
            connect_fee=connect_fee,
        )
    return rate


def tariff_row(tariff: Tariff) -> list[Any]:
    return [tariff.tariff_id, tariff.currency, [rate_row(r) for r in tariff.rates]]


def tariff_of(row: list[Any], shared: dict[tuple[Any, ...], Rate]) -> Tariff:
    tariff = TariffRow._make(row)
    rates = tuple(rate_of(r, shared) for r in tariff.rates)
    return Tariff(tariff.tariff_id, tariff.currency, rates)


def account_row(account: Account) -> list[Any]:
    a = account
    return [a.account_id, a.currency, a.tariff_id, a.credit_limit, a.max_concurrent_calls,
            a.status.value, a.balance, a.reserved, a.low_balance_threshold, a.low]  # fmt: skip


def account_of(row: list[Any], names: dict[str, str]) -> Account:
    """An Account (no open calls yet); the names every account repeats (currency,
    tariff) shared through `names`: a start from a snapshot builds a million here."""
    if len(row) == _ACCOUNT_V1_FIELDS:
        row = [*row, 0, False]
    (account_id, currency, tariff_id, credit_limit, max_concurrent_calls, status, balance,
     reserved, low_balance_threshold, low) = row  # fmt: skip
    return Account(
        account_id,
        names.setdefault(currency, currency),
        names.setdefault(tariff_id, tariff_id),
        credit_limit,
        max_concurrent_calls,
        _ACCOUNT_STATUS[status],
        balance,
        reserved,
        # given, not left to their default factories: two calls fewer per account
        open_calls=_NO_CALLS,
        final_calls=_NO_CALLS,
        low_balance_threshold=low_balance_threshold,
        low=low,
    )


def call_row(call: Call) -> list[Any]:
    c = call
    renew = c.last_renew
    ended = c.release
    return [
        c.call_id, c.call_seq, c.account_id, c.destination, c.requested_seconds,
        rate_row(c.rate), c.grant_seconds, c.validity_seconds, c.started_at_ms,
        c.expires_at_ms, c.state.value, c.allowed_seconds, c.used_seconds, c.held, c.final,
        c.last_sequence,
        None if renew is None  # GrantRow
        else [renew.allowed_seconds, renew.final, renew.validity_seconds, renew.held],
        c.charged, c.shortfall, c.ended_at_ms,
        None if ended is None  # ReleaseRow
        else [ended.used_seconds, ended.billed_seconds, ended.charged, ended.shortfall,
              ended.balance],
    ]  # fmt: skip


def call_of(row: list[Any], shared: dict[tuple[Any, ...], Rate]) -> Call:
    (call_id, call_seq, account_id, destination, requested_seconds, rate, grant_seconds,
     validity_seconds, started_at_ms, expires_at_ms, state, allowed_seconds, used_seconds,
     held, final, last_sequence, last_renew, charged, shortfall, ended_at_ms,
     release) = row  # fmt: skip
    renew = None if last_renew is None else GrantRow._make(last_renew)
    ended = None if release is None else ReleaseRow._make(release)
    return Call(
        call_id=call_id,
        call_seq=call_seq,
        account_id=account_id,
        destination=destination,
        requested_seconds=requested_seconds,
        rate=rate_of(rate, shared),
        grant_seconds=grant_seconds,
        validity_seconds=validity_seconds,
        started_at_ms=started_at_ms,
        expires_at_ms=expires_at_ms,
        state=_CALL_STATE[state],
        allowed_seconds=allowed_seconds,
        used_seconds=used_seconds,
        held=held,
        final=final,
        last_sequence=last_sequence,
        last_renew=None
        if renew is None
        else Grant(call_id, renew.allowed_seconds, renew.final, renew.validity_seconds, renew.held),
        charged=charged,
        shortfall=shortfall,
        ended_at_ms=ended_at_ms,
        release=None
        if ended is None
        else ReleaseResult(
            call_id,
            ended.used_seconds,
            ended.billed_seconds,
            ended.charged,
            ended.shortfall,
            ended.balance,
        ),
    )


def key_row(account_id: str, key: str, r: KeyRecord) -> list[Any]:
    answer = [  # ViewRow: what key_answer() gives, its available derived the same way
        account_id, r.currency, r.status.value, r.tariff_id, r.balance, r.reserved,
        r.balance + r.credit_limit - r.reserved, r.credit_limit, r.max_concurrent_calls,
        r.active_calls, r.low_balance_threshold, r.burn_micros,
    ]  # fmt: skip
    return [r.at_ms, account_id, key, r.kind.value, r.amount, r.text, answer]


def key_of(row: list[Any], names: dict[str, str]) -> tuple[str, str, KeyRecord]:
    """(account_id, key, what was asked and answered), the answer's currency and tariff
    shared through `names` as account_of does. The answer must be a view of an account:
    its available is balance + credit_limit - reserved (a KeyRecord derives it)."""
    at_ms, account_id, key, kind, amount, text, answer = row
    if len(answer) == _VIEW_V1_FIELDS:
        answer = [*answer, 0, 0]
    (_, currency, status, tariff_id, balance, reserved, available, credit_limit,
     max_concurrent_calls, active_calls, low_balance_threshold, burn_micros) = answer  # fmt: skip
    if available != balance + credit_limit - reserved:
        raise ValueError(f"key {key!r}: available {available} != balance + limit - reserved")
    record = _new(
        KeyRecord,
        (at_ms, _ENTRY_KIND[kind], amount, text, names.setdefault(currency, currency),
         _ACCOUNT_STATUS[status], names.setdefault(tariff_id, tariff_id), balance, reserved,
         credit_limit, max_concurrent_calls, active_calls, low_balance_threshold, burn_micros),
    )  # fmt: skip
    return account_id, key, record
