"""Locust load test for callcredit: every locust user is one dialer.

Each dialer holds ONE long-lived bidirectional ``Control`` stream and runs a campaign
over it: call attempts arrive at ``--call-rate`` per second (Poisson), each is reserved,
and is either left unanswered (released at once with ``used_seconds=0``) or answered and
talks for a lognormal number of seconds, renewing before its grant or validity runs out,
hanging up when a final grant is reached or a termination is pushed, and releasing with
the seconds it used. A background greenlet per locust process tops accounts up through
``AdminService``. See loadtest/README.md for how to run it and what the numbers mean.

gRPC under locust: locust runs on gevent, where ``grpc.aio`` does not work. The sync API
does, once ``grpc.experimental.gevent.init_gevent()`` has run (after gevent's
monkey-patching, which importing locust does, and before any channel exists): since
grpcio 1.51 completion-queue polling runs on gevent's native thread pool, and the
request iterator of a streaming call is consumed by a (monkey-patched, so green)
thread. So here, per dialer:

- a request generator fed from a bounded gevent queue writes ``ControlRequest`` s,
  coalescing whatever operations are queued into one message (at most ``--batch-max``);
- one reader greenlet takes ``ControlResponse`` s and resolves the waiting operation
  by ``request_id`` (a gevent ``AsyncResult``), and applies pushed ``grant_updates``
  and ``terminations`` to the calls they name.

Reporting (``events.request``): request_type is the operation (``reserve``, ``renew``,
``release``, ``topup``); name is ``Control`` (or ``AdminService.TopUp``) for an accepted
operation, and ``refused:<REASON>`` for a business refusal (INSUFFICIENT_FUNDS,
CONCURRENT_CALL_LIMIT, ACCOUNT_SUSPENDED, ACCOUNT_CLOSED), which is a *success*: the
server did its job. Failures are transport errors, timeouts, a broken stream, any other
error reason, and outcomes of the wrong kind. Response time is from queueing the
operation to its outcome arriving; response length is the outcome's size in bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import math
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
import gevent.event
import gevent.pool
import gevent.queue
import grpc
import grpc.experimental.gevent
import locust.stats
from locust import User, events, task
from locust.env import Environment
from locust.runners import LocalRunner, MasterRunner, WorkerRunner

from callcredit.errors import CallcreditError, ErrorReason
from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc

# After locust's monkey-patching (done by importing locust), before any channel.
grpc.experimental.gevent.init_gevent()

logger = logging.getLogger("callcredit.loadtest")

REFUSALS = frozenset(
    {
        ErrorReason.INSUFFICIENT_FUNDS,
        ErrorReason.CONCURRENT_CALL_LIMIT,
        ErrorReason.ACCOUNT_SUSPENDED,
        ErrorReason.ACCOUNT_CLOSED,
    }
)
"""Error reasons that are the server refusing on business grounds: counted, not failed."""

CURRENCY = "VND"
RATES = (
    # 19.66 d/s to Vietnamese mobiles in 6/6 s increments; 0.5 d/s elsewhere, per minute.
    admin_pb2.Rate(prefix="849", price_per_minute_micros=1_179_600_000,
                   first_increment_seconds=6, next_increment_seconds=6, connect_fee=0),
    admin_pb2.Rate(prefix="", price_per_minute_micros=30_000_000,
                   first_increment_seconds=60, next_increment_seconds=60, connect_fee=0),
)  # fmt: skip
MOBILE_SHARE = 0.8
"""Share of attempts dialled to +849... (the expensive rate); the rest take the default."""

ATTEMPTS_PER_OPERATION = 3
"""Tries per operation on a timeout or a broken stream (every operation is idempotent)."""
RETRY_PAUSE_SECONDS = 0.2
RENEW_MARGIN_SECONDS = 2.0
"""Renew this many real seconds (at most half the grant's window) before talk time
reaches allowed_seconds, so the answer is back before the call would have to end."""
VALIDITY_MARGIN_SECONDS = 5.0
"""Renew this many real seconds (at most half the validity) before the grant's validity
ends: a silent call expires and is charged its whole allowance."""
RENEW_INTERVAL_MIN_SECONDS = 0.2
"""Never renew one call more often than this (real seconds)."""
STOP_WAIT_SECONDS = 15.0
"""How long a stopping dialer waits for its calls to be released and its stream closed."""
CLOSE_SECONDS = 5.0
POLLER_HEADROOM = 10
"""Threads of gevent's pool beyond one per open dialer channel (unary admin calls, DNS)."""
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

# Campaign counters of this process (see README "Summary"). Money in minor units, talk
# time in call seconds. Workers send theirs to the master with their stats reports.
TALLY: Counter[str] = Counter()
_RUN_TOKEN = uuid.uuid4().hex[:10]
"""Makes call ids and top-up keys unique per process and run (the server remembers ids)."""


_Handler = TypeVar("_Handler", bound=Callable[..., None])


def _listener(hook: Any) -> Callable[[_Handler], _Handler]:
    """@_listener(events.x): add_listener, typed (locust's EventHook is not annotated)."""

    def register(handler: _Handler) -> _Handler:
        hook.add_listener(handler)
        return handler

    return register


# -- options ---------------------------------------------------------------------------


@_listener(events.init_command_line_parser)
def _add_options(parser: argparse.ArgumentParser, **_kwargs: Any) -> None:
    add = parser.add_argument  # (locust's own add_argument: it knows include_in_web_ui)
    add("--accounts", type=int, default=20, help="accounts the dialers bill (default 20)")
    add(
        "--account-prefix",
        default="lt",
        help="account ids are PREFIX-0000 ...; the tariff is PREFIX-tariff (default lt)",
    )
    add(
        "--call-rate",
        type=float,
        default=1.0,
        help="call attempts per second per dialer, Poisson arrivals (default 1.0)",
    )
    add(
        "--answer-ratio",
        type=float,
        default=0.6,
        help="share of attempts answered; the rest are released unanswered (default 0.6)",
    )
    add(
        "--talk-mean",
        type=float,
        default=90.0,
        help="mean talk time of an answered call, call seconds (default 90)",
    )
    add(
        "--talk-sigma",
        type=float,
        default=1.0,
        help="sigma of the lognormal talk time (default 1.0; 0 = always the mean)",
    )
    add(
        "--talk-max",
        type=int,
        default=1800,
        help="cap on one call's talk time, call seconds (default 1800)",
    )
    add(
        "--grant-seconds",
        type=int,
        default=60,
        help="requested_seconds of each reserve and renew; 0 = server default (default 60)",
    )
    add(
        "--time-scale",
        type=float,
        default=1.0,
        help="call seconds per real second: 20 plays a 60 s call in 3 s (default 1)",
    )
    add(
        "--topup-interval",
        type=float,
        default=5.0,
        help="real seconds between top-ups per locust process; 0 = none (default 5)",
    )
    add("--topup-amount", type=int, default=100_000, help="minor units per top-up (default 100000)")
    add("--setup", action="store_true", default=False,
        help="at test start: put the tariff, create the accounts (existing ones are "
             "fine) and top each up with --initial-balance")  # fmt: skip
    add(
        "--initial-balance",
        type=int,
        default=10_000_000,
        help="minor units --setup tops each account up with (default 10000000)",
    )
    add(
        "--max-concurrent-calls",
        type=int,
        default=0,
        help="per-account call cap --setup creates accounts with; 0 = none (default 0)",
    )
    add(
        "--max-calls-per-user",
        type=int,
        default=500,
        help="open calls one dialer holds at most; attempts beyond are skipped (default 500)",
    )
    add(
        "--batch-max",
        type=int,
        default=100,
        help="operations per ControlRequest at most (default 100)",
    )
    add(
        "--op-timeout",
        type=float,
        default=10.0,
        help="seconds to wait for one operation's outcome (default 10)",
    )
    add(
        "--summary-json",
        default="",
        include_in_web_ui=False,
        help="write the campaign summary (counters) to this JSON file at the end",
    )


@dataclass(frozen=True, slots=True)
class Options:
    """The campaign options, read from locust's parsed options (which the web UI edits)."""

    accounts: int
    account_prefix: str
    call_rate: float
    answer_ratio: float
    talk_mean: float
    talk_sigma: float
    talk_max: int
    grant_seconds: int
    time_scale: float
    topup_interval: float
    topup_amount: int
    setup: bool
    initial_balance: int
    max_concurrent_calls: int
    max_calls_per_user: int
    batch_max: int
    op_timeout: float
    summary_json: str

    @classmethod
    def of(cls, environment: Environment) -> Options:
        parsed = environment.parsed_options
        if parsed is None:
            raise RuntimeError("no parsed options: run this file with the locust command")
        options = cls(**{name: getattr(parsed, name) for name in cls.__dataclass_fields__})
        options.check()
        return options

    def check(self) -> None:
        problems = [
            message
            for ok, message in (
                (self.accounts >= 1, "--accounts must be >= 1"),
                (self.call_rate > 0, "--call-rate must be > 0"),
                (0 <= self.answer_ratio <= 1, "--answer-ratio must be within 0..1"),
                (self.talk_mean >= 1, "--talk-mean must be >= 1"),
                (self.talk_sigma >= 0, "--talk-sigma must be >= 0"),
                (self.talk_max >= 1, "--talk-max must be >= 1"),
                (0 <= self.grant_seconds <= 86_400, "--grant-seconds must be within 0..86400"),
                (self.time_scale > 0, "--time-scale must be > 0"),
                (self.topup_interval >= 0, "--topup-interval must be >= 0"),
                (1 <= self.topup_amount <= 10**15, "--topup-amount must be within 1..10^15"),
                (0 <= self.initial_balance <= 10**15, "--initial-balance must be 0..10^15"),
                (self.max_concurrent_calls >= 0, "--max-concurrent-calls must be >= 0"),
                (self.max_calls_per_user >= 1, "--max-calls-per-user must be >= 1"),
                (1 <= self.batch_max <= 10_000, "--batch-max must be within 1..10000"),
                (self.op_timeout > 0, "--op-timeout must be > 0"),
            )
            if not ok
        ]
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def tariff_id(self) -> str:
        return f"{self.account_prefix}-tariff"

    def account_id(self, n: int) -> str:
        return f"{self.account_prefix}-{n:04d}"

    def talk_seconds(self, rng: random.Random) -> int:
        """A lognormal talk time with mean --talk-mean, whole seconds, 1..--talk-max."""
        sigma = self.talk_sigma
        mu = math.log(self.talk_mean) - sigma * sigma / 2
        return max(1, min(self.talk_max, round(rng.lognormvariate(mu, sigma))))


def grpc_target(host: str | None) -> str:
    """host:port from locust's --host, with any scheme (grpc://, http://) dropped."""
    if not host:
        raise ValueError("pass the server as --host HOST:PORT (e.g. 127.0.0.1:50051)")
    return host.split("://", 1)[-1].rstrip("/")


def _fire(
    environment: Environment,
    request_type: str,
    name: str,
    started: float,
    response_length: int = 0,
    exception: BaseException | None = None,
) -> None:
    request: Any = environment.events.request  # an EventHook: untyped
    request.fire(
        request_type=request_type,
        name=name,
        response_time=(time.perf_counter() - started) * 1000,
        response_length=response_length,
        exception=exception,
        context={},
    )


class OutcomeError(Exception):
    """An operation answered with something that is neither its result nor a refusal."""


class StreamBrokenError(Exception):
    """The Control stream ended (or failed) before the operation was answered."""


# -- the Control stream ----------------------------------------------------------------

_channel_pollers = 0


def _count_channel_poller(delta: int) -> None:
    """Make room for each channel that always has a call in flight (delta +1 / -1).

    Under init_gevent(), grpc waits for a channel's completion-queue events in gevent's
    native thread pool, and a channel with a call open (our Control stream) keeps one
    pool thread blocked in that wait until its next event. The pool holds 10 threads by
    default: with more dialers than that, the other channels' events wait for a free
    thread, which showed up as ~650 ms median latency at 50 dialers and 130 ops/s
    (6 ms with the pool sized to the dialers). So the pool grows with the dialers.
    """
    global _channel_pollers
    _channel_pollers += delta
    pool = gevent.get_hub().threadpool
    pool.maxsize = max(pool.maxsize, _channel_pollers + POLLER_HEADROOM)


class ControlStream:
    """One Control stream: a bounded outbox feeding the request generator, one reader."""

    def __init__(
        self,
        stub: credit_control_pb2_grpc.CreditControlServiceStub,
        *,
        batch_max: int,
        on_grant: Callable[[credit_control_pb2.Grant], None],
        on_termination: Callable[[credit_control_pb2.CallTermination], None],
    ) -> None:
        self._batch_max = batch_max
        self._on_grant = on_grant
        self._on_termination = on_termination
        # Bounded: a dialer that outruns the stream waits in put() (that wait is part of
        # the measured response time, as it would be for a real dialer).
        self._outbox: Any = gevent.queue.Queue(maxsize=max(1_000, 4 * batch_max))
        self.waiters: dict[str, Any] = {}  # request_id -> gevent AsyncResult of an Outcome
        self.broken: BaseException | None = None
        self._call = stub.Control(self._requests())
        self._reader: Any = gevent.spawn(self._read)

    def _requests(self) -> Iterator[credit_control_pb2.ControlRequest]:
        """Runs in grpc's request-consuming (green) thread; None in the outbox ends it."""
        while True:
            first = self._outbox.get()
            if first is None:
                return
            operations = [first]
            closing = False
            while len(operations) < self._batch_max:
                try:
                    more = self._outbox.get_nowait()
                except gevent.queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                operations.append(more)
            yield credit_control_pb2.ControlRequest(operations=operations)
            if closing:
                return

    def _read(self) -> None:
        error: BaseException
        try:
            for response in self._call:
                for outcome in response.outcomes:
                    waiter = self.waiters.pop(outcome.request_id, None)
                    if waiter is not None:  # else: it timed out and was given up
                        waiter.set(outcome)
                for grant in response.grant_updates:
                    self._on_grant(grant)
                for termination in response.terminations:
                    self._on_termination(termination)
            error = StreamBrokenError("the server ended the Control stream")
        except grpc.RpcError as exc:
            error = StreamBrokenError(
                f"Control stream failed: {CallcreditError.from_rpc_error(exc)}"
            )
        self.broken = error
        waiters, self.waiters = self.waiters, {}
        for waiter in waiters.values():
            waiter.set_exception(error)

    def send(self, operation: credit_control_pb2.Operation, timeout: float) -> Any:
        """Queue one operation; answer the AsyncResult its Outcome will be set on."""
        if self.broken is not None:
            raise self.broken
        waiter = gevent.event.AsyncResult()
        self.waiters[operation.request_id] = waiter
        try:
            self._outbox.put(operation, timeout=timeout)
        except gevent.queue.Full:
            self.waiters.pop(operation.request_id, None)
            raise TimeoutError("the stream's outbox stayed full") from None
        return waiter

    def close(self) -> None:
        """Half-close and wait for the server to end the stream; cancel if it does not."""
        if self.broken is None:
            with contextlib.suppress(gevent.queue.Full):
                self._outbox.put(None, timeout=CLOSE_SECONDS)
            self._reader.join(timeout=CLOSE_SECONDS)
        if not self._reader.dead:
            self._call.cancel()
            self._reader.join(timeout=CLOSE_SECONDS)


# -- one call --------------------------------------------------------------------------


class Call:
    """A call's view of its grant, on the real clock (monotonic seconds)."""

    def __init__(self, call_id: str, account_id: str, destination: str) -> None:
        self.call_id = call_id
        self.account_id = account_id
        self.destination = destination
        self.allowed_seconds = 0  # call seconds, cumulative from answer
        self.final = False
        self.validity_seconds = 0  # real seconds (the server's clock)
        self.granted_at = 0.0  # when the request that brought the grant was sent
        self.grant_base_used = 0  # used_seconds reported with that request
        self.answered_at: float | None = None
        self.sequence = 0
        self.reported_used = 0
        self.renewed_at: float | None = None
        self.terminated: str | None = None
        self.wake: Any = gevent.event.Event()

    def apply(self, grant: credit_control_pb2.Grant, sent_at: float, used: int) -> None:
        # A grant never shrinks; an older answer arriving late must not move it back.
        if grant.allowed_seconds >= self.allowed_seconds:
            self.allowed_seconds = grant.allowed_seconds
            self.final = grant.final
        self.validity_seconds = grant.validity_seconds
        self.granted_at = max(self.granted_at, sent_at)
        self.grant_base_used = used

    def used_seconds(self, now: float, scale: float) -> int:
        """Whole call seconds talked by now, never past the grant."""
        if self.answered_at is None:
            return 0
        return min(self.allowed_seconds, math.floor((now - self.answered_at) * scale))

    def renew_at(self, scale: float) -> float:
        validity = float(self.validity_seconds)
        at = self.granted_at + validity - min(VALIDITY_MARGIN_SECONDS, validity / 2)
        if self.answered_at is not None and not self.final:
            window = max(self.allowed_seconds - self.grant_base_used, 0) / scale
            exhausted = self.answered_at + self.allowed_seconds / scale
            at = min(at, exhausted - min(RENEW_MARGIN_SECONDS, window / 2))
        if self.renewed_at is not None:
            at = max(at, self.renewed_at + RENEW_INTERVAL_MIN_SECONDS)
        return at


# -- the dialer ------------------------------------------------------------------------


class Dialer(User):
    """One dialer process: one Control stream, many concurrent calls over it."""

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.options = Options.of(environment)
        self._rng = random.Random()
        self._request_ids = itertools.count(1)
        self._call_numbers = itertools.count(1)
        self._calls: dict[str, Call] = {}
        self._call_greenlets: Any = gevent.pool.Group()
        self._stopping = False
        self._channel: grpc.Channel | None = None
        self._stub: credit_control_pb2_grpc.CreditControlServiceStub | None = None
        self._stream: ControlStream | None = None
        self._name = f"{_RUN_TOKEN}-{id(self):x}"

    def wait_time(self) -> float:
        """Poisson arrivals: exponential gaps with mean 1 / --call-rate."""
        return self._rng.expovariate(self.options.call_rate)

    def on_start(self) -> None:
        _count_channel_poller(+1)
        self._channel = grpc.insecure_channel(
            grpc_target(self.host or self.environment.host), options=CHANNEL_OPTIONS
        )
        self._stub = credit_control_pb2_grpc.CreditControlServiceStub(self._channel)
        self._stream = self._open_stream()

    def on_stop(self) -> None:
        """Hang up every open call (each releases what it used), then close the stream."""
        self._stopping = True
        for call in list(self._calls.values()):
            call.wake.set()
        if not self._call_greenlets.join(timeout=STOP_WAIT_SECONDS):
            TALLY["calls left open at stop"] += len(self._calls)
            logger.error("dialer %s: %d calls not released at stop", self._name, len(self._calls))
            self._call_greenlets.kill(block=True, timeout=CLOSE_SECONDS)
        if self._stream is not None:
            self._stream.close()
        if self._channel is not None:
            self._channel.close()
            _count_channel_poller(-1)

    @task
    def place_call(self) -> None:
        TALLY["attempts"] += 1
        if self._stopping or len(self._call_greenlets) >= self.options.max_calls_per_user:
            TALLY["attempts skipped (dialer at --max-calls-per-user)"] += 1
            return
        options = self.options
        n = next(self._call_numbers)
        if self._rng.random() < MOBILE_SHARE:
            destination = "+849" + "".join(self._rng.choices("0123456789", k=8))
        else:
            destination = "+1" + "".join(self._rng.choices("0123456789", k=10))
        call = Call(
            call_id=f"{options.account_prefix}-{self._name}-{n}",
            account_id=options.account_id(self._rng.randrange(options.accounts)),
            destination=destination,
        )
        talk = options.talk_seconds(self._rng) if self._rng.random() < options.answer_ratio else 0
        self._call_greenlets.spawn(self._run_call, call, talk)

    # -- the stream and operations -------------------------------------------------------

    def _open_stream(self) -> ControlStream:
        assert self._stub is not None
        return ControlStream(
            self._stub,
            batch_max=self.options.batch_max,
            on_grant=self._on_grant_update,
            on_termination=self._on_termination,
        )

    def _on_grant_update(self, grant: credit_control_pb2.Grant) -> None:
        TALLY["grant_updates pushed"] += 1
        call = self._calls.get(grant.call_id)
        if call is not None:
            call.apply(grant, time.monotonic(), call.reported_used)
            call.wake.set()

    def _on_termination(self, termination: credit_control_pb2.CallTermination) -> None:
        TALLY[f"terminations pushed:{termination.reason}"] += 1
        call = self._calls.get(termination.call_id)
        if call is not None:
            call.terminated = termination.reason or "UNSPECIFIED"
            call.wake.set()

    def _operate(
        self, kind: str, build: Callable[[str], credit_control_pb2.Operation]
    ) -> credit_control_pb2.Outcome | None:
        """Send one operation and report it; answer its Outcome (result or refusal), or
        None when it failed every attempt. Retries reuse the operation: it is idempotent."""
        environment = self.environment
        for attempt in range(1, ATTEMPTS_PER_OPERATION + 1):
            if self._stream is None or self._stream.broken is not None:
                TALLY["streams opened after a break"] += self._stream is not None
                self._stream = self._open_stream()
            operation = build(f"{next(self._request_ids)}")
            started = time.perf_counter()
            try:
                waiter = self._stream.send(operation, self.options.op_timeout)
                outcome: credit_control_pb2.Outcome = waiter.get(timeout=self.options.op_timeout)
            except gevent.Timeout:
                self._stream.waiters.pop(operation.request_id, None)
                error: BaseException = TimeoutError(f"no outcome in {self.options.op_timeout} s")
            except (StreamBrokenError, TimeoutError) as exc:
                error = exc
            else:
                result = outcome.WhichOneof("result")
                size = outcome.ByteSize()
                if result == kind:
                    _fire(environment, kind, "Control", started, size)
                    return outcome
                if result == "error":
                    refusal = CallcreditError.from_status(outcome.error)
                    reason = refusal.reason
                    if refusal.error_reason in REFUSALS:
                        TALLY[f"{kind} refused:{reason}"] += 1
                        _fire(environment, kind, f"refused:{reason}", started, size)
                    else:
                        _fire(environment, kind, "Control", started, size, OutcomeError(reason))
                    return outcome
                _fire(environment, kind, "Control", started, size,
                      OutcomeError(f"{kind} answered with {result}"))  # fmt: skip
                return None
            _fire(environment, kind, "Control", started, 0, error)
            if attempt < ATTEMPTS_PER_OPERATION:
                gevent.sleep(RETRY_PAUSE_SECONDS * attempt)
        TALLY[f"{kind} gave up"] += 1
        return None

    # -- a call's life -------------------------------------------------------------------

    def _run_call(self, call: Call, talk: int) -> None:
        options = self.options
        self._calls[call.call_id] = call
        try:
            sent_at = time.monotonic()
            outcome = self._operate(
                "reserve",
                lambda request_id: credit_control_pb2.Operation(
                    request_id=request_id,
                    reserve=credit_control_pb2.ReserveRequest(
                        call_id=call.call_id,
                        account_id=call.account_id,
                        destination=call.destination,
                        requested_seconds=options.grant_seconds,
                    ),
                ),
            )
            if outcome is None or outcome.WhichOneof("result") != "reserve":
                return  # refused or failed: nothing is open
            TALLY["calls reserved"] += 1
            call.apply(outcome.reserve.grant, sent_at, 0)
            if talk == 0 or self._stopping:
                TALLY["calls unanswered"] += 1
                self._release(call, 0, "unanswered")
                return
            TALLY["calls answered"] += 1
            call.answered_at = time.monotonic()
            self._talk(call, talk)
        finally:
            self._calls.pop(call.call_id, None)

    def _talk(self, call: Call, talk: int) -> None:
        """Talk until the call ends, renewing on time; then release what was used."""
        scale = self.options.time_scale
        assert call.answered_at is not None
        ends_at = call.answered_at + talk / scale
        while True:
            now = time.monotonic()
            if call.terminated is not None:
                self._release(call, call.used_seconds(now, scale), f"terminated:{call.terminated}")
                return
            if self._stopping:
                self._release(call, call.used_seconds(now, scale), "load test stopping")
                return
            if now >= ends_at and talk <= call.allowed_seconds:
                self._release(call, talk, "talk completed")
                return
            exhausted_at = call.answered_at + call.allowed_seconds / scale
            if now >= exhausted_at:
                reason = "final grant reached" if call.final else "grant reached before renewal"
                self._release(call, call.allowed_seconds, reason)
                return
            renew_at = call.renew_at(scale)
            if now >= renew_at:
                if not self._renew(call, call.used_seconds(now, scale)):
                    self._release(call, call.used_seconds(time.monotonic(), scale), "renew failed")
                    return
                continue
            call.wake.clear()
            call.wake.wait(timeout=max(0.0, min(ends_at, exhausted_at, renew_at) - now))

    def _renew(self, call: Call, used: int) -> bool:
        """Renew the call; False when it cannot go on (failed or refused)."""
        call.sequence += 1
        sequence = call.sequence
        call.reported_used = max(call.reported_used, used)
        call.renewed_at = sent_at = time.monotonic()
        outcome = self._operate(
            "renew",
            lambda request_id: credit_control_pb2.Operation(
                request_id=request_id,
                renew=credit_control_pb2.RenewRequest(
                    call_id=call.call_id,
                    sequence=sequence,
                    used_seconds=used,
                    requested_seconds=self.options.grant_seconds,
                ),
            ),
        )
        if outcome is None or outcome.WhichOneof("result") != "renew":
            return False
        TALLY["renewals"] += 1
        TALLY["renewals answered final"] += outcome.renew.grant.final
        call.apply(outcome.renew.grant, sent_at, used)
        return True

    def _release(self, call: Call, used: int, why: str) -> None:
        outcome = self._operate(
            "release",
            lambda request_id: credit_control_pb2.Operation(
                request_id=request_id,
                release=credit_control_pb2.ReleaseRequest(call_id=call.call_id, used_seconds=used),
            ),
        )
        TALLY[f"hang-up: {why}"] += 1
        if outcome is None or outcome.WhichOneof("result") != "release":
            TALLY["calls not released (release failed)"] += 1
            return
        TALLY["calls released"] += 1
        TALLY["used seconds (call seconds)"] += used
        TALLY["billed seconds"] += outcome.release.billed_seconds
        TALLY["charged (minor units)"] += outcome.release.charged
        TALLY["shortfall (minor units)"] += outcome.release.shortfall


# -- top-ups, setup and the summary ----------------------------------------------------


class TopUps:
    """Tops a random account up every --topup-interval real seconds (one per process)."""

    def __init__(self, environment: Environment, options: Options) -> None:
        self._environment = environment
        self._options = options
        self._channel = grpc.insecure_channel(grpc_target(environment.host))
        self._admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._numbers = itertools.count(1)
        self._greenlet: Any = gevent.spawn(self._run)

    def _run(self) -> None:
        rng = random.Random()
        options = self._options
        while True:
            gevent.sleep(options.topup_interval)
            account_id = options.account_id(rng.randrange(options.accounts))
            request = admin_pb2.TopUpRequest(
                account_id=account_id,
                amount=options.topup_amount,
                idempotency_key=f"{options.account_prefix}-topup-{_RUN_TOKEN}-{next(self._numbers)}",
                reference="locust top-up",
            )
            started = time.perf_counter()
            try:
                response = self._admin.TopUp(request, timeout=options.op_timeout)
            except grpc.RpcError as exc:
                error = CallcreditError.from_rpc_error(exc)
                if error.error_reason in REFUSALS:
                    TALLY[f"topup refused:{error.reason}"] += 1
                    _fire(self._environment, "topup", f"refused:{error.reason}", started)
                else:
                    _fire(self._environment, "topup", "AdminService.TopUp", started, 0, error)
                continue
            TALLY["topups"] += 1
            TALLY["topped up (minor units)"] += options.topup_amount
            _fire(self._environment, "topup", "AdminService.TopUp", started, response.ByteSize())

    def stop(self) -> None:
        self._greenlet.kill(block=True, timeout=CLOSE_SECONDS)
        self._channel.close()


_topups: TopUps | None = None
_test_starts = itertools.count(1)


def setup_accounts(target: str, options: Options, key: str) -> None:
    """Put the tariff, create the accounts (ACCOUNT_EXISTS is fine), top each one up
    (``key`` is the top-ups' idempotency key: one per test start)."""
    with grpc.insecure_channel(target) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        timeout = options.op_timeout
        tariff = admin_pb2.Tariff(tariff_id=options.tariff_id, currency=CURRENCY, rates=RATES)
        admin.PutTariff(admin_pb2.PutTariffRequest(tariff=tariff), timeout=timeout)
        created = 0
        for n in range(options.accounts):
            account_id = options.account_id(n)
            try:
                admin.CreateAccount(
                    admin_pb2.CreateAccountRequest(
                        account_id=account_id,
                        currency=CURRENCY,
                        tariff_id=options.tariff_id,
                        max_concurrent_calls=options.max_concurrent_calls,
                    ),
                    timeout=timeout,
                )
                created += 1
            except grpc.RpcError as exc:
                if CallcreditError.from_rpc_error(exc).error_reason != ErrorReason.ACCOUNT_EXISTS:
                    raise
            if options.initial_balance > 0:
                admin.TopUp(
                    admin_pb2.TopUpRequest(
                        account_id=account_id,
                        amount=options.initial_balance,
                        idempotency_key=key,
                        reference="locust setup",
                    ),
                    timeout=timeout,
                )
    logger.info(
        "setup: tariff %s, %d accounts (%d new), each topped up with %d",
        options.tariff_id, options.accounts, created, options.initial_balance,
    )  # fmt: skip


@_listener(events.test_start)
def _on_test_start(environment: Environment, **_kwargs: Any) -> None:
    global _topups
    TALLY.clear()
    options = Options.of(environment)
    runner = environment.runner
    if options.setup and not isinstance(runner, WorkerRunner):
        try:
            key = f"{options.account_prefix}-setup-{_RUN_TOKEN}-{next(_test_starts)}"
            setup_accounts(grpc_target(environment.host), options, key)
        except Exception:
            logger.exception("setup failed; stopping the test")
            environment.process_exit_code = 1
            if runner is not None:
                gevent.spawn_later(0, runner.quit)
            raise
    if options.topup_interval > 0 and not isinstance(runner, MasterRunner) and _topups is None:
        _topups = TopUps(environment, options)


@_listener(events.test_stopping)
def _on_test_stopping(environment: Environment, **_kwargs: Any) -> None:
    global _topups
    if _topups is not None:
        _topups.stop()
        _topups = None


@_listener(events.report_to_master)
def _on_report_to_master(data: dict[str, Any], **_kwargs: Any) -> None:
    data["callcredit_tally"] = dict(TALLY)
    TALLY.clear()


@_listener(events.worker_report)
def _on_worker_report(data: dict[str, Any], **_kwargs: Any) -> None:
    TALLY.update(data.get("callcredit_tally", {}))


def summary_lines() -> list[str]:
    lines = ["callcredit campaign summary (this locust run):"]
    lines += [f"  {key:<52} {value:>14,}" for key, value in sorted(TALLY.items())]
    return lines


def _finish(environment: Environment) -> None:
    """Log the summary, write --summary-json, let the --csv writer catch up."""
    logger.info("\n".join(summary_lines()))
    parsed = environment.parsed_options
    path = getattr(parsed, "summary_json", "") if parsed is not None else ""
    if path:
        with open(path, "w", encoding="utf-8") as file:
            json.dump(dict(TALLY), file, indent=2, sort_keys=True)
    if getattr(parsed, "csv_prefix", None):
        # locust writes --csv files once a second and not again at shutdown, so what
        # the stopping users did (their releases) would be missing (locust issue #1806):
        # give the writer one more turn now that every user has stopped.
        gevent.sleep(locust.stats.CSV_STATS_INTERVAL_SEC + 0.25)


@_listener(events.test_stop)
def _on_test_stop(environment: Environment, **_kwargs: Any) -> None:
    if isinstance(environment.runner, LocalRunner):
        _finish(environment)


@_listener(events.quitting)
def _on_quitting(environment: Environment, **_kwargs: Any) -> None:
    # A master hears the workers' last reports only after its own test_stop (they
    # send them when they quit), so it sums up the whole session on the way out.
    if isinstance(environment.runner, MasterRunner):
        _finish(environment)
