"""The async dialer library: one Control stream per dialer process, carrying every call.

Why it is shaped this way (docs/design.md, "Shape" and "Contract"):

- In Python gRPC costs about as much per *message* as the server's decision costs per
  *operation*, so operations due at the same moment travel together: a sender task takes
  what is queued and writes it in ControlRequests of at most `max_ops_per_message`
  operations, keeping up to `max_messages_in_flight` of them unanswered. Several
  moderate messages in flight let the server apply and commit one while the client
  writes the next and reads the answers to the one before; one huge message at a time
  makes client and server take turns.
- Per operation the library does as little as it can: one future for the caller who
  waits, the Operation built in place in the message being written, and no task per
  call. One timer task serves every call's renewal and hang-up deadlines from a heap;
  answers update the call and reschedule it directly.
- Every operation is idempotent (reserve by call_id, renew by (call_id, sequence), release
  by call_id), so whatever was not answered when a stream broke is simply sent again on
  the next one. The request_id only matches answers to the coroutines waiting for them.
- The server pushes grant updates and terminations to the stream that last carried a
  call, so after a reconnect every open call is re-attached with a fresh Renew.
- A call that goes silent past its validity expires and is charged its whole allowance,
  and a call that talks past allowed_seconds overdraws, so renewal is automatic and runs
  ahead of both, with a margin; if no renewal gets through, the call is told to hang up
  at allowed_seconds.
- A stream can die without closing (a proxy or NAT that black-holes the connection):
  gRPC keepalive pings find that on the channel the library opens, and a heartbeat on
  the stream itself finds it sooner: while calls are open or operations wait, a stream
  that brought nothing for HEARTBEAT_INTERVAL_SECONDS gets an empty ControlRequest
  (the server answers each message, an empty one with an empty ControlResponse); with
  nothing back within HEARTBEAT_TIMEOUT_SECONDS the stream is dropped, a channel the
  library owns is replaced by a new connection, and the calls are re-attached.

Usage::

    async with DialerClient("127.0.0.1:50051") as dialer:
        call = await dialer.reserve("call-1", "acct-1", "+84901234567")
        call.answered()
        ...  # talk until done, or until `await call.must_hang_up()` returns a reason
        result = await call.release()

Timing reads an injectable Clock (monotonic seconds plus a sleep), so tests can move call
time by hand. Reconnect backoff is transport timing and uses the event loop's own clock.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeAlias

import grpc

from callcredit.admin import check_tls_options, open_channel, token_metadata
from callcredit.connect import (
    DEFAULT_CONNECT_TIMEOUT_SECONDS,
    Probe,
    Reach,
    diagnose,
    unreachable_error,
)
from callcredit.errors import CallcreditError, ErrorReason, StreamClosedError
from callcredit.targets import NOT_PRIMARY, PRIMARY_KEY, Failover, parse_targets
from callcredit.v1 import credit_control_pb2, credit_control_pb2_grpc

__all__ = [
    "ALLOWED_SECONDS_REACHED",
    "CALL_RELEASED",
    "CLIENT_CLOSED",
    "FINAL_GRANT_REACHED",
    "HEARTBEAT_INTERVAL_SECONDS",
    "HEARTBEAT_TIMEOUT_SECONDS",
    "MAX_MESSAGES_IN_FLIGHT",
    "MAX_OPS_PER_MESSAGE",
    "MAX_PENDING_OPERATIONS",
    "RECONNECT_BACKOFF_INITIAL_SECONDS",
    "RECONNECT_BACKOFF_MAX_SECONDS",
    "RENEW_INTERVAL_MIN_SECONDS",
    "RENEW_MARGIN_SECONDS",
    "STREAM_FAILED",
    "VALIDITY_MARGIN_SECONDS",
    "Clock",
    "DialerCall",
    "DialerClient",
    "Grant",
    "GrantCallback",
    "HangupCallback",
    "ReleaseResult",
    "SystemClock",
]

logger = logging.getLogger(__name__)

MAX_OPS_PER_MESSAGE = 100
"""Default for `max_ops_per_message`: most operations in one ControlRequest. 100 already
amortises the per-message cost (docs/design.md measures 100 per message at ~29x the throughput
of 1) and keeps each message small enough for the server to pipeline several."""

MAX_MESSAGES_IN_FLIGHT = 8
"""Default for `max_messages_in_flight`: ControlRequests with operations written on the
stream and not yet fully answered. More are queued until answers come back. The server
reads at most 64 unanswered messages per stream."""

SERVER_MAX_OPS_PER_MESSAGE = 10_000
"""The server refuses a ControlRequest with more operations (docs/design.md, Limits on input)."""

MAX_PENDING_OPERATIONS = 10_000
"""Most operations awaiting an answer at once; one more waits for a free slot. It bounds
the pending map and the send queue, which only ever holds pending operations."""

RECONNECT_BACKOFF_INITIAL_SECONDS = 0.05
"""First reconnect delay ceiling; doubled after each stream that ends without a healthy
answer, reset by one."""

RECONNECT_BACKOFF_MAX_SECONDS = 1.0
"""Reconnect delay ceiling. Calls keep running while the stream is down and expire after
their validity (120 s by default), so retrying must stay well inside that; and after a
takeover the dialer must reach the new primary within a second of it serving (the
takeover target is the lease + 2 s: docs/operations.md, "Hot standby"). A dialer holds
one stream, so one attempt a second per dialer is no storm for a restarted server."""

RENEW_MARGIN_SECONDS = 5.0
"""Renew this long before talk time reaches allowed_seconds (at most half of what the grant
added), so the answer is back before the call would have to hang up."""

VALIDITY_MARGIN_SECONDS = 5.0
"""Renew this long before the grant's validity runs out (at most half of it): a call that
misses its validity expires and is charged its whole allowance."""

RENEW_INTERVAL_MIN_SECONDS = 0.5
"""Never renew one call more often. A grant that cannot move yet (talk time still inside
the same whole second, a one-second grant) would otherwise make the schedule spin."""

FINAL_GRANT_REACHED = "FINAL_GRANT_REACHED"
"""Hang-up reason: the grant is final and talk time reached allowed_seconds."""

ALLOWED_SECONDS_REACHED = "ALLOWED_SECONDS_REACHED"
"""Hang-up reason: talk time reached a grant that is not final, but no renewal came back in
time (the server is unreachable). Talking on would run past what the hold covers."""

CALL_RELEASED = "CALL_RELEASED"
"""must_hang_up() result once the call was released (the callback is not called)."""

CLIENT_CLOSED = "CLIENT_CLOSED"
"""must_hang_up() result once the client was closed (the callback is not called)."""

STREAM_FAILED = "STREAM_FAILED"
"""Hang-up reason when the library itself failed and can no longer renew the call."""

TARGET_CONNECT_SECONDS = 2.0
"""With several targets, one whose connection is not up within this (a host that does not
answer) hands over to the next; a refused connection does at once."""

_SETTLED_STATES = frozenset(
    {
        grpc.ChannelConnectivity.READY,
        grpc.ChannelConnectivity.TRANSIENT_FAILURE,
        grpc.ChannelConnectivity.SHUTDOWN,
    }
)

HEARTBEAT_INTERVAL_SECONDS = 10.0
"""While calls are open or operations wait, a stream that brought nothing for this long
is probed with an empty ControlRequest."""

HEARTBEAT_TIMEOUT_SECONDS = 10.0
"""A probed stream that brings nothing back within this is dead: drop it and reconnect.
Longer than the server's 5 s journal-commit timeout, so a slow journal (answers held
until durable) is not taken for a dead connection."""

KEEPALIVE_TIME_MS = 20_000
"""gRPC keepalive ping interval on a channel the library opens. The server accepts
pings every 10 s (grpc.http2.min_ping_interval_without_data_ms); more often would
make it close the connection (GOAWAY too_many_pings)."""

KEEPALIVE_TIMEOUT_MS = 10_000
"""A keepalive ping unanswered this long closes the connection."""

_CHANNEL_OPTIONS = (
    # gRPC's own reconnect backoff defaults to a 120 s ceiling; a channel we own follows
    # our caps so a restarted server is found again within seconds.
    ("grpc.initial_reconnect_backoff_ms", int(RECONNECT_BACKOFF_INITIAL_SECONDS * 1000)),
    ("grpc.max_reconnect_backoff_ms", int(RECONNECT_BACKOFF_MAX_SECONDS * 1000)),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
)

if TYPE_CHECKING:
    _ControlCall: TypeAlias = grpc.aio.StreamStreamCall[
        credit_control_pb2.ControlRequest, credit_control_pb2.ControlResponse
    ]

HangupCallback: TypeAlias = "Callable[[DialerCall, str], object]"
"""Called as callback(call, reason) once, when callcredit orders a call to hang up."""

GrantCallback: TypeAlias = "Callable[[DialerCall, Grant], object]"
"""Called as callback(call, grant) whenever a renewal's answer or a push gives a live call
a new grant (a switch that enforces allowed_seconds itself moves its deadline then)."""


class Clock(Protocol):
    """Where call timing comes from: monotonic seconds and a way to wait for them."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once monotonic() has advanced by at least `seconds`."""
        ...


