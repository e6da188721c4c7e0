"""The async dialer library: one Control stream per dialer process, carrying every call.

Why it is shaped this way (DESIGN.md, "Shape" and "Contract"):

- In Python gRPC costs about as much per *message* as the server's decision costs per
  *operation*, so operations due at the same moment travel together: a sender task takes
  what is queued and writes it as one ControlRequest (at most MAX_OPS_PER_MESSAGE).
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
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeAlias

import grpc

from callcredit.admin import open_channel, token_metadata
from callcredit.errors import CallcreditError, StreamClosedError
from callcredit.v1 import credit_control_pb2, credit_control_pb2_grpc

__all__ = [
    "ALLOWED_SECONDS_REACHED",
    "CALL_RELEASED",
    "CLIENT_CLOSED",
    "FINAL_GRANT_REACHED",
    "HEARTBEAT_INTERVAL_SECONDS",
    "HEARTBEAT_TIMEOUT_SECONDS",
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
    "HangupCallback",
    "ReleaseResult",
    "SystemClock",
]

logger = logging.getLogger(__name__)

MAX_OPS_PER_MESSAGE = 1_000
"""Most operations in one ControlRequest. The server takes 10,000; at ~300 bytes per
operation 1,000 stays far below gRPC's 4 MiB message limit and already amortises the
per-message cost (DESIGN.md measures 100 per message at ~29x the throughput of 1)."""

MAX_PENDING_OPERATIONS = 10_000
"""Most operations awaiting an answer at once; one more waits for a free slot. It bounds
the pending map and the send queue, which only ever holds pending operations."""

RECONNECT_BACKOFF_INITIAL_SECONDS = 0.05
"""First reconnect delay ceiling; doubled after each stream that ends without a healthy
answer, reset by one."""

RECONNECT_BACKOFF_MAX_SECONDS = 5.0
"""Reconnect delay ceiling. Calls keep running while the stream is down and expire after
their validity (120 s by default), so retrying must stay well inside that."""

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
    """How long a call may last (DESIGN.md, Calls): the server's Grant, minus the call_id."""

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


