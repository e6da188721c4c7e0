"""Translation between callcredit.v1 messages and the core's values.

Nothing here decides anything: it only moves fields. Server settings enter
commands here (the grant a request gets when it names none, the validity), so
the journal records what each command was really given.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import timestamp_pb2

from callcredit.v1 import admin_pb2, credit_control_pb2
from callcredit_server.core import (
    AccountStatus,
    AccountView,
    CallRecord,
    CallState,
    EntryKind,
    Grant,
    LedgerEntry,
    Rate,
    Release,
    ReleaseResult,
    Renew,
    Reserve,
    Tariff,
)
from callcredit_server.core.events import Event, EventKind
from callcredit_server.core.model import burn_rate_per_minute, seconds_until_empty


@dataclass(frozen=True, slots=True)
class GrantPolicy:
    """Server settings that size grants: --grant-seconds, --max-grant-seconds, validity."""

    grant_seconds: int
    max_grant_seconds: int
    validity_seconds: int

    def grant_for(self, requested_seconds: int) -> int:
        """min(requested_seconds or grant_seconds, max_grant_seconds), without min():
        one per Reserve and Renew, where min() was a sixth of building the command."""
        grant = requested_seconds or self.grant_seconds
        return grant if grant <= self.max_grant_seconds else self.max_grant_seconds


_STATUS_TO_PB = {
    AccountStatus.ACTIVE: admin_pb2.ACCOUNT_STATUS_ACTIVE,
    AccountStatus.SUSPENDED: admin_pb2.ACCOUNT_STATUS_SUSPENDED,
    AccountStatus.CLOSED: admin_pb2.ACCOUNT_STATUS_CLOSED,
}
STATUS_FROM_PB = {pb: status for status, pb in _STATUS_TO_PB.items()}
_CALL_STATE_TO_PB = {
    CallState.ACTIVE: admin_pb2.CALL_STATE_ACTIVE,
    CallState.RELEASED: admin_pb2.CALL_STATE_RELEASED,
    CallState.EXPIRED: admin_pb2.CALL_STATE_EXPIRED,
}
_KIND_TO_PB = {
    EntryKind.TOP_UP: admin_pb2.ENTRY_KIND_TOP_UP,
    EntryKind.ADJUSTMENT: admin_pb2.ENTRY_KIND_ADJUSTMENT,
    EntryKind.CALL_CHARGE: admin_pb2.ENTRY_KIND_CALL_CHARGE,
    EntryKind.EXPIRY_CHARGE: admin_pb2.ENTRY_KIND_EXPIRY_CHARGE,
    EntryKind.REFUND: admin_pb2.ENTRY_KIND_REFUND,
}


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


# --------------------------------------------------------------- to commands


# The dialer's commands are built from all of their fields in order with tuple.__new__,
# skipping the NamedTuple's keyword-parsing __new__ (a sixth of its cost): one per
# operation on the Control stream.
_new_tuple = tuple.__new__


def reserve(msg: credit_control_pb2.ReserveRequest, policy: GrantPolicy) -> Reserve:
    requested = msg.requested_seconds
    grant = policy.grant_for(requested)
    return _new_tuple(
        Reserve,
        (msg.call_id, msg.account_id, msg.destination, requested, grant, policy.validity_seconds),
    )


def renew(msg: credit_control_pb2.RenewRequest, policy: GrantPolicy) -> Renew:
    requested = msg.requested_seconds
    grant = policy.grant_for(requested)
    return _new_tuple(
        Renew,
        (msg.call_id, msg.sequence, msg.used_seconds, requested, grant, policy.validity_seconds),
    )


def release(msg: credit_control_pb2.ReleaseRequest) -> Release:
    return _new_tuple(Release, (msg.call_id, msg.used_seconds))


def rate_from_pb(msg: admin_pb2.Rate) -> Rate:
    return Rate(
        prefix=msg.prefix,
        price_per_minute_micros=msg.price_per_minute_micros,
        first_increment_seconds=msg.first_increment_seconds,
        next_increment_seconds=msg.next_increment_seconds,
        connect_fee=msg.connect_fee,
    )


def tariff_from_pb(msg: admin_pb2.Tariff) -> Tariff:
    return Tariff(msg.tariff_id, msg.currency, tuple(rate_from_pb(r) for r in msg.rates))


# ------------------------------------------------------------- to messages


def set_grant(message: credit_control_pb2.Grant, grant: Grant) -> None:
    """Fill `message` in place: on the Control stream answers are built inside their
    response, which costs half of building a message and copying it in."""
    message.call_id = grant.call_id
    message.allowed_seconds = grant.allowed_seconds
    message.final = grant.final
    message.validity_seconds = grant.validity_seconds
    message.held = grant.held


def grant_pb(grant: Grant) -> credit_control_pb2.Grant:
    message = credit_control_pb2.Grant()
    set_grant(message, grant)
    return message


def set_release(message: credit_control_pb2.ReleaseResponse, result: ReleaseResult) -> None:
    """Fill `message` in place (see set_grant)."""
    message.call_id = result.call_id
    message.billed_seconds = result.billed_seconds
    message.charged = result.charged
    message.shortfall = result.shortfall
    message.balance = result.balance


def release_pb(result: ReleaseResult) -> credit_control_pb2.ReleaseResponse:
    message = credit_control_pb2.ReleaseResponse()
    set_release(message, result)
    return message


def account_pb(view: AccountView) -> admin_pb2.Account:
    return admin_pb2.Account(
        account_id=view.account_id,
        currency=view.currency,
        status=_STATUS_TO_PB[view.status],
        tariff_id=view.tariff_id,
        balance=view.balance,
        reserved=view.reserved,
        available=view.available,
        credit_limit=view.credit_limit,
        max_concurrent_calls=view.max_concurrent_calls,
        active_calls=view.active_calls,
        low_balance_threshold=view.low_balance_threshold,
        burn_rate_per_minute=burn_rate_per_minute(view.burn_micros),
        seconds_until_empty=seconds_until_empty(view.available, view.burn_micros),
    )


EVENT_KIND_TO_PB = {
    kind: admin_pb2.EventKind.Value(f"EVENT_KIND_{kind.value}") for kind in EventKind
}
EVENT_KIND_FROM_PB = {pb: kind for kind, pb in EVENT_KIND_TO_PB.items()}


def event_pb(seq: int, index: int, at_ms: int, event: Event) -> admin_pb2.Event:
    message = admin_pb2.Event(
        seq=seq,
        index=index,
        event_id=f"{seq}.{index}",
        kind=EVENT_KIND_TO_PB[event.kind],
        at=_timestamp(at_ms),
        account_id=event.account_id,
        account=account_pb(event.account),
    )
    if event.entry is not None:
        message.entry.CopyFrom(entry_pb(event.entry))
    if event.call is not None:
        message.call.CopyFrom(call_pb(event.call))
    if event.previous_status is not None:
        message.previous_status = _STATUS_TO_PB[event.previous_status]
    return message


def rate_pb(rate: Rate) -> admin_pb2.Rate:
    return admin_pb2.Rate(
        prefix=rate.prefix,
        price_per_minute_micros=rate.price_per_minute_micros,
        first_increment_seconds=rate.first_increment_seconds,
        next_increment_seconds=rate.next_increment_seconds,
        connect_fee=rate.connect_fee,
    )


def tariff_pb(tariff: Tariff) -> admin_pb2.Tariff:
    return admin_pb2.Tariff(
        tariff_id=tariff.tariff_id,
        currency=tariff.currency,
        rates=[rate_pb(r) for r in tariff.rates],
    )


def call_pb(call: CallRecord) -> admin_pb2.Call:
    msg = admin_pb2.Call(
        call_id=call.call_id,
        account_id=call.account_id,
        destination=call.destination,
        state=_CALL_STATE_TO_PB[call.state],
        allowed_seconds=call.allowed_seconds,
        used_seconds=call.used_seconds,
        held=call.held,
        charged=call.charged,
        shortfall=call.shortfall,
        rate=rate_pb(call.rate),
        started_at=_timestamp(call.started_at_ms),
        final=call.final,
        last_sequence=call.last_sequence,
    )
    if call.ended_at_ms is not None:
        msg.ended_at.CopyFrom(_timestamp(call.ended_at_ms))
    if call.expires_at_ms is not None:
        msg.expires_at.CopyFrom(_timestamp(call.expires_at_ms))
    return msg


def entry_pb(entry: LedgerEntry) -> admin_pb2.LedgerEntry:
    return admin_pb2.LedgerEntry(
        entry_id=entry.entry_id,
        account_id=entry.account_id,
        kind=_KIND_TO_PB[entry.kind],
        amount=entry.amount,
        balance_after=entry.balance_after,
        call_id=entry.call_id,
        reference=entry.reference,
        created_at=_timestamp(entry.created_at_ms),
        idempotency_key=entry.idempotency_key,
    )