class SystemClock:
    """The real clock: time.monotonic and asyncio.sleep (which reads the same clock)."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True, slots=True)
class Grant:
    """How long a call may last (docs/design.md, Calls): the server's Grant, minus the call_id."""

    allowed_seconds: int
    """Total talk time the call may reach, counted from answer."""
    final: bool
    """Funds or the account's status cut the grant short: hang up at allowed_seconds."""
    validity_seconds: int
    """The next Renew or Release must arrive within this, or the call expires."""
    held: int
    """The call's hold now, in minor units."""


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    """What a release charged (ReleaseResponse), with the used_seconds that were reported."""

    call_id: str
    used_seconds: int
    billed_seconds: int
    charged: int
    """The call's total charge in minor units."""
    shortfall: int
    """Part of the cost the account could not cover (the dialer overran its allowance)."""
    balance: int
    """The account's balance after the release, in minor units."""


_RESERVE = 0
_RENEW = 1
_RELEASE = 2

_WAITING = 0
"""An operation made but not yet queued: it waits for a pending slot."""
_PENDING = 1
"""Queued or written, awaiting its answer; it is in DialerClient._pending."""
_DONE = 2
"""Answered, refused, or dropped: no longer counted against any bound."""

_RENEWAL_ENDS_CALL = frozenset({ErrorReason.CALL_ALREADY_ENDED, ErrorReason.CALL_NOT_FOUND})
"""Refusals of a renew() that mean the call is gone on the server: it must hang up."""

_STREAM_REFUSED_CODES = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
)
"""A stream the server refuses whole for these (a missing or wrong token) gets the same
answer on every retry: the operations waiting for it fail with the server's words."""


class _Pending:
    """One operation queued (or about to be) and not yet answered. The Operation message
    itself is built in place in the ControlRequest that carries it, from these fields,
    and built again if it has to be resent on a new stream."""

    __slots__ = (
        "call",
        "future",
        "kind",
        "message",
        "request_id",
        "requested_seconds",
        "sent",
        "sequence",
        "state",
        "submitted_at",
        "used_seconds",
    )

    def __init__(
        self,
        kind: int,
        call: DialerCall,
        used_seconds: int,
        sequence: int,
        requested_seconds: int,
        submitted_at: float,
        future: asyncio.Future[Any] | None,
    ) -> None:
        self.kind = kind
        self.call = call
        self.used_seconds = used_seconds
        """The talk time this operation reports; a grant it earns is counted from there."""
        self.sequence = sequence
        self.requested_seconds = requested_seconds
        self.submitted_at = submitted_at
        """When it was made: the server started the grant's validity no earlier."""
        self.future = future
        """What the waiting caller awaits (a Grant or a ReleaseResponse); None for an
        automatic renewal, which nobody awaits."""
        self.request_id = ""
        self.state = _WAITING
        self.sent = False
        """Written to some stream at least once, so the server may have acted on it."""
        self.message = 0
        """Number of the message that carries it on the current stream (0: none)."""


def _add_operations(request: credit_control_pb2.ControlRequest, batch: list[_Pending]) -> None:
    """Append one Operation per entry, fields set in place (building nested messages and
    copying them in costs about twice as much per operation)."""
    add = request.operations.add
    for entry in batch:
        operation = add(request_id=entry.request_id)
        kind = entry.kind
        call = entry.call
        if kind == _RENEW:
            renew = operation.renew
            renew.call_id = call.call_id
            renew.sequence = entry.sequence
            renew.used_seconds = entry.used_seconds
            renew.requested_seconds = entry.requested_seconds
        elif kind == _RELEASE:
            release = operation.release
            release.call_id = call.call_id
            release.used_seconds = entry.used_seconds
        else:
            reserve = operation.reserve
            reserve.call_id = call.call_id
            reserve.account_id = call.account_id
            reserve.destination = call.destination
            reserve.requested_seconds = entry.requested_seconds