@dataclass(slots=True, eq=False)
class _Pending:
    """One operation sent (or about to be) and not yet answered."""

    operation: credit_control_pb2.Operation
    future: asyncio.Future[credit_control_pb2.Outcome]
    call: DialerCall
    submitted_at: float
    """When it was queued: the server started the grant's validity no earlier."""
    used_seconds: int
    """The talk time this operation reports; a grant it earns is counted from there."""
    sent: bool = False
    """Written to some stream at least once, so the server may have acted on it."""


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
    ) -> None:
        self.call_id = call_id
        self.account_id = account_id
        self.destination = destination
        self.requested_seconds = requested_seconds
        self._client = client
        self._on_hangup = on_hangup
        self._grant: Grant | None = None
        self._granted_at = 0.0
        self._grant_base_used_seconds = 0
        self._reported_used_seconds = 0
        self._answered_at: float | None = None
        self._sequence = 0
        self._renewed_at: float | None = None
        self._reattach = False
        self._ended = False
        self._wake = asyncio.Event()
        self._hangup: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._renewer: asyncio.Task[None] | None = None

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
        return int(self._client._clock.monotonic() - self._answered_at)

    @property
    def hangup_reason(self) -> str | None:
        """Why the call must hang up, or None while it may go on."""
        return self._hangup.result() if self._hangup.done() else None

    def answered(self) -> None:
        """Start the talk clock now. Until then the call is ringing: it reports
        used_seconds = 0 and renews only to stay valid. A second call changes nothing."""
        if self._answered_at is None:
            self._answered_at = self._client._clock.monotonic()
            self._wake.set()

    async def must_hang_up(self) -> str:
        """Wait until the call must hang up and return why: FINAL_GRANT_REACHED (or
        ALLOWED_SECONDS_REACHED when renewals cannot get through), a pushed termination's
        reason (ACCOUNT_SUSPENDED, ADMIN), or the reason a renewal was refused
        (CALL_ALREADY_ENDED after an expiry). Resolves with CALL_RELEASED or CLIENT_CLOSED
        once the call or the client is gone, so nothing waits forever."""
        return await asyncio.shield(self._hangup)

    async def release(self, used_seconds: int | None = None) -> ReleaseResult:
        """End the call and return its charge. `used_seconds` defaults to the talk time
        since answered(). The release runs to its answer even if the caller is cancelled:
        a lost release leaves the call to expire, charged its whole allowance."""
        if self._ended:
            raise RuntimeError(f"call {self.call_id!r} was already released")
        used = self.used_seconds if used_seconds is None else used_seconds
        if used < self._reported_used_seconds:
            raise ValueError(
                f"used_seconds={used} is below the {self._reported_used_seconds} s "
                f"already reported for call {self.call_id!r}"
            )
        self._ended = True
        self._settle(CALL_RELEASED)
        task = self._client._spawn(self._release(used), f"callcredit-release-{self.call_id}")
        return await asyncio.shield(task)

    async def _release(self, used_seconds: int) -> ReleaseResult:
        # Stop renewing first, so no Renew is queued behind the Release.
        await self._stop_renewing()
        operation = credit_control_pb2.Operation(
            release=credit_control_pb2.ReleaseRequest(
                call_id=self.call_id, used_seconds=used_seconds
            )
        )
        try:
            outcome = await self._client._request(self, operation, used_seconds)
        finally:
            self._client._forget(self)
        response = outcome.release
        return ReleaseResult(
            call_id=self.call_id,
            used_seconds=used_seconds,
            billed_seconds=response.billed_seconds,
            charged=response.charged,
            shortfall=response.shortfall,
            balance=response.balance,
        )

    async def _abandon(self) -> None:
        """Release a call whose reserve() was cancelled after the Reserve went out: the
        server may hold it, and an unreleased call is charged its whole allowance."""
        self._ended = True
        operation = credit_control_pb2.Operation(
            release=credit_control_pb2.ReleaseRequest(call_id=self.call_id, used_seconds=0)
        )
        try:
            await self._client._request(self, operation, 0)
        except CallcreditError as err:
            # CALL_NOT_FOUND: the Reserve never reached the server. Nothing to undo.
            logger.debug("abandoned call %s: release answered %s", self.call_id, err.reason)

    def _granted(
        self, grant: credit_control_pb2.Grant, granted_at: float | None, base_used_seconds: int
    ) -> None:
        """Take a grant from an answer (granted_at = when the request was queued) or a push
        (granted_at None: keep the earlier validity start, which is the safer guess)."""
        if self._ended:
            return
        self._grant = Grant(
            allowed_seconds=grant.allowed_seconds,
            final=grant.final,
            validity_seconds=grant.validity_seconds,
            held=grant.held,
        )
        if granted_at is not None:
            self._granted_at = granted_at
        self._grant_base_used_seconds = base_used_seconds
        self._wake.set()

    def _order_hangup(self, reason: str) -> None:
        if self._hangup.done():
            return
        self._hangup.set_result(reason)
        if self._on_hangup is not None:
            # Scheduled, not called: a failing callback must not break the stream's reader.
            asyncio.get_running_loop().call_soon(self._on_hangup, self, reason)

    def _settle(self, reason: str) -> None:
        if not self._hangup.done():
            self._hangup.set_result(reason)

    def _reattach_soon(self) -> None:
        """Renew at once on a new stream, so the server pushes to it from now on."""
        if self._grant is not None and not self._ended:
            self._reattach = True
            self._wake.set()

    def _start_renewing(self) -> None:
        self._renewer = self._client._spawn(self._keep_alive(), f"callcredit-renew-{self.call_id}")

    async def _stop_renewing(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.wait((self._renewer,))

    async def _keep_alive(self) -> None:
        """Renew on schedule (or at once after a reconnect) and order the hang-up when talk
        time reaches the grant, until released. A renewal runs as its own task so that a
        server that does not answer cannot hold up the hang-up. A refused renewal ends
        the call's renewing."""
        clock = self._client._clock
        renewal: asyncio.Task[None] | None = None
        try:
            while True:
                self._wake.clear()
                if renewal is not None and renewal.done():
                    try:
                        renewal.result()
                    except CallcreditError as err:
                        logger.info("call %s: renewal refused: %s", self.call_id, err)
                        self._order_hangup(err.reason)
                        return
                    renewal = None
                now = clock.monotonic()
                hangup_at = self._hangup_at()
                if hangup_at is not None and now >= hangup_at:
                    final = self.grant.final
                    self._order_hangup(FINAL_GRANT_REACHED if final else ALLOWED_SECONDS_REACHED)
                    hangup_at = None
                wake_at = hangup_at
                if renewal is None:
                    renew_at = self._renew_at()
                    if self._reattach or now >= renew_at:
                        self._reattach = False
                        renewal = asyncio.create_task(self._renew(now))
                        renewal.add_done_callback(lambda _: self._wake.set())
                        continue
                    wake_at = renew_at if wake_at is None else min(wake_at, renew_at)
                if wake_at is None:
                    await self._wake.wait()
                else:
                    await self._sleep_or_wake(wake_at - now)
        finally:
            if renewal is not None:
                renewal.cancel()
                await asyncio.wait((renewal,))
                if not renewal.cancelled():
                    renewal.exception()  # seen: once renewing stops, its answer is moot

    async def _renew(self, now: float) -> None:
        used = self.used_seconds
        self._sequence += 1
        self._renewed_at = now
        self._reported_used_seconds = max(self._reported_used_seconds, used)
        operation = credit_control_pb2.Operation(
            renew=credit_control_pb2.RenewRequest(
                call_id=self.call_id,
                sequence=self._sequence,
                used_seconds=used,
                requested_seconds=self.requested_seconds,
            )
        )
        await self._client._request(self, operation, used)

    def _renew_at(self) -> float:
        grant = self.grant
        validity_margin = min(VALIDITY_MARGIN_SECONDS, grant.validity_seconds / 2)
        renew_at = self._granted_at + grant.validity_seconds - validity_margin
        if self._answered_at is not None and not grant.final:
            window = max(grant.allowed_seconds - self._grant_base_used_seconds, 0)
            talk_margin = min(RENEW_MARGIN_SECONDS, window / 2)
            renew_at = min(renew_at, self._answered_at + grant.allowed_seconds - talk_margin)
        if self._renewed_at is not None:
            renew_at = max(renew_at, self._renewed_at + RENEW_INTERVAL_MIN_SECONDS)
        return renew_at

    def _hangup_at(self) -> float | None:
        """When talk time reaches the grant. A later grant moves it, which is how a pushed
        grant_update cancels a pending FINAL_GRANT_REACHED."""
        if self._answered_at is None or self._hangup.done():
            return None
        return self._answered_at + self.grant.allowed_seconds

    async def _sleep_or_wake(self, seconds: float) -> None:
        sleeper = asyncio.create_task(self._client._clock.sleep(seconds))
        waker = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()


class DialerClient:
    """A dialer process's connection to callcredit: one Control stream for all its calls.

    `target` is an address (a channel is opened and closed with the client: TLS if `tls`,
    `ca_file` or a client certificate `cert_file` + `key_file` is given, else plaintext) or
    a grpc.aio.Channel you own (interceptors, your own reconnect settings; give it the
    keepalive options of _CHANNEL_OPTIONS too: the library cannot replace a channel it
    does not own when the heartbeat finds its connection dead). `token`, a dialer token
    of the server's configuration, goes with the stream either way. Use it as
    `async with DialerClient(...) as dialer:`. Closing does not release open calls: release
    them first, or they expire and are charged their allowance.
    """

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        clock: Clock | None = None,
        max_pending_operations: int = MAX_PENDING_OPERATIONS,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        heartbeat_interval_seconds: float = HEARTBEAT_INTERVAL_SECONDS,
        heartbeat_timeout_seconds: float = HEARTBEAT_TIMEOUT_SECONDS,
    ) -> None:
        if max_pending_operations < 1:
            raise ValueError("max_pending_operations must be at least 1")
        if heartbeat_interval_seconds <= 0 or heartbeat_timeout_seconds <= 0:
            raise ValueError("heartbeat interval and timeout must be positive")
        self._heartbeat_interval = heartbeat_interval_seconds
        self._heartbeat_timeout = heartbeat_timeout_seconds
        self._received_at = 0.0  # loop time of the stream's last message (or its start)
        self._probe_due = False  # the sender writes a message even with nothing queued
        tls_files = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
        if not isinstance(target, str) and (tls or any(tls_files.values())):
            raise ValueError("TLS options apply to a channel the client opens, not to yours")
        if bool(cert_file) != bool(key_file):
            raise ValueError("a client certificate needs both cert_file and key_file")
        self._target = target
        self._tls = tls
        self._tls_files = tls_files
        self._metadata = token_metadata(token)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._slots = asyncio.Semaphore(max_pending_operations)
        self._pending: dict[str, _Pending] = {}
        # Operations the current stream has yet to write, oldest first; a subset of
        # _pending (so bounded by it), rebuilt from _pending on every new stream.
        self._unsent: OrderedDict[str, _Pending] = OrderedDict()
        self._unsent_ready = asyncio.Event()
        self._calls: dict[str, DialerCall] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._channel: grpc.aio.Channel | None = None
        self._stub: credit_control_pb2_grpc.CreditControlServiceAsyncStub | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._closed: tuple[str, str] | None = None
        self._request_prefix = uuid.uuid4().hex[:12]
        self._request_count = 0
        self._backoff_seconds = RECONNECT_BACKOFF_INITIAL_SECONDS

    async def __aenter__(self) -> Self:
        if self._supervisor is not None:
            raise RuntimeError("a DialerClient is entered once")
        if isinstance(self._target, str):
            self._channel = self._open_channel()
        else:
            self._channel = self._target
        self._stub = credit_control_pb2_grpc.CreditControlServiceStub(self._channel)
        self._supervisor = asyncio.create_task(self._run(), name="callcredit-dialer-stream")
        return self

    def _open_channel(self) -> grpc.aio.Channel:
        """A new channel (a new connection) to the address the client was given."""
        assert isinstance(self._target, str)
        return open_channel(
            self._target, tls=self._tls, options=_CHANNEL_OPTIONS, **self._tls_files
        )

    async def _reopen_channel(self) -> None:
        """Replace a channel we own whose connection went silent: a new stream on the
        old channel would ride the same dead connection."""
        if not isinstance(self._target, str) or self._closing:
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
    ) -> DialerCall:
        """Open a call and return its handle, which renews itself from now on.

        Raises CallcreditError when refused (reason INSUFFICIENT_FUNDS, ACCOUNT_SUSPENDED,
        CONCURRENT_CALL_LIMIT, ...). Waits through reconnects; bound it with
        asyncio.timeout if you must. Cancelled after the Reserve went out, the call is
        released in the background; reserve it again under a new call_id.
        """
        if call_id in self._calls:
            raise ValueError(f"call {call_id!r} is already open on this dialer")
        call = DialerCall(self, call_id, account_id, destination, requested_seconds, on_hangup)
        operation = credit_control_pb2.Operation(
            reserve=credit_control_pb2.ReserveRequest(
                call_id=call_id,
                account_id=account_id,
                destination=destination,
                requested_seconds=requested_seconds,
            )
        )
        self._calls[call_id] = call
        try:
            entry = await self._submit(call, operation, 0)
        except BaseException:
            self._forget(call)
            raise
        try:
            await entry.future
        except asyncio.CancelledError:
            self._forget(call)
            if entry.sent and self._closed is None:
                self._spawn(call._abandon(), f"callcredit-abandon-{call_id}")
            raise
        except BaseException:
            self._forget(call)
            raise
        finally:
            self._retire(entry)
        call._start_renewing()
        return call

    async def aclose(self) -> None:
        """Stop the stream and every renewal; whatever still waits gets StreamClosedError."""
        if self._closing or self._supervisor is None:
            return
        self._closing = True
        self._shut_down(CLIENT_CLOSED, "the dialer client was closed", order_hangup=False)
        self._supervisor.cancel()
        await asyncio.wait((self._supervisor, *self._tasks))
        if isinstance(self._target, str) and self._channel is not None:
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

    async def _submit(
        self, call: DialerCall, operation: credit_control_pb2.Operation, used_seconds: int
    ) -> _Pending:
        """Queue an operation for the stream; wait for a slot when MAX_PENDING are out."""
        if self._supervisor is None:
            raise RuntimeError("use `async with DialerClient(...) as dialer:`")
        if self._closed is not None:
            raise self._closed_error()
        await self._slots.acquire()
        if self._closed is not None:
            self._slots.release()
            raise self._closed_error()
        self._request_count += 1
        operation.request_id = f"{self._request_prefix}:{self._request_count}"
        entry = _Pending(
            operation=operation,
            future=asyncio.get_running_loop().create_future(),
            call=call,
            submitted_at=self._clock.monotonic(),
            used_seconds=used_seconds,
        )
        self._pending[operation.request_id] = entry
        self._unsent[operation.request_id] = entry
        self._unsent_ready.set()
        return entry

    def _retire(self, entry: _Pending) -> None:
        """Forget an operation whose waiter is done (answered, refused or cancelled)."""
        request_id = entry.operation.request_id
        self._pending.pop(request_id, None)
        self._unsent.pop(request_id, None)
        self._slots.release()

    async def _request(
        self, call: DialerCall, operation: credit_control_pb2.Operation, used_seconds: int
    ) -> credit_control_pb2.Outcome:
        """Send an operation and return its Outcome; a refusal raises CallcreditError."""
        entry = await self._submit(call, operation, used_seconds)
        try:
            return await entry.future
        finally:
            self._retire(entry)

    async def _run(self) -> None:
        """Keep a stream up: serve one until it ends, back off with jitter, start again."""
        try:
            while True:
                await self._serve_stream()
                ceiling = self._backoff_seconds
                self._backoff_seconds = min(ceiling * 2, RECONNECT_BACKOFF_MAX_SECONDS)
                # Half fixed, half random: a fleet of dialers cut off by one server restart
                # does not come back in one burst, and none retries in a tight loop.
                delay = ceiling / 2 + random.uniform(0, ceiling / 2)
                logger.warning("callcredit stream ended; reconnecting in %.3f s", delay)
                await asyncio.sleep(delay)
        except Exception as exc:
            # A bug, not a network failure (those end _serve_stream normally). Fail loudly
            # rather than leave calls waiting on a stream that is never coming back.
            logger.exception("callcredit dialer stream failed")
            self._shut_down(STREAM_FAILED, f"dialer stream failed: {exc!r}", order_hangup=True)

    async def _serve_stream(self) -> None:
        assert self._stub is not None
        stream = self._stub.Control(wait_for_ready=True, metadata=self._metadata)
        # Everything unanswered goes out again: every operation is idempotent.
        self._unsent = OrderedDict(
            (request_id, entry)
            for request_id, entry in self._pending.items()
            if not entry.future.done()
        )
        if self._unsent:
            self._unsent_ready.set()
        for call in self._calls.values():
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
            self._unsent_ready.set()
            await asyncio.sleep(self._heartbeat_timeout)
            if self._received_at < probed_at:
                logger.warning(
                    "callcredit stream silent for %.1f s, heartbeat unanswered: reconnecting",
                    loop.time() - self._received_at,
                )
                return

    async def _send(self, stream: _ControlCall) -> None:
        """Write what is queued, up to MAX_OPS_PER_MESSAGE operations per message. Ops
        queued while a write is in flight go out together in the next one."""
        try:
            while True:
                await self._unsent_ready.wait()
                batch: list[_Pending] = []
                while self._unsent and len(batch) < MAX_OPS_PER_MESSAGE:
                    batch.append(self._unsent.popitem(last=False)[1])
                if not self._unsent:
                    self._unsent_ready.clear()
                if not batch and not self._probe_due:
                    continue
                self._probe_due = False  # every message is answered: any one is a probe
                for entry in batch:
                    entry.sent = True
                request = credit_control_pb2.ControlRequest(
                    operations=[entry.operation for entry in batch]
                )
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
                self._backoff_seconds = RECONNECT_BACKOFF_INITIAL_SECONDS
        except grpc.RpcError as err:
            logger.warning("callcredit stream failed: %s", err)

    def _dispatch(self, response: credit_control_pb2.ControlResponse) -> CallcreditError | None:
        """Apply one server message. Returns the refusal if the server said UNAVAILABLE
        (draining, or its journal failed): those operations stay pending for the next
        stream, which the caller opens after a backoff."""
        unavailable: CallcreditError | None = None
        for outcome in response.outcomes:
            entry = self._pending.get(outcome.request_id)
            if entry is None or entry.future.done():
                continue  # its waiter gave up (cancelled) or it was answered before
            result = outcome.WhichOneof("result")
            if result == "error":
                error = CallcreditError.from_status(outcome.error)
                if error.code is grpc.StatusCode.UNAVAILABLE:
                    unavailable = error
                    continue
                del self._pending[outcome.request_id]
                entry.future.set_exception(error)
                continue
            if result is None:
                del self._pending[outcome.request_id]
                entry.future.set_exception(
                    CallcreditError("UNKNOWN", "outcome without a result", grpc.StatusCode.UNKNOWN)
                )
                continue
            del self._pending[outcome.request_id]
            if result == "reserve":
                entry.call._granted(outcome.reserve.grant, entry.submitted_at, entry.used_seconds)
            elif result == "renew":
                entry.call._granted(outcome.renew.grant, entry.submitted_at, entry.used_seconds)
            entry.future.set_result(outcome)
        for grant in response.grant_updates:
            call = self._calls.get(grant.call_id)
            if call is not None:
                # The server re-grants "as a Renew with their last reported used_seconds".
                call._granted(grant, None, call._reported_used_seconds)
        for termination in response.terminations:
            call = self._calls.get(termination.call_id)
            if call is not None:
                call._order_hangup(termination.reason)
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
            if call._renewer is not None:
                call._renewer.cancel()
        for entry in self._pending.values():
            if not entry.future.done():
                entry.future.set_exception(self._closed_error())
