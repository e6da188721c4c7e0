"""Commands <-> compact JSON: the body of a journal record; a journal row's records;
and the history rows the projector stores.

The format is a persistent contract: a journal written today must replay after
any refactor of the command classes. So every kind name and every key is
spelled out here, never derived from class or field names, and a rename in
commands.py fails type checking here instead of silently changing the format.

Encoding is as strict as decoding (an `int` field must hold an `int`, not a
`bool`; an enum field its enum): a record that could not be read back must fail
when it is written, while the writer can still stop, not at the next start.

The codec must round-trip any value the command classes can hold, not only
valid ones: a command the state machine refuses is still journaled when calls
expired in the same step (`Step.changed`), and replay must refuse it the same way.

Bodies are ASCII (`ensure_ascii`): text such as a top-up reference may hold any
character, and an ASCII body is safe in any database text column (PostgreSQL
text cannot hold NUL; escaped as \\u0000 it can).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import orjson

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
from callcredit_server.core.events import Event, event_image
from callcredit_server.core.model import (
    AccountStatus,
    CallRecord,
    CallState,
    LedgerEntry,
    Rate,
    Tariff,
    _new,
)

__all__ = [
    "KINDS",
    "CodecError",
    "Projected",
    "Rows",
    "decode_command",
    "decode_row",
    "encode_command",
    "history_rows",
]

# The journal's `kind` column. Never rename one: journals on disk hold these.
KINDS: dict[type[Any], str] = {
    CreateAccount: "CreateAccount",
    UpdateAccount: "UpdateAccount",
    TopUp: "TopUp",
    Adjust: "Adjust",
    PutTariff: "PutTariff",
    Reserve: "Reserve",
    Renew: "Renew",
    Release: "Release",
    Tick: "Tick",
    Takeover: "Takeover",
}


class CodecError(ValueError):
    """A command cannot be encoded, or a body cannot be decoded into a command."""


# ------------------------------------------------------------------ encode


def _int(value: int, name: str) -> int:
    # bool is an int subclass; JSON would write `true`, which decodes as no int.
    if type(value) is not int:
        raise CodecError(f"{name}: expected int, got {type(value).__name__}")
    return value


def _str(value: str, name: str) -> str:
    if type(value) is not str:
        raise CodecError(f"{name}: expected str, got {type(value).__name__}")
    return value


def _rate_obj(rate: Rate, name: str) -> dict[str, object]:
    if type(rate) is not Rate:
        raise CodecError(f"{name}: expected Rate, got {type(rate).__name__}")
    return {
        "prefix": _str(rate.prefix, f"{name}.prefix"),
        "price_per_minute_micros": _int(
            rate.price_per_minute_micros, f"{name}.price_per_minute_micros"
        ),
        "first_increment_seconds": _int(
            rate.first_increment_seconds, f"{name}.first_increment_seconds"
        ),
        "next_increment_seconds": _int(
            rate.next_increment_seconds, f"{name}.next_increment_seconds"
        ),
        "connect_fee": _int(rate.connect_fee, f"{name}.connect_fee"),
    }


def _tariff_obj(tariff: Tariff) -> dict[str, object]:
    if type(tariff) is not Tariff or type(tariff.rates) is not tuple:
        raise CodecError("tariff: expected a Tariff with a tuple of rates")
    return {
        "tariff_id": _str(tariff.tariff_id, "tariff.tariff_id"),
        "currency": _str(tariff.currency, "tariff.currency"),
        "rates": [_rate_obj(r, f"tariff.rates[{i}]") for i, r in enumerate(tariff.rates)],
    }


def _typed(body: dict[str, object], *types: type) -> dict[str, object]:
    """`body`, once each value has exactly its type, in order (a bool is not an int).

    One comparison of the value types when all is well (this runs for every journal
    record); the field is named only when one is wrong."""
    if tuple([type(value) for value in body.values()]) != types:
        for (name, value), kind in zip(body.items(), types, strict=True):
            if type(value) is not kind:
                raise CodecError(f"{name}: expected {kind.__name__}, got {type(value).__name__}")
    return body


def _body(command: Command) -> dict[str, object]:
    # The three commands a dialer sends come first: they are most of a journal.
    match command:
        case Reserve():
            body = {
                "call_id": command.call_id,
                "account_id": command.account_id,
                "destination": command.destination,
                "requested_seconds": command.requested_seconds,
                "grant_seconds": command.grant_seconds,
                "validity_seconds": command.validity_seconds,
            }
            return _typed(body, str, str, str, int, int, int)
        case Renew():
            body = {
                "call_id": command.call_id,
                "sequence": command.sequence,
                "used_seconds": command.used_seconds,
                "requested_seconds": command.requested_seconds,
                "grant_seconds": command.grant_seconds,
                "validity_seconds": command.validity_seconds,
            }
            return _typed(body, str, int, int, int, int, int)
        case Release():
            body = {"call_id": command.call_id, "used_seconds": command.used_seconds}
            return _typed(body, str, int)
        case CreateAccount():
            body = {
                "account_id": command.account_id,
                "currency": command.currency,
                "tariff_id": command.tariff_id,
                "credit_limit": command.credit_limit,
                "max_concurrent_calls": command.max_concurrent_calls,
            }
            # Left out when off: records without a threshold stay as they were.
            if command.low_balance_threshold == 0:
                return _typed(body, str, str, str, int, int)
            body["low_balance_threshold"] = command.low_balance_threshold
            return _typed(body, str, str, str, int, int, int)
        case UpdateAccount():
            # Absent optional fields are left out, so "not given" stays distinct.
            out: dict[str, object] = {"account_id": _str(command.account_id, "account_id")}
            if command.status is not None:
                if not isinstance(command.status, AccountStatus):
                    raise CodecError("status: expected AccountStatus")
                out["status"] = command.status.value
            if command.tariff_id is not None:
                out["tariff_id"] = _str(command.tariff_id, "tariff_id")
            if command.credit_limit is not None:
                out["credit_limit"] = _int(command.credit_limit, "credit_limit")
            if command.max_concurrent_calls is not None:
                out["max_concurrent_calls"] = _int(
                    command.max_concurrent_calls, "max_concurrent_calls"
                )
            if command.low_balance_threshold is not None:
                out["low_balance_threshold"] = _int(
                    command.low_balance_threshold, "low_balance_threshold"
                )
            return out
        case TopUp():
            body = {
                "account_id": command.account_id,
                "amount": command.amount,
                "idempotency_key": command.idempotency_key,
                "reference": command.reference,
            }
            return _typed(body, str, int, str, str)
        case Adjust():
            body = {
                "account_id": command.account_id,
                "amount": command.amount,
                "idempotency_key": command.idempotency_key,
                "reason": command.reason,
            }
            return _typed(body, str, int, str, str)
        case PutTariff():
            return {"tariff": _tariff_obj(command.tariff)}
        case Tick():
            return _typed({"retention_ms": command.retention_ms}, int)
        case Takeover():
            return _typed({"epoch": command.epoch}, int)
    raise CodecError(f"not a command: {type(command).__name__}")


# The fallback encoder, for bodies orjson cannot write as ASCII: json.dumps with
# options would build a new encoder per call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, check_circular=False)


def _dumps(obj: dict[str, object]) -> str:
    """Compact ASCII JSON. orjson writes the same text as _ENCODER, ~5x faster, except
    that it keeps non-ASCII characters as UTF-8 (and refuses ints beyond 64 bits):
    those bodies, rare (ids are ASCII), go through _ENCODER."""
    try:
        raw = orjson.dumps(obj)
    except orjson.JSONEncodeError:
        return _ENCODER.encode(obj)
    return raw.decode() if raw.isascii() else _ENCODER.encode(obj)


def encode_command(command: Command) -> tuple[str, str]:
    """The (kind, body) of `command`: body is compact, ASCII-only JSON."""
    kind = KINDS.get(type(command))
    if kind is None:
        raise CodecError(f"not a command: {type(command).__name__}")
    return kind, _dumps(_body(command))


# ------------------------------------------------------------------ decode


class _Fields:
    """One JSON object being decoded: typed access, and no key left unread."""

    __slots__ = ("_obj", "_read", "_where")

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise CodecError(f"{where or 'body'}: expected an object")
        self._obj: dict[str, object] = obj
        self._read: set[str] = set()
        self._where = where

    def _name(self, key: str) -> str:
        return f"{self._where}.{key}" if self._where else key

    def _get(self, key: str) -> object:
        try:
            value = self._obj[key]
        except KeyError:
            raise CodecError(f"{self._name(key)}: missing") from None
        self._read.add(key)
        return value

    def has(self, key: str) -> bool:
        return key in self._obj

    def text(self, key: str) -> str:
        value = self._get(key)
        if type(value) is not str:
            raise CodecError(f"{self._name(key)}: expected a string")
        return value

    def integer(self, key: str) -> int:
        value = self._get(key)
        if type(value) is not int:  # rejects true/false and 1.0
            raise CodecError(f"{self._name(key)}: expected an integer")
        return value

    def items(self, key: str) -> list[object]:
        value = self._get(key)
        if type(value) is not list:
            raise CodecError(f"{self._name(key)}: expected a list")
        return value

    def obj(self, key: str) -> _Fields:
        return _Fields(self._get(key), self._name(key))

    def status(self, key: str) -> AccountStatus:
        value = self.text(key)
        try:
            return AccountStatus(value)
        except ValueError:
            raise CodecError(f"{self._name(key)}: unknown status {value!r}") from None

    def done(self) -> None:
        if len(self._read) == len(self._obj):  # every key read (_read holds only keys)
            return
        extra = sorted(set(self._obj) - self._read)
        if extra:
            raise CodecError(f"{self._where or 'body'}: unexpected keys {extra}")


def _rate(f: _Fields) -> Rate:
    rate = Rate(
        prefix=f.text("prefix"),
        price_per_minute_micros=f.integer("price_per_minute_micros"),
        first_increment_seconds=f.integer("first_increment_seconds"),
        next_increment_seconds=f.integer("next_increment_seconds"),
        connect_fee=f.integer("connect_fee"),
    )
    f.done()
    return rate


def _tariff(f: _Fields) -> Tariff:
    tariff_id = f.text("tariff_id")
    currency = f.text("currency")
    rates = tuple(
        _rate(_Fields(item, f"tariff.rates[{i}]")) for i, item in enumerate(f.items("rates"))
    )
    f.done()
    return Tariff(tariff_id=tariff_id, currency=currency, rates=rates)


def _create_account(f: _Fields) -> Command:
    return CreateAccount(
        account_id=f.text("account_id"),
        currency=f.text("currency"),
        tariff_id=f.text("tariff_id"),
        credit_limit=f.integer("credit_limit"),
        max_concurrent_calls=f.integer("max_concurrent_calls"),
        low_balance_threshold=(
            f.integer("low_balance_threshold") if f.has("low_balance_threshold") else 0
        ),
    )


def _update_account(f: _Fields) -> Command:
    return UpdateAccount(
        account_id=f.text("account_id"),
        status=f.status("status") if f.has("status") else None,
        tariff_id=f.text("tariff_id") if f.has("tariff_id") else None,
        credit_limit=f.integer("credit_limit") if f.has("credit_limit") else None,
        max_concurrent_calls=(
            f.integer("max_concurrent_calls") if f.has("max_concurrent_calls") else None
        ),
        low_balance_threshold=(
            f.integer("low_balance_threshold") if f.has("low_balance_threshold") else None
        ),
    )


def _top_up(f: _Fields) -> Command:
    return TopUp(
        account_id=f.text("account_id"),
        amount=f.integer("amount"),
        idempotency_key=f.text("idempotency_key"),
        reference=f.text("reference"),
    )


def _adjust(f: _Fields) -> Command:
    return Adjust(
        account_id=f.text("account_id"),
        amount=f.integer("amount"),
        idempotency_key=f.text("idempotency_key"),
        reason=f.text("reason"),
    )


def _put_tariff(f: _Fields) -> Command:
    return PutTariff(tariff=_tariff(f.obj("tariff")))


# The three commands a dialer sends are most of a journal, decoded by the projector and
# every start: built from their fields in order with tuple.__new__ (model._new), as
# convert.py builds them from a request; a NamedTuple's keyword-parsing __new__ stays
# interpreted Python when compiled, ~5,600 instructions of a Renew's ~17,000.
# tests/journal/test_journal.py round-trips each with a distinct value in every field.
def _reserve(f: _Fields) -> Command:
    return _new(
        Reserve,
        (
            f.text("call_id"),
            f.text("account_id"),
            f.text("destination"),
            f.integer("requested_seconds"),
            f.integer("grant_seconds"),
            f.integer("validity_seconds"),
        ),
    )


def _renew(f: _Fields) -> Command:
    return _new(
        Renew,
        (
            f.text("call_id"),
            f.integer("sequence"),
            f.integer("used_seconds"),
            f.integer("requested_seconds"),
            f.integer("grant_seconds"),
            f.integer("validity_seconds"),
        ),
    )


def _release(f: _Fields) -> Command:
    return _new(Release, (f.text("call_id"), f.integer("used_seconds")))


def _tick(f: _Fields) -> Command:
    return Tick(retention_ms=f.integer("retention_ms"))


def _takeover(f: _Fields) -> Command:
    return Takeover(epoch=f.integer("epoch"))


_DECODERS: dict[str, Callable[[_Fields], Command]] = {
    "CreateAccount": _create_account,
    "UpdateAccount": _update_account,
    "TopUp": _top_up,
    "Adjust": _adjust,
    "PutTariff": _put_tariff,
    "Reserve": _reserve,
    "Renew": _renew,
    "Release": _release,
    "Tick": _tick,
    "Takeover": _takeover,
}


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads would keep the last of two equal keys; a body like that was not
    # written by encode_command, so it is refused rather than guessed at.
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise CodecError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> object:
    raise CodecError(f"not a JSON number: {name}")


# The strict decoder: one for all bodies (json.loads would build one per call).
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_reject_constant)


def _loads(kind: str, body: str) -> object:
    """The JSON value of `body`, strictly. The mirror of _dumps: orjson reads it ~5x
    faster, and a body that orjson writes back as the same text is exactly what
    _dumps wrote: no repeated key (which orjson would drop), no constant such as NaN
    (which orjson refuses), nothing but compact ASCII JSON. Any other body (non-ASCII
    text escaped, a body not written by this codec) goes through _DECODER."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    else:
        if orjson.dumps(obj) == body.encode():
            return obj
    try:
        return _DECODER.decode(body)
    except (json.JSONDecodeError, TypeError, RecursionError) as exc:
        raise CodecError(f"{kind}: body is not JSON: {exc}") from exc


