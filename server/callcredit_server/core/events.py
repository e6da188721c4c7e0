"""What the changefeed reports: the events a step produced, as plain values.

Events are part of a `Step`, emitted by the state machine at the moment each change
happens, so they are a function of (state, time, command) like the rest of the step:
replaying the journal yields the same events in the same order. That is how they are
made in the server: the writer's machine runs with events off (`StateMachine(events=
False)`), and the projector (projector.py) replays the durable journal with them on.
Each is numbered `(seq, index)` (the journal record, and the place among its events),
which is the changefeed's cursor and the event's id.

Each event carries the account just after its change (`AccountView`), burn rate
(`burn_micros`: the sum of its open calls' prices per minute) included.

Low-balance thresholds: at the end of every step that changed state, each account the
step touched is compared with its threshold. `available` below it while armed: one
LOW_BALANCE, and the threshold is disarmed (`Account.low`); `available` back at or
above it (or the threshold lowered below it, or turned off) while disarmed: one
BALANCE_RESTORED, which re-arms it. Only the end of a step counts, so a release
(whose hold is freed before its charge is posted) never crosses and crosses back.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NamedTuple

from callcredit_server.core.model import (
    AccountStatus,
    AccountView,
    CallRecord,
    CallState,
    EntryKind,
    LedgerEntry,
    Rate,
)


class EventKind(StrEnum):
    """What an event reports (EventKind in the contract)."""

    ACCOUNT_CREATED = "ACCOUNT_CREATED"
    ACCOUNT_UPDATED = "ACCOUNT_UPDATED"
    BALANCE_CHANGED = "BALANCE_CHANGED"
    CALL_STARTED = "CALL_STARTED"
    CALL_ENDED = "CALL_ENDED"
    LOW_BALANCE = "LOW_BALANCE"
    BALANCE_RESTORED = "BALANCE_RESTORED"


class Event(NamedTuple):
    """One change of one account (Event in the contract, without its seq and index).

    A NamedTuple, like the other values a step builds (model.py), built by `new_event`.
    """

    kind: EventKind
    account: AccountView  # just after the change (burn_micros: its burn rate then)
    entry: LedgerEntry | None = None  # BALANCE_CHANGED
    call: CallRecord | None = None  # CALL_STARTED, CALL_ENDED
    previous_status: AccountStatus | None = None  # ACCOUNT_UPDATED

    @property
    def account_id(self) -> str:
        return self.account.account_id


def new_event(
    kind: EventKind,
    account: AccountView,
    entry: LedgerEntry | None,
    call: CallRecord | None,
    previous_status: AccountStatus | None,
) -> Event:
    """Event(...) from every field in order, without the keyword-parsing __new__ (as
    model.py's new_* functions): the state machine builds one per change."""
    return tuple.__new__(Event, (kind, account, entry, call, previous_status))


# ------------------------------------------------------------------ images
# Events are stored in the events table (a row per record) as these JSON-able lists: every
# field spelled out in a fixed order, so a refactor cannot silently change them.

EVENT_IMAGE_FORMAT = 1
_KINDS = {kind.value: kind for kind in EventKind}
_STATUSES = {status.value: status for status in AccountStatus}


def event_image(event: Event) -> list[Any]:
    """`event` as a JSON-able list (what the journal's events table stores).

    Enum members are left as they are: they are str, and JSON writes them as their
    value (reading `.value` costs more than the rest of the image)."""
    a = event.account
    entry = event.entry
    call = event.call
    return [
        EVENT_IMAGE_FORMAT,
        event.kind,
        [
            a.account_id,
            a.currency,
            a.status,
            a.tariff_id,
            a.balance,
            a.reserved,
            a.available,
            a.credit_limit,
            a.max_concurrent_calls,
            a.active_calls,
            a.low_balance_threshold,
            a.burn_micros,
        ],
        None
        if entry is None
        else [
            entry.entry_id,
            entry.kind,
            entry.amount,
            entry.balance_after,
            entry.call_id,
            entry.reference,
            entry.idempotency_key,
            entry.created_at_ms,
        ],
        None
        if call is None
        else [
            call.call_id,
            call.call_seq,
            call.destination,
            call.state,
            call.allowed_seconds,
            call.used_seconds,
            call.held,
            call.charged,
            call.shortfall,
            [
                call.rate.prefix,
                call.rate.price_per_minute_micros,
                call.rate.first_increment_seconds,
                call.rate.next_increment_seconds,
                call.rate.connect_fee,
            ],
            call.started_at_ms,
            call.ended_at_ms,
            call.final,
            call.expires_at_ms,
            call.last_sequence,
        ],
        event.previous_status,
    ]


class EventImageError(ValueError):
    """A stored event is not an image this code reads."""


def event_from_image(image: Any) -> Event:
    """The event `event_image` made; EventImageError if `image` is not one."""
    try:
        version, kind, a, entry, call, previous = image
        if version != EVENT_IMAGE_FORMAT:
            raise EventImageError(f"event image format {version!r}, expected 1")
        account_id = a[0]
        account = AccountView(
            account_id,
            a[1],
            _STATUSES[a[2]],
            a[3],
            a[4],
            a[5],
            a[6],
            a[7],
            a[8],
            a[9],
            a[10],
            a[11],
        )
        return Event(
            _KINDS[kind],
            account,
            None
            if entry is None
            else LedgerEntry(
                entry[0],
                account_id,
                EntryKind(entry[1]),
                entry[2],
                entry[3],
                entry[4],
                entry[5],
                entry[6],
                entry[7],
            ),
            None
            if call is None
            else CallRecord(
                call[0],
                call[1],
                account_id,
                call[2],
                CallState(call[3]),
                call[4],
                call[5],
                call[6],
                call[7],
                call[8],
                Rate(*call[9]),
                call[10],
                call[11],
                call[12],
                call[13],
                call[14],
            ),
            None if previous is None else _STATUSES[previous],
        )
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        if isinstance(exc, EventImageError):
            raise
        raise EventImageError(f"not an event image: {exc}") from exc