def _grant(message: credit_control_pb2.Grant) -> Grant:
    return Grant(message.allowed_seconds, message.final, message.validity_seconds, message.held)


class DialerCall:
    """One call on the dialer's stream: its current grant, its talk clock and its hang-up
    signal. Made by DialerClient.reserve; renews itself until released."""

    def __init__(
        self,
        client: DialerClient,
        call_id: str,
        account_id: str,
        destination: str,
        requested_seconds: int,
        on_hangup: HangupCallback | None,
        on_grant: GrantCallback | None = None,
    ) -> None:
        self.call_id = call_id
        self.account_id = account_id
        self.destination = destination
        self.requested_seconds = requested_seconds
        self._client = client
        self._on_hangup = on_hangup
        self._on_grant = on_grant
        self._grant: Grant | None = None
        self._granted_at = 0.0
        self._grant_base_used_seconds = 0
        self._reported_used_seconds = 0
        self._answered_at: float | None = None
        self._sequence = 0
        self._renewed_at: float | None = None
        self._reattach = False
        self._live = False  # reserve() returned it: renewals and hang-ups run
        self._stopped = False  # an automatic renewal was refused: renewing stopped
        self._ended = False
        self._renewal: _Pending | None = None  # the automatic renewal awaiting its answer
        self._due: float | None = None  # the earliest wake-up of this call on the timer heap
        self._hangup_reason: str | None = None
        self._hangup_waiter: asyncio.Future[str] | None = None

    @property
    def grant(self) -> Grant:
        """The latest grant: from the reserve, a renewal, or a push."""
        assert self._grant is not None, "a DialerCall is handed out only once granted"
        return self._grant

    @property
    def used_seconds(self) -> int:
        """Whole seconds of talk time since answered(); 0 while ringing."""
        if self._answered_at is None:
            return 0
        return int(self._client._monotonic() - self._answered_at)

    @property
    def hangup_reason(self) -> str | None:
        """Why the call must hang up, or None while it may go on."""
        return self._hangup_reason

    def answered(self, ago_seconds: float = 0.0) -> None:
        """Start the talk clock, as of `ago_seconds` ago (a call found already talking,
        e.g. by a restarted process). Until then the call is ringing: it reports
        used_seconds = 0 and renews only to stay valid. A second call changes nothing."""
        if self._answered_at is None:
            now = self._client._monotonic()
            self._answered_at = now - ago_seconds
            if self._live:
                self._tick(now)

    async def must_hang_up(self) -> str:
        """Wait until the call must hang up and return why: FINAL_GRANT_REACHED (or
        ALLOWED_SECONDS_REACHED when renewals cannot get through), a pushed termination's
        reason (ACCOUNT_SUSPENDED), or the reason a renewal was refused
        (CALL_ALREADY_ENDED after an expiry). Resolves with CALL_RELEASED or CLIENT_CLOSED
        once the call or the client is gone, so nothing waits forever."""
        if self._hangup_reason is not None:
            return self._hangup_reason
        if self._hangup_waiter is None:
            self._hangup_waiter = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._hangup_waiter)

    async def renew(self, used_seconds: int | None = None, requested_seconds: int = 0) -> Grant:
        """Renew now, besides the automatic renewals, and return the new grant (which the
        call also takes as its own). `used_seconds` defaults to the talk time since
        answered() (or what the call already reported, if that is more); it may not be
        below what the call already reported. Automatic renewals and release() go on
        from the highest talk time reported.
        `requested_seconds` 0 asks for what the call was reserved with (its own 0: the
        server's default grant). A refusal raises CallcreditError; CALL_ALREADY_ENDED
        and CALL_NOT_FOUND also order the hang-up. Cancelling the caller does not take
        back a renewal already queued: its answer still updates the call."""
        if self._ended:
            raise RuntimeError(f"call {self.call_id!r} was already released")
        client = self._client
        now = client._monotonic()
        used = self._default_used_seconds() if used_seconds is None else used_seconds
        if used < self._reported_used_seconds:
            raise ValueError(
                f"used_seconds={used} is below the {self._reported_used_seconds} s "
                f"already reported for call {self.call_id!r}"
            )
        self._sequence += 1
        self._renewed_at = now
        self._reported_used_seconds = used
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        entry = _Pending(
            _RENEW,
            self,
            used,
            self._sequence,
            requested_seconds or self.requested_seconds,
            now,
            future,
        )
        await client._submit(entry)
        try:
            return await future
        except CallcreditError as err:
            if err.error_reason in _RENEWAL_ENDS_CALL:
                self._order_hangup(err.reason)
            raise

    async def release(self, used_seconds: int | None = None) -> ReleaseResult:
        """End the call and return its charge. `used_seconds` defaults to the talk time
        since answered(), or what a renewal already reported if that is more. The release
        runs to its answer even if the caller is cancelled: a lost release leaves the call
        to expire, charged its whole allowance."""
        if self._ended:
            raise RuntimeError(f"call {self.call_id!r} was already released")
        used = self._default_used_seconds() if used_seconds is None else used_seconds
        if used < self._reported_used_seconds:
            raise ValueError(
                f"used_seconds={used} is below the {self._reported_used_seconds} s "
                f"already reported for call {self.call_id!r}"
            )
        self._ended = True
        self._settle(CALL_RELEASED)
        client = self._client
        # Stop renewing first, so no Renew is queued behind the Release.
        renewal = self._renewal
        if renewal is not None:
            self._renewal = None
            client._retire(renewal)
        future: asyncio.Future[credit_control_pb2.ReleaseResponse]
        future = asyncio.get_running_loop().create_future()
        entry = _Pending(_RELEASE, self, used, 0, 0, client._monotonic(), future)
        try:
            if client._free_slots and client._closed is None and client._supervisor:
                client._free_slots -= 1
                client._enqueue(entry)
            else:
                # Waiting for a slot (or failing) runs as its own task: a caller cancelled
                # meanwhile must not keep the release from going out.
                task = client._spawn(client._submit(entry), f"callcredit-release-{self.call_id}")
                await asyncio.shield(task)
            response = await future
        except asyncio.CancelledError:
            future.cancel()  # nobody waits for the answer; the release still goes out
            raise
        finally:
            client._forget(self)
        return ReleaseResult(
            call_id=self.call_id,
            used_seconds=used,
            billed_seconds=response.billed_seconds,
            charged=response.charged,
            shortfall=response.shortfall,
            balance=response.balance,
        )

    async def _abandon(self) -> None:
        """Release a call whose reserve() was cancelled after the Reserve went out: the
        server may hold it, and an unreleased call is charged its whole allowance."""
        self._ended = True
        client = self._client
        future: asyncio.Future[credit_control_pb2.ReleaseResponse]
        future = asyncio.get_running_loop().create_future()
        entry = _Pending(_RELEASE, self, 0, 0, 0, client._monotonic(), future)
        await client._submit(entry)
        try:
            await future
        except CallcreditError as err:
            # CALL_NOT_FOUND: the Reserve never reached the server. Nothing to undo.
            logger.debug("abandoned call %s: release answered %s", self.call_id, err.reason)

    def _start(self) -> None:
        """reserve() hands the call out: from now on it renews and can be ordered to hang up."""
        self._live = True
        self._tick(self._client._monotonic())

    def _granted(self, grant: Grant, granted_at: float | None, base_used_seconds: int) -> None:
        """Take a grant from an answer (granted_at = when the request was made) or a push
        (granted_at None: keep the earlier validity start, which is the safer guess)."""
        if self._ended:
            return
        self._grant = grant
        if granted_at is not None:
            self._granted_at = granted_at
        self._grant_base_used_seconds = base_used_seconds
        if self._live:
            self._tick(self._client._monotonic())
            if self._on_grant is not None:
                # Scheduled, like the hang-up callback: it must not break the reader.
                asyncio.get_running_loop().call_soon(self._on_grant, self, grant)

    def _renewal_refused(self, error: CallcreditError) -> None:
        """A refused automatic renewal ends the call's renewing and orders the hang-up."""
        self._renewal = None
        if self._ended:
            return
        logger.info("call %s: renewal refused: %s", self.call_id, error)
        self._stopped = True
        self._order_hangup(error.reason)

    def _order_hangup(self, reason: str) -> None:
        if self._hangup_reason is not None:
            return
        self._settle(reason)
        if self._on_hangup is not None:
            # Scheduled, not called: a failing callback must not break the stream's reader.
            asyncio.get_running_loop().call_soon(self._on_hangup, self, reason)

    def _settle(self, reason: str) -> None:
        if self._hangup_reason is not None:
            return
        self._hangup_reason = reason
        waiter = self._hangup_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(reason)

    def _reattach_soon(self) -> None:
        """Renew at once on a new stream, so the server pushes to it from now on."""
        if self._grant is not None and not self._ended:
            self._reattach = True
            if self._live:
                self._tick(self._client._monotonic())

    def _tick(self, now: float) -> None:
        """Order the hang-up when talk time reached the grant, start a renewal when one
        is due (or the call must re-attach), and put the next of those moments on the
        client's timer heap. Called by the timer task and whenever something that moves
        them happens (a grant, answered(), a new stream). A renewal in flight is not
        waited for: a server that does not answer cannot hold up the hang-up."""
        if self._ended or self._stopped or self._client._closed is not None:
            return
        grant = self._grant
        assert grant is not None
        allowed = grant.allowed_seconds
        answered_at = self._answered_at
        wake_at: float | None = None
        if answered_at is not None and self._hangup_reason is None:
            hangup_at = answered_at + allowed
            if now >= hangup_at:
                self._order_hangup(FINAL_GRANT_REACHED if grant.final else ALLOWED_SECONDS_REACHED)
            else:
                wake_at = hangup_at
        if self._renewal is None:
            # Renew ahead of the validity (by its margin, at most half of it) and, once
            # answered and not final, ahead of allowed_seconds (by its margin, at most
            # half of what the grant added), but never sooner than the minimum interval.
            validity = grant.validity_seconds
            margin = (
                validity / 2 if validity < 2 * VALIDITY_MARGIN_SECONDS else VALIDITY_MARGIN_SECONDS
            )
            renew_at = self._granted_at + validity - margin
            if answered_at is not None and not grant.final:
                added = allowed - self._grant_base_used_seconds
                if added < 0:
                    added = 0
                margin = added / 2 if added < 2 * RENEW_MARGIN_SECONDS else RENEW_MARGIN_SECONDS
                talk_at = answered_at + allowed - margin
                if talk_at < renew_at:
                    renew_at = talk_at
            renewed_at = self._renewed_at
            if renewed_at is not None and renew_at < renewed_at + RENEW_INTERVAL_MIN_SECONDS:
                renew_at = renewed_at + RENEW_INTERVAL_MIN_SECONDS
            if self._reattach or now >= renew_at:
                self._reattach = False
                self._start_renewal(now)
            elif wake_at is None or renew_at < wake_at:
                wake_at = renew_at
        if wake_at is not None:
            self._client._schedule(self, wake_at)

    def _default_used_seconds(self) -> int:
        """The talk time to report when the caller names none: the talk clock, but never
        below what was already reported (renew(used_seconds=...) may run ahead of it, and
        the server refuses a report lower than an earlier one)."""
        used = self.used_seconds
        reported = self._reported_used_seconds
        return used if used > reported else reported

    def _start_renewal(self, now: float) -> None:
        used = self._default_used_seconds()
        self._sequence += 1
        self._renewed_at = now
        self._reported_used_seconds = used
        entry = _Pending(_RENEW, self, used, self._sequence, self.requested_seconds, now, None)
        self._renewal = entry
        client = self._client
        if client._free_slots:
            client._free_slots -= 1
            client._enqueue(entry)
        else:
            client._spawn(client._submit(entry), f"callcredit-renew-{self.call_id}")