def decode_command(kind: str, body: str) -> Command:
    """The command journaled as (kind, body); CodecError if either is not ours."""
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise CodecError(f"unknown command kind {kind!r}")
    fields = _Fields(_loads(kind, body), "")
    command = decoder(fields)
    fields.done()
    return command


# ------------------------------------------------------------------ journal rows


def decode_row(seq: int, last_seq: int, at_ms: int, body: str) -> list[tuple[int, int, Command]]:
    """The (seq, at_ms, command) records of a journal row (one group commit's: a JSON
    list of [at_ms, kind, body]) whose checksum matched; CodecError, naming the seq, if
    it does not hold them."""
    span = f"journal seq {seq}..{last_seq}"
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise CodecError(f"{span}: the row is not JSON: {exc}") from exc
    if not isinstance(items, list) or len(items) != last_seq - seq + 1:
        raise CodecError(f"{span}: the row does not hold {last_seq - seq + 1} records")
    records = []
    for n, item in enumerate(items, seq):
        # Type checks written out: a `match` on a sequence pattern cost more than the
        # decoding of the command it guards.
        if type(item) is not list or len(item) != 3:
            raise CodecError(f"journal seq {n}: not [at_ms, kind, body]")
        time, kind, text = item
        if type(time) is not int or type(kind) is not str or type(text) is not str:
            raise CodecError(f"journal seq {n}: not [at_ms, kind, body]")
        try:
            records.append((n, time, decode_command(kind, text)))
        except CodecError as exc:
            raise CodecError(f"journal seq {n}: {exc}") from exc
    if records[-1][1] != at_ms:
        raise CodecError(f"{span}: the row's time is not its last record's")
    return records


# ------------------------------------------------------------------ history rows

# Rows are tuples in their table's column order (journal.py checks it at import): the
# driver's executemany takes them as they are, without SQLAlchemy building a parameter
# dict per row, which cost more than the database did.
Rows = list[tuple[object, ...]]


class Projected(NamedTuple):
    """What the projector derived from one journal record, for `Journal.project` to
    store."""

    seq: int
    at_ms: int
    events: Sequence[Event]
    entries: Sequence[LedgerEntry]  # the step's own lists, never changed after
    calls: Sequence[CallRecord]


def _entry_row(entry: LedgerEntry, seq: int) -> tuple[object, ...]:
    return (
        entry.entry_id,
        entry.account_id,
        entry.kind.value,
        entry.amount,
        entry.balance_after,
        entry.call_id,
        entry.reference,
        entry.idempotency_key,
        entry.created_at_ms,
        seq,
    )


def _call_row(call: CallRecord, seq: int) -> tuple[object, ...]:
    rate = call.rate
    return (
        call.call_id,
        call.call_seq,
        call.account_id,
        call.destination,
        call.state.value,
        call.allowed_seconds,
        call.used_seconds,
        call.held,
        call.charged,
        call.shortfall,
        rate.prefix,
        rate.price_per_minute_micros,
        rate.first_increment_seconds,
        rate.next_increment_seconds,
        rate.connect_fee,
        call.started_at_ms,
        call.ended_at_ms,
        call.final,
        call.expires_at_ms,
        call.last_sequence,
        seq,
    )