class DialerClient:
    """A dialer process's connection to callcredit: one Control stream for all its calls.

    `target` is an address (a channel is opened and closed with the client: TLS if `tls`,
    `ca_file` or a client certificate `cert_file` + `key_file` is given, else plaintext),
    several (`"a:1,b:2"` or `["a:1", "b:2"]`: a primary and its hot standbys; the stream
    follows the primary, callcredit.targets, and resends and re-attaches as after any
    reconnect) or
    a grpc.aio.Channel you own (interceptors, your own reconnect settings; give it the
    keepalive options of _CHANNEL_OPTIONS too: the library cannot replace a channel it
    does not own when the heartbeat finds its connection dead). `token`, a dialer token
    of the server's configuration, goes with the stream either way. Use it as
    `async with DialerClient(...) as dialer:`. Closing does not release open calls: release
    them first, or they expire and are charged their allowance.

    Operations are written in messages of at most `max_ops_per_message`, with at most
    `max_messages_in_flight` messages unanswered; at most `max_pending_operations`
    operations await answers at once (one more waits for a free slot).

    Fail fast, and say why: when no connection comes up within `connect_timeout_seconds`
    (the server is down, the address is wrong, TLS on one side only), or the server
    refuses the stream (UNAUTHENTICATED), every operation waiting fails with a
    CallcreditError naming the target and the cause, and so does every new operation
    until a connection works again; the client keeps trying meanwhile. A release that
    fails this way leaves its call to expire on the server (charged its allowance).
    """

    def __init__(
        self,
        target: str | Sequence[str] | grpc.aio.Channel,
        *,
        clock: Clock | None = None,
        max_pending_operations: int = MAX_PENDING_OPERATIONS,
        max_ops_per_message: int = MAX_OPS_PER_MESSAGE,
        max_messages_in_flight: int = MAX_MESSAGES_IN_FLIGHT,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        heartbeat_interval_seconds: float = HEARTBEAT_INTERVAL_SECONDS,
        heartbeat_timeout_seconds: float = HEARTBEAT_TIMEOUT_SECONDS,
        connect_timeout_seconds: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    ) -> None:
        if max_pending_operations < 1:
            raise ValueError("max_pending_operations must be at least 1")
        if not 1 <= max_ops_per_message <= SERVER_MAX_OPS_PER_MESSAGE:
            raise ValueError(f"max_ops_per_message must be 1-{SERVER_MAX_OPS_PER_MESSAGE}")
        if max_messages_in_flight < 1:
            raise ValueError("max_messages_in_flight must be at least 1")
        if heartbeat_interval_seconds <= 0 or heartbeat_timeout_seconds <= 0:
            raise ValueError("heartbeat interval and timeout must be positive")
        if connect_timeout_seconds <= 0:
            raise ValueError("connect_timeout_seconds must be positive")
        self._connect_timeout = connect_timeout_seconds
        # Set while the server cannot be reached (or refuses the stream): the error that
        # new operations fail with at once. Cleared by a connection that works.
        self._unreachable: CallcreditError | None = None
        self._heartbeat_interval = heartbeat_interval_seconds
        self._heartbeat_timeout = heartbeat_timeout_seconds
        self._received_at = 0.0  # loop time of the stream's last message (or its start)
        self._probe_due = False  # the sender writes a message even with nothing queued
        tls_files = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
        check_tls_options(target, tls=tls, **tls_files)
        self._borrowed = target if isinstance(target, grpc.aio.Channel) else None
        # Where the stream goes: one target, or a primary and its standbys in turn
        # (callcredit.targets; the backoff between streams is the Failover's too).
        self._failover = Failover(
            ("the server",) if self._borrowed else parse_targets(target),  # type: ignore[arg-type]
            backoff_initial_seconds=RECONNECT_BACKOFF_INITIAL_SECONDS,
            backoff_max_seconds=RECONNECT_BACKOFF_MAX_SECONDS,
        )
        self._several = len(self._failover.targets) > 1
        self._primary_hint = ""  # the last NOT_PRIMARY refusal's hint, for the next step
        # Several targets: the standbys' refusals since the last healthy answer, and
        # since when no target has given one (the connect timeout runs from there).
        self._refusals: dict[str, str] = {}
        self._trying_since: float | None = None
        self._tls = tls
        self._tls_files = tls_files
        self._metadata = token_metadata(token)
        self._clock: Clock = clock if clock is not None else SystemClock()
        # The clock read on every operation: time.monotonic itself for the system clock.
        self._monotonic: Callable[[], float] = (
            time.monotonic if type(self._clock) is SystemClock else self._clock.monotonic
        )
        self._max_ops_per_message = max_ops_per_message
        self._max_messages_in_flight = max_messages_in_flight
        # Pending slots: a counter and the callers waiting for one, first come first served.
        self._free_slots = max_pending_operations
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._max_pending = max_pending_operations
        # Every operation awaiting its answer (state _PENDING), oldest first: what a new
        # stream sends again.
        self._pending: dict[str, _Pending] = {}
        # Operations the current stream has yet to write, oldest first: rebuilt from
        # _pending on every new stream; entries dropped meanwhile are skipped.
        self._unsent: deque[_Pending] = deque()
        self._send_wake = asyncio.Event()
        # Messages with operations written on the current stream: number -> unanswered.
        self._in_flight: dict[int, int] = {}
        self._message_count = 0
        self._calls: dict[str, DialerCall] = {}
        # Renewal and hang-up deadlines of every call: (when, n, call), the call's
        # earliest one current when it equals call._due; later ones are skipped.
        self._timers: list[tuple[float, int, DialerCall]] = []
        self._timer_count = 0
        self._timer_target = math.inf  # when the timer task wakes next
        self._timer_wake = asyncio.Event()
        self._timer_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._channel: grpc.aio.Channel | None = None
        self._stub: credit_control_pb2_grpc.CreditControlServiceAsyncStub | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._closed: tuple[str, str] | None = None
        self._request_prefix = uuid.uuid4().hex[:12] + ":"
        self._request_count = 0

    async def __aenter__(self) -> Self:
        if self._supervisor is not None:
            raise RuntimeError("a DialerClient is entered once")
        self._channel = self._borrowed or self._open_channel()
        self._stub = credit_control_pb2_grpc.CreditControlServiceStub(self._channel)
        self._supervisor = asyncio.create_task(self._run(), name="callcredit-dialer-stream")
        self._timer_task = asyncio.create_task(self._run_timers(), name="callcredit-dialer-timers")
        return self

    def _open_channel(self) -> grpc.aio.Channel:
        """A new channel (a new connection) to the current target."""
        return open_channel(
            self._failover.current, tls=self._tls, options=_CHANNEL_OPTIONS, **self._tls_files
        )

    async def _reopen_channel(self) -> None:
        """Replace a channel we own: its connection went silent (a new stream on the old
        channel would ride the same dead connection), or the target changed."""
        if self._borrowed is not None or self._closing:
            return
        old, self._channel = self._channel, self._open_channel()
        self._stub = credit_control_pb2_grpc.CreditControlServiceStub(self._channel)
        if old is not None:
            await old.close()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def reserve(
        self,
        call_id: str,
        account_id: str,
        destination: str,
        requested_seconds: int = 0,
        *,
        on_hangup: HangupCallback | None = None,
        on_grant: GrantCallback | None = None,
    ) -> DialerCall:
        """Open a call and return its handle, which renews itself from now on.

        Raises CallcreditError when refused (reason INSUFFICIENT_FUNDS, ACCOUNT_SUSPENDED,
        CONCURRENT_CALL_LIMIT, ...), and UNAVAILABLE with the cause when the server
        cannot be reached within connect_timeout_seconds (reconnects shorter than that
        are waited through). Cancelled after the Reserve went out, the call is released
        in the background; reserve it again under a new call_id.
        `on_hangup(call, reason)` is called when callcredit orders the hang-up;
        `on_grant(call, grant)` whenever a renewal or a push brings the call a new grant.
        """
        if call_id in self._calls:
            raise ValueError(f"call {call_id!r} is already open on this dialer")
        call = DialerCall(
            self, call_id, account_id, destination, requested_seconds, on_hangup, on_grant
        )
        future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        entry = _Pending(_RESERVE, call, 0, 0, requested_seconds, self._monotonic(), future)
        self._calls[call_id] = call
        try:
            await self._submit(entry)
        except BaseException:
            self._forget(call)
            raise
        try:
            await future
        except asyncio.CancelledError:
            self._forget(call)
            self._retire(entry)
            if entry.sent and self._closed is None:
                self._spawn(call._abandon(), f"callcredit-abandon-{call_id}")
            raise
        except BaseException:
            self._forget(call)
            self._retire(entry)
            raise
        call._start()
        return call

    async def aclose(self) -> None:
        """Stop the stream and every renewal; whatever still waits gets StreamClosedError."""
        if self._closing or self._supervisor is None:
            return
        self._closing = True
        self._shut_down(CLIENT_CLOSED, "the dialer client was closed", order_hangup=False)
        self._supervisor.cancel()
        assert self._timer_task is not None
        self._timer_task.cancel()
        await asyncio.wait((self._supervisor, self._timer_task, *self._tasks))
        if self._borrowed is None and self._channel is not None:
            await self._channel.close()

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        # Retrieving the exception also keeps asyncio from warning about a release whose
        # caller stopped waiting; a CallcreditError reached (or was meant for) its caller.
        error = task.exception()
        if error is not None and not isinstance(error, CallcreditError):
            logger.error("dialer task %s failed", task.get_name(), exc_info=error)

    def _forget(self, call: DialerCall) -> None:
        if self._calls.get(call.call_id) is call:
            del self._calls[call.call_id]

    def _closed_error(self) -> StreamClosedError:
        assert self._closed is not None
        reason, message = self._closed
        return StreamClosedError(reason, message, grpc.StatusCode.CANCELLED)

    async def _submit(self, entry: _Pending) -> None:
        """Queue an operation for the stream; wait for a slot when max_pending are out."""
        if self._supervisor is None:
            raise RuntimeError("use `async with DialerClient(...) as dialer:`")
        if self._closed is not None:
            raise self._closed_error()
        if self._unreachable is not None and entry.future is not None:
            raise self._unreachable
        if self._free_slots:
            self._free_slots -= 1
        else:
            await self._wait_for_slot()
            if self._closed is not None:
                self._release_slot()
                raise self._closed_error()
        if entry.state != _WAITING:  # an automatic renewal dropped while it waited
            self._release_slot()
            return
        self._enqueue(entry)

    async def _wait_for_slot(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self._release_slot()  # handed a slot as we were cancelled: pass it on
            raise

    def _release_slot(self) -> None:
        waiters = self._slot_waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the longest waiter
                return
        self._free_slots += 1

    def _enqueue(self, entry: _Pending) -> None:
        """Make a pending operation of an entry that holds a slot."""
        self._request_count += 1
        request_id = f"{self._request_prefix}{self._request_count}"
        entry.request_id = request_id
        entry.state = _PENDING
        self._pending[request_id] = entry
        self._unsent.append(entry)
        self._send_wake.set()

    def _answered(self, entry: _Pending) -> None:
        """Count an entry as answered against the message that carried it (the window)."""
        number = entry.message
        if number:
            entry.message = 0
            in_flight = self._in_flight
            left = in_flight.get(number)
            if left is None:
                return  # written on an earlier stream
            if left > 1:
                in_flight[number] = left - 1
            else:
                del in_flight[number]
                if self._unsent:
                    self._send_wake.set()

    def _retire(self, entry: _Pending) -> None:
        """Drop an operation nobody needs answered any more (a cancelled reserve, an
        automatic renewal of a released call). Not yet written, it never will be."""
        state = entry.state
        entry.state = _DONE
        if state != _PENDING:
            return
        self._pending.pop(entry.request_id, None)
        self._answered(entry)
        self._release_slot()
        unsent = self._unsent
        if len(unsent) > 2 * self._max_pending + 64:  # dropped entries pile up: sweep them
            self._unsent = deque(e for e in unsent if e.state == _PENDING)

    def _schedule(self, call: DialerCall, when: float) -> None:
        """Wake `call` at `when` (or earlier: a wake-up already due sooner stays)."""
        due = call._due
        if due is not None and due <= when:
            return
        call._due = when
        self._timer_count += 1
        timers = self._timers
        heapq.heappush(timers, (when, self._timer_count, call))
        if when < self._timer_target:
            self._timer_wake.set()
        if len(timers) > 2 * len(self._calls) + 1_024:
            # Superseded wake-ups and those of released calls: keep the current ones only.
            current = [
                (c._due, n, c) for n, c in enumerate(self._calls.values()) if c._due is not None
            ]
            heapq.heapify(current)
            self._timers = current

    async def _run_timers(self) -> None:
        """The one task that serves every call's deadlines, earliest first."""
        clock = self._clock
        wake = self._timer_wake
        loop = asyncio.get_running_loop()
        system_clock = type(clock) is SystemClock
        try:
            while True:
                now = clock.monotonic()
                timers = self._timers
                while timers and timers[0][0] <= now:
                    when, _, call = heapq.heappop(timers)
                    if call._due == when:
                        call._due = None
                        call._tick(now)
                        timers = self._timers  # _tick may have swept it
                self._timer_target = timers[0][0] if timers else math.inf
                wake.clear()
                if not timers:
                    await wake.wait()
                elif system_clock:
                    # asyncio's own timer (the same monotonic clock): no task per wait.
                    handle = loop.call_later(self._timer_target - now, wake.set)
                    try:
                        await wake.wait()
                    finally:
                        handle.cancel()
                else:
                    sleeper = asyncio.ensure_future(clock.sleep(self._timer_target - now))
                    sleeper.add_done_callback(lambda _: wake.set())
                    try:
                        await wake.wait()
                    finally:
                        sleeper.cancel()
        except Exception as exc:
            logger.exception("callcredit dialer timers failed")
            self._shut_down(STREAM_FAILED, f"dialer timers failed: {exc!r}", order_hangup=True)

    async def _run(self) -> None:
        """Keep a stream up: serve one until it ends, back off with jitter, start again."""
        try:
            while True:
                await self._until_connected()
                await self._serve_stream()
                hint, self._primary_hint = self._primary_hint, ""
                delay = await self._next_target(hint)
                logger.warning(
                    "callcredit stream ended; reconnecting to %s in %.3f s",
                    self._failover.current,
                    delay,
                )
                await asyncio.sleep(delay)
        except Exception as exc:
            # A bug, not a network failure (those end _serve_stream normally). Fail loudly
            # rather than leave calls waiting on a stream that is never coming back.
            logger.exception("callcredit dialer stream failed")
            self._shut_down(STREAM_FAILED, f"dialer stream failed: {exc!r}", order_hangup=True)

    async def _next_target(self, primary: str = "") -> float:
        """Step to the target to try next (a new channel if it is another one), and
        return the delay before trying it: half fixed, half random, so a fleet of dialers
        cut off by one server restart does not come back in one burst, and none retries
        in a tight loop (the first tour of several targets goes at once)."""
        step = self._failover.failed(primary=primary, jitter=random.random())
        if self._several:
            await self._reopen_channel()
        return step.delay_seconds

    async def _until_connected(self) -> None:
        """Wait for the channel to connect. With several targets, one that fails (or does
        not connect within TARGET_CONNECT_SECONDS) hands over to the next. Each time
        `connect_timeout_seconds` pass without a connection (several targets: without a
        healthy answer), find out why, log it, and fail every operation that waits."""
        loop = asyncio.get_running_loop()
        while True:
            if self._trying_since is None:
                self._trying_since = loop.time()
            left = self._trying_since + self._connect_timeout - loop.time()
            if left > 0:
                if await self._connects(
                    min(left, TARGET_CONNECT_SECONDS) if self._several else left
                ):
                    if not self._several:
                        self._trying_since = None
                    self._unreachable = None
                    return
                if self._several:
                    await asyncio.sleep(await self._next_target())
                    continue
            self._trying_since = None
            error = await self._diagnosis()
            if self._unreachable is None or self._unreachable.message != error.message:
                logger.warning("%s; operations fail until it is back, still trying", error.message)
            self._unreachable = error
            self._fail_waiting(error)

    async def _connects(self, seconds: float) -> bool:
        """Whether the channel is READY within `seconds`. With several targets, a refused
        connection (TRANSIENT_FAILURE) answers False at once: try the next target."""
        channel = self._channel
        assert channel is not None
        try:
            async with asyncio.timeout(seconds):
                if not self._several:
                    await channel.channel_ready()
                    return True
                state = channel.get_state(try_to_connect=True)
                while state not in _SETTLED_STATES:
                    await channel.wait_for_state_change(state)
                    state = channel.get_state(try_to_connect=True)
                return state is grpc.ChannelConnectivity.READY
        except TimeoutError:
            return False

    async def _diagnosis(self) -> CallcreditError:
        """Why no target could be reached: each target's standby refusal, or what a
        look at it finds (callcredit.connect), in one error naming them all."""
        if self._borrowed is not None:
            probe = Probe(Reach.NOT_PROBED)
            return unreachable_error("the server (a channel of yours)", probe, tls=False)
        tls, files = self._tls or any(self._tls_files.values()), self._tls_files
        targets = self._failover.targets
        probes = await asyncio.gather(
            *(
                diagnose(
                    target,
                    tls=tls,
                    ca_file=files["ca_file"],
                    cert_file=files["cert_file"],
                    key_file=files["key_file"],
                )
                for target in targets
            )
        )
        errors = [
            unreachable_error(target, probe, tls=tls)
            for target, probe in zip(targets, probes, strict=True)
        ]
        if len(errors) == 1:
            return errors[0]
        causes = [
            self._refusals.get(target) or error.message
            for target, error in zip(targets, errors, strict=True)
        ]
        return CallcreditError("UNAVAILABLE", "; ".join(causes), grpc.StatusCode.UNAVAILABLE)

    def _fail_waiting(self, error: CallcreditError) -> None:
        """Fail every operation a caller awaits; automatic renewals stay for the next
        stream (their calls hang up at allowed_seconds if none gets through)."""
        for request_id, entry in list(self._pending.items()):
            future = entry.future
            if future is None:
                continue
            del self._pending[request_id]
            self._finish(entry)
            if not future.done():
                future.set_exception(error)

    async def _serve_stream(self) -> None:
        assert self._stub is not None
        # Not wait_for_ready: the channel is connected now, and a stream on a channel that
        # lost its connection since should fail at once, back to _until_connected.
        stream = self._stub.Control(metadata=self._metadata)
        # Everything unanswered goes out again: every operation is idempotent.
        self._unsent = deque(self._pending.values())
        self._in_flight = {}
        if self._unsent:
            self._send_wake.set()
        for call in list(self._calls.values()):
            call._reattach_soon()
        sender = asyncio.create_task(self._send(stream))
        receiver = asyncio.create_task(self._receive(stream))
        watchdog = asyncio.create_task(self._watch())
        tasks = (sender, receiver, watchdog)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            stream.cancel()
            await asyncio.wait(tasks)
        if watchdog in done:
            await self._reopen_channel()

    async def _watch(self) -> None:
        """Return when the stream went silent: with calls open or operations waiting,
        nothing arrived for the heartbeat interval, a probe went out, and nothing came
        back within the heartbeat timeout either."""
        loop = asyncio.get_running_loop()
        self._received_at = loop.time()
        while True:
            quiet = loop.time() - self._received_at
            if quiet < self._heartbeat_interval:
                await asyncio.sleep(self._heartbeat_interval - quiet)
                continue
            if not (self._pending or self._calls):
                await asyncio.sleep(self._heartbeat_interval)
                continue
            probed_at = loop.time()
            self._probe_due = True
            self._send_wake.set()
            await asyncio.sleep(self._heartbeat_timeout)
            if self._received_at < probed_at:
                logger.warning(
                    "callcredit stream silent for %.1f s, heartbeat unanswered: reconnecting",
                    loop.time() - self._received_at,
                )
                return

    async def _send(self, stream: _ControlCall) -> None:
        """Write what is queued in messages of at most max_ops_per_message operations,
        while fewer than max_messages_in_flight are unanswered. Operations queued while
        a write is in flight go out together in the next message. A due heartbeat probe
        goes out whatever the window (an empty message)."""
        wake = self._send_wake
        max_ops = self._max_ops_per_message
        window = self._max_messages_in_flight
        try:
            while True:
                unsent = self._unsent
                in_flight = self._in_flight
                if unsent and len(in_flight) < window:
                    number = self._message_count + 1
                    batch: list[_Pending] = []
                    while unsent and len(batch) < max_ops:
                        entry = unsent.popleft()
                        if entry.state == _PENDING:
                            entry.sent = True
                            entry.message = number
                            batch.append(entry)
                    if not batch and not self._probe_due:
                        continue
                    request = credit_control_pb2.ControlRequest()
                    if batch:
                        self._message_count = number
                        in_flight[number] = len(batch)
                        _add_operations(request, batch)
                elif self._probe_due:
                    request = credit_control_pb2.ControlRequest()
                else:
                    wake.clear()
                    await wake.wait()
                    continue
                self._probe_due = False  # every message is answered: any one is a probe
                await stream.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError) as err:
            logger.warning("callcredit stream write failed: %s", err)

    async def _receive(self, stream: _ControlCall) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                response = await stream.read()
                self._received_at = loop.time()
                if not isinstance(response, credit_control_pb2.ControlResponse):
                    logger.warning("callcredit server ended the stream")  # read() gave EOF
                    return
                unavailable = self._dispatch(response)
                if unavailable is not None:
                    logger.warning("callcredit server unavailable: %s", unavailable)
                    return
                self._failover.reset()
                self._trying_since = None
                self._refusals.clear()
        except grpc.RpcError as err:
            error = CallcreditError.from_rpc_error(err)
            if error.reason == NOT_PRIMARY:
                self._primary_hint = error.metadata.get(PRIMARY_KEY, "")
                self._refusals[self._failover.current] = (
                    f"{self._failover.current} said: {error.message}"
                )
            elif error.code in _STREAM_REFUSED_CODES:
                error = CallcreditError(
                    error.reason,
                    f"{self._failover.current} refused the stream: {error.message}",
                    error.code,
                )
                self._unreachable = error
                self._fail_waiting(error)
            logger.warning("callcredit stream failed: %s", error)

    def _finish(self, entry: _Pending) -> None:
        """An answered entry leaves _pending (done by the caller): free what it held."""
        entry.state = _DONE
        if entry.message:
            self._answered(entry)
        if self._slot_waiters:
            self._release_slot()
        else:
            self._free_slots += 1

    def _dispatch(self, response: credit_control_pb2.ControlResponse) -> CallcreditError | None:
        """Apply one server message. Returns the refusal if the server said UNAVAILABLE
        (draining, or its journal failed): those operations stay pending for the next
        stream, which the caller opens after a backoff."""
        unavailable: CallcreditError | None = None
        pending = self._pending
        for outcome in response.outcomes:
            request_id = outcome.request_id
            entry = pending.get(request_id)
            if entry is None:
                continue  # answered before, or dropped (its reserve was cancelled)
            result = outcome.WhichOneof("result")
            future = entry.future
            if result == "renew" or result == "reserve":
                del pending[request_id]
                self._finish(entry)
                message = outcome.renew.grant if result == "renew" else outcome.reserve.grant
                grant = Grant(
                    message.allowed_seconds, message.final, message.validity_seconds, message.held
                )
                call = entry.call
                if call._renewal is entry:
                    call._renewal = None
                call._granted(grant, entry.submitted_at, entry.used_seconds)
                if future is not None and not future.done():
                    future.set_result(grant)
                continue
            if result == "release":
                del pending[request_id]
                self._finish(entry)
                if future is not None and not future.done():
                    future.set_result(outcome.release)
                continue
            if result == "error":
                error = CallcreditError.from_status(outcome.error)
                if error.code is grpc.StatusCode.UNAVAILABLE:
                    unavailable = error
                    continue
            else:
                error = CallcreditError(
                    grpc.StatusCode.UNKNOWN.name,
                    "outcome without a result",
                    grpc.StatusCode.UNKNOWN,
                )
            del pending[request_id]
            self._finish(entry)
            if future is None:
                entry.call._renewal_refused(error)
            elif not future.done():
                future.set_exception(error)
        for update in response.grant_updates:
            updated = self._calls.get(update.call_id)
            if updated is not None:
                # The server re-grants "as a Renew with their last reported used_seconds".
                updated._granted(_grant(update), None, updated._reported_used_seconds)
        for termination in response.terminations:
            terminated = self._calls.get(termination.call_id)
            if terminated is not None:
                terminated._order_hangup(termination.reason)
        return unavailable

    def _shut_down(self, reason: str, message: str, *, order_hangup: bool) -> None:
        """Fail everything that waits and stop every renewal; the stream is not coming back."""
        if self._closed is not None:
            return
        self._closed = (reason, message)
        for call in list(self._calls.values()):
            if order_hangup:
                call._order_hangup(reason)
            else:
                call._settle(reason)
        self._timers.clear()
        for entry in self._pending.values():
            future = entry.future
            if future is not None and not future.done():
                future.set_exception(self._closed_error())
        for waiter in self._slot_waiters:  # they find the client closed
            if not waiter.done():
                waiter.set_result(None)
        self._slot_waiters.clear()