def history_rows(records: Sequence[Projected], calls_before: int) -> tuple[Rows, Rows, Rows, Rows]:
    """The event, entry and call rows of a projection; the call rows in two lists: of
    the calls created in the records (call_seq after `calls_before`), and of older ones
    that have ended. An older call still open gets none: its row was stored with an
    earlier projection, and its later snapshots stay in memory (journal.project). A
    call touched several times keeps only its last snapshot (one row per call, which ON
    CONFLICT DO UPDATE needs within one statement on PostgreSQL)."""
    event_rows: Rows = []
    entry_rows: Rows = []
    latest: dict[str, tuple[CallRecord, int]] = {}  # call id -> its last snapshot, and seq
    for seq, at_ms, events, entries, calls in records:
        if events:
            body = orjson.dumps([event_image(e) for e in events]).decode()
            event_rows.append((seq, at_ms, body))
        for entry in entries:
            entry_rows.append(_entry_row(entry, seq))
        for call in calls:
            latest[call.call_id] = (call, seq)  # the last one wins; its row is built once
    new_calls: Rows = []
    ended_calls: Rows = []
    for call, seq in latest.values():
        if call.call_seq > calls_before:
            new_calls.append(_call_row(call, seq))
        elif call.state is not CallState.ACTIVE:
            ended_calls.append(_call_row(call, seq))
    return event_rows, entry_rows, new_calls, ended_calls
