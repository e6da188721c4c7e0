"""The dialer library against a fake CreditControlService on a real gRPC port.

The fake answers from a tiny model of the server (grants, final grants, refusals) and
misbehaves on demand: it drops a stream, answers UNAVAILABLE, holds its answers, or is
stopped and started again on the same port. Call time runs on a FakeClock that only the
test moves, so renewal timing is exact; only reconnect backoff uses real (short) time.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from callcredit.dialer import (
    ALLOWED_SECONDS_REACHED,
    FINAL_GRANT_REACHED,
    DialerCall,
    DialerClient,
    Grant,
    ReleaseResult,
)
from callcredit.errors import CallcreditError, StreamClosedError
from callcredit.v1 import credit_control_pb2

ACCOUNT = "acct-1"
DESTINATION = "+84901234567"
PRICE_PER_SECOND = 7
BALANCE = 100_000
SETTLE_SECONDS = 0.05
"""Real time given to the event loop before asserting that something did NOT happen."""


class FakeClock:
    """Monotonic seconds that move only when the test says so, and never backwards."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + seconds, wake))
        await wake

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds
        waiting: list[tuple[float, asyncio.Future[None]]] = []
        for wake_at, wake in self._sleepers:
            if wake.done():
                continue
            if wake_at <= self.now:
                wake.set_result(None)
            else:
                waiting.append((wake_at, wake))
        self._sleepers = waiting


def refusal(code: grpc.StatusCode, reason: str) -> status_pb2.Status:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="callcredit.v1"))
    return status_pb2.Status(code=code.value[0], message=f"fake: {reason}", details=[detail])


@dataclass
class FakeCall:
    allowed_seconds: int
    ended: bool = False


class FakeServer:
    """A Control-only CreditControlService whose state outlives a stop and start."""

    def __init__(self) -> None:
        self.grant_seconds = 10
        self.validity_seconds = 60
        self.limit_seconds: dict[str, int] = {}
        """Per call: the most allowed_seconds funds allow (grants beyond it are final)."""
        self.refusals: dict[str, str] = {}
        """Per call: the reason its Reserve is refused."""
        self.calls: dict[str, FakeCall] = {}
        self.messages: list[tuple[int, credit_control_pb2.ControlRequest]] = []
        """Every ControlRequest received, with the number of the stream it came on."""
        self.streams = 0
        self.drop_messages = 0
        """Abort the stream on this many next messages instead of answering them."""
        self.unavailable_operations = 0
        """Answer this many next operations with an UNAVAILABLE error outcome."""
        self.reverse_outcomes = False
        self.holding = False
        self.held: list[credit_control_pb2.Operation] = []
        self.port = 0
        self._outboxes: list[asyncio.Queue[credit_control_pb2.ControlResponse | None]] = []
        self._server: grpc.aio.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        handler = grpc.method_handlers_generic_handler(
            "callcredit.v1.CreditControlService",
            {
                "Control": grpc.stream_stream_rpc_method_handler(
                    self._control,
                    request_deserializer=credit_control_pb2.ControlRequest.FromString,
                    response_serializer=credit_control_pb2.ControlResponse.SerializeToString,
                )
            },
        )
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        await self._server.start()

    async def stop(self) -> None:
        assert self._server is not None
        await self._server.stop(None)

    def operations(self, kind: str) -> list[credit_control_pb2.Operation]:
        return [
            operation
            for _, message in self.messages
            for operation in message.operations
            if operation.WhichOneof("op") == kind
        ]

    def push(self, response: credit_control_pb2.ControlResponse) -> None:
        """Send on the newest stream, as the server pushes to the one that last carried a call."""
        self._outboxes[-1].put_nowait(response)

    def flush(self) -> None:
        """Answer every held operation."""
        outcomes = [self._outcome(operation) for operation in self.held]
        self.held.clear()
        self.push(credit_control_pb2.ControlResponse(outcomes=outcomes))

    async def _control(
        self,
        requests: AsyncIterator[credit_control_pb2.ControlRequest],
        context: grpc.aio.ServicerContext[
            credit_control_pb2.ControlRequest, credit_control_pb2.ControlResponse
        ],
    ) -> AsyncIterator[credit_control_pb2.ControlResponse]:
        self.streams += 1
        outbox: asyncio.Queue[credit_control_pb2.ControlResponse | None] = asyncio.Queue()
        self._outboxes.append(outbox)
        reader = asyncio.create_task(self._read(self.streams, requests, outbox))
        try:
            while (response := await outbox.get()) is not None:
                yield response
        finally:
            reader.cancel()
        await context.abort(grpc.StatusCode.UNAVAILABLE, "fake server dropped the stream")

    async def _read(
        self,
        stream: int,
        requests: AsyncIterator[credit_control_pb2.ControlRequest],
        outbox: asyncio.Queue[credit_control_pb2.ControlResponse | None],
    ) -> None:
        async for request in requests:
            self.messages.append((stream, request))
            if self.drop_messages > 0:
                self.drop_messages -= 1
                break
            outcomes: list[credit_control_pb2.Outcome] = []
            for operation in request.operations:
                if self.unavailable_operations > 0:
                    self.unavailable_operations -= 1
                    error = refusal(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")
                    outcomes.append(
                        credit_control_pb2.Outcome(request_id=operation.request_id, error=error)
                    )
                elif self.holding:
                    self.held.append(operation)
                else:
                    outcomes.append(self._outcome(operation))
            if self.reverse_outcomes:
                outcomes.reverse()
            if outcomes:
                outbox.put_nowait(credit_control_pb2.ControlResponse(outcomes=outcomes))
        outbox.put_nowait(None)

    def _outcome(self, operation: credit_control_pb2.Operation) -> credit_control_pb2.Outcome:
        request_id = operation.request_id
        kind = operation.WhichOneof("op")
        if kind == "reserve":
            reserve = operation.reserve
            reason = self.refusals.get(reserve.call_id)
            if reason is not None:
                error = refusal(grpc.StatusCode.FAILED_PRECONDITION, reason)
                return credit_control_pb2.Outcome(request_id=request_id, error=error)
            grant = self._grant(reserve.call_id, 0, reserve.requested_seconds)
            return credit_control_pb2.Outcome(
                request_id=request_id, reserve=credit_control_pb2.ReserveResponse(grant=grant)
            )
        if kind == "renew":
            renew = operation.renew
            ended = self._ended_error(renew.call_id)
            if ended is not None:
                return credit_control_pb2.Outcome(request_id=request_id, error=ended)
            grant = self._grant(renew.call_id, renew.used_seconds, renew.requested_seconds)
            return credit_control_pb2.Outcome(
                request_id=request_id, renew=credit_control_pb2.RenewResponse(grant=grant)
            )
        assert kind == "release"
        release = operation.release
        if release.call_id not in self.calls:
            error = refusal(grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND")
            return credit_control_pb2.Outcome(request_id=request_id, error=error)
        self.calls[release.call_id].ended = True
        charged = release.used_seconds * PRICE_PER_SECOND
        return credit_control_pb2.Outcome(
            request_id=request_id,
            release=credit_control_pb2.ReleaseResponse(
                call_id=release.call_id,
                billed_seconds=release.used_seconds,
                charged=charged,
                shortfall=0,
                balance=BALANCE - charged,
            ),
        )

    def _ended_error(self, call_id: str) -> status_pb2.Status | None:
        call = self.calls.get(call_id)
        if call is None:
            return refusal(grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND")
        if call.ended:
            return refusal(grpc.StatusCode.FAILED_PRECONDITION, "CALL_ALREADY_ENDED")
        return None

    def _grant(
        self, call_id: str, used_seconds: int, requested_seconds: int
    ) -> credit_control_pb2.Grant:
        wanted = requested_seconds or self.grant_seconds
        call = self.calls.setdefault(call_id, FakeCall(allowed_seconds=0))
        allowed = max(call.allowed_seconds, used_seconds + wanted)
        limit = self.limit_seconds.get(call_id)
        if limit is not None:
            allowed = max(call.allowed_seconds, min(allowed, limit))
        call.allowed_seconds = allowed
        return credit_control_pb2.Grant(
            call_id=call_id,
            allowed_seconds=allowed,
            final=allowed < used_seconds + wanted,
            validity_seconds=self.validity_seconds,
            held=allowed * PRICE_PER_SECOND,
        )


@pytest.fixture
async def fake() -> AsyncIterator[FakeServer]:
    server = FakeServer()
    await server.start()
    yield server
    await server.stop()


async def eventually(predicate: Callable[[], bool], timeout_seconds: float = 5.0) -> None:
    """Wait until predicate() holds. Polled: it reads state of both the client and the
    fake, which share no event to wait on."""
    async with asyncio.timeout(timeout_seconds):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.002)


async def test_concurrent_reserves_travel_in_one_message_and_match_by_request_id(
    fake: FakeServer,
) -> None:
    fake.reverse_outcomes = True  # answers come back in another order than asked
    async with DialerClient(fake.target) as dialer:
        await dialer.reserve("c-0", ACCOUNT, DESTINATION)  # the stream is up
        calls = await asyncio.gather(
            *(dialer.reserve(f"c-{n}", ACCOUNT, DESTINATION, n * 10) for n in range(1, 6))
        )

    assert [len(message.operations) for _, message in fake.messages] == [1, 5]
    assert [(call.call_id, call.grant.allowed_seconds) for call in calls] == [
        ("c-1", 10),
        ("c-2", 20),
        ("c-3", 30),
        ("c-4", 40),
        ("c-5", 50),
    ]
    request_ids = [op.request_id for _, message in fake.messages for op in message.operations]
    assert len(set(request_ids)) == 6


async def test_refused_reserve_raises_with_reason_and_the_stream_goes_on(
    fake: FakeServer,
) -> None:
    fake.refusals["c-poor"] = "INSUFFICIENT_FUNDS"
    async with DialerClient(fake.target) as dialer:
        with pytest.raises(CallcreditError) as refused:
            await dialer.reserve("c-poor", ACCOUNT, DESTINATION)
        call = await dialer.reserve("c-rich", ACCOUNT, DESTINATION)

    assert refused.value.reason == "INSUFFICIENT_FUNDS"
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert call.grant == Grant(
        allowed_seconds=10, final=False, validity_seconds=60, held=10 * PRICE_PER_SECOND
    )
    assert fake.streams == 1


async def test_renewals_report_cumulative_used_seconds_with_increasing_sequence(
    fake: FakeServer,
) -> None:
    clock = FakeClock()
    async with DialerClient(fake.target, clock=clock) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION)  # 10 s, valid 60 s
        call.answered()
        clock.advance(4)
        await asyncio.sleep(SETTLE_SECONDS)
        assert fake.operations("renew") == []
        clock.advance(1)  # 5 s used: 10 allowed - 5 s margin
        await eventually(lambda: call.grant.allowed_seconds == 15)
        clock.advance(5)  # 10 s used: 15 allowed - 5 s margin
        await eventually(lambda: call.grant.allowed_seconds == 20)
        clock.advance(2)
        result = await call.release()
        clock.advance(100)
        await asyncio.sleep(SETTLE_SECONDS)

    renews = [op.renew for op in fake.operations("renew")]
    assert [(r.call_id, r.sequence, r.used_seconds) for r in renews] == [
        ("c-1", 1, 5),
        ("c-1", 2, 10),
    ]
    assert result == ReleaseResult(
        call_id="c-1",
        used_seconds=12,
        billed_seconds=12,
        charged=12 * PRICE_PER_SECOND,
        shortfall=0,
        balance=BALANCE - 12 * PRICE_PER_SECOND,
    )
    assert await call.must_hang_up() == "CALL_RELEASED"


async def test_ringing_call_renews_with_zero_used_to_stay_valid(fake: FakeServer) -> None:
    fake.validity_seconds = 4
    clock = FakeClock()
    async with DialerClient(fake.target, clock=clock) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION)
        clock.advance(1.5)
        await asyncio.sleep(SETTLE_SECONDS)
        assert fake.operations("renew") == []
        clock.advance(0.5)  # validity 4 s - margin min(5 s, half of 4 s)
        await eventually(lambda: len(fake.operations("renew")) == 1)
        await call.release()

    renew = fake.operations("renew")[0].renew
    assert (renew.sequence, renew.used_seconds) == (1, 0)
    assert fake.operations("release")[0].release.used_seconds == 0


async def test_final_grant_orders_hang_up_when_talk_time_reaches_it(fake: FakeServer) -> None:
    fake.limit_seconds["c-1"] = 3
    clock = FakeClock()
    hangups: list[tuple[str, str]] = []

    def on_hangup(call: DialerCall, reason: str) -> None:
        hangups.append((call.call_id, reason))

    async with DialerClient(fake.target, clock=clock) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION, on_hangup=on_hangup)
        assert call.grant.final
        call.answered()
        clock.advance(2.5)
        await asyncio.sleep(SETTLE_SECONDS)
        assert call.hangup_reason is None
        clock.advance(0.5)
        reason = await asyncio.wait_for(call.must_hang_up(), 5)
        await eventually(lambda: len(hangups) == 1)
        result = await call.release()

    assert reason == FINAL_GRANT_REACHED
    assert hangups == [("c-1", FINAL_GRANT_REACHED)]
    assert result.used_seconds == 3


async def test_unanswered_renewal_orders_hang_up_at_allowed_seconds(fake: FakeServer) -> None:
    clock = FakeClock()
    async with DialerClient(fake.target, clock=clock) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION)  # 10 s, not final
        call.answered()
        fake.holding = True  # the server stops answering
        clock.advance(5)
        await eventually(lambda: len(fake.held) == 1)
        clock.advance(4.5)
        await asyncio.sleep(SETTLE_SECONDS)
        assert call.hangup_reason is None
        clock.advance(0.5)
        reason = await asyncio.wait_for(call.must_hang_up(), 5)
        fake.holding = False
        fake.flush()
        result = await call.release()

    assert reason == ALLOWED_SECONDS_REACHED
    assert result.used_seconds == 10


async def test_pushed_grant_update_unfinals_a_call_and_cancels_its_hang_up(
    fake: FakeServer,
) -> None:
    fake.limit_seconds["c-1"] = 3
    clock = FakeClock()
    async with DialerClient(fake.target, clock=clock) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION)
        call.answered()
        clock.advance(2)
        fake.push(
            credit_control_pb2.ControlResponse(
                grant_updates=[
                    credit_control_pb2.Grant(
                        call_id="c-1", allowed_seconds=30, final=False, validity_seconds=60
                    )
                ]
            )
        )
        await eventually(lambda: not call.grant.final)
        clock.advance(2)  # past the old final 3 s
        await asyncio.sleep(SETTLE_SECONDS)
        assert call.hangup_reason is None
        assert call.grant.allowed_seconds == 30
        await call.release()


async def test_pushed_termination_orders_hang_up(fake: FakeServer) -> None:
    hangups: list[str] = []
    async with DialerClient(fake.target) as dialer:
        call = await dialer.reserve(
            "c-1", ACCOUNT, DESTINATION, on_hangup=lambda _, reason: hangups.append(reason)
        )
        fake.push(
            credit_control_pb2.ControlResponse(
                terminations=[
                    credit_control_pb2.CallTermination(call_id="c-1", reason="ACCOUNT_SUSPENDED")
                ]
            )
        )
        reason = await asyncio.wait_for(call.must_hang_up(), 5)
        await eventually(lambda: len(hangups) == 1)
        await call.release()

    assert reason == "ACCOUNT_SUSPENDED"
    assert hangups == ["ACCOUNT_SUSPENDED"]


async def test_dropped_stream_resends_unanswered_operations(fake: FakeServer) -> None:
    fake.drop_messages = 1
    async with DialerClient(fake.target) as dialer:
        call = await asyncio.wait_for(dialer.reserve("c-1", ACCOUNT, DESTINATION), 5)

    assert call.grant.allowed_seconds == 10
    (first_stream, first), (second_stream, second) = fake.messages
    assert (first_stream, second_stream) == (1, 2)
    assert first.operations[0].request_id == second.operations[0].request_id
    assert second.operations[0].reserve.call_id == "c-1"


async def test_unavailable_outcome_is_retried_on_a_new_stream(fake: FakeServer) -> None:
    fake.unavailable_operations = 1  # a draining server
    async with DialerClient(fake.target) as dialer:
        call = await asyncio.wait_for(dialer.reserve("c-1", ACCOUNT, DESTINATION), 5)

    assert call.grant.allowed_seconds == 10
    assert [stream for stream, _ in fake.messages] == [1, 2]


async def test_server_restart_reattaches_open_calls_to_the_new_stream(fake: FakeServer) -> None:
    clock = FakeClock()
    async with DialerClient(fake.target, clock=clock) as dialer:
        alive = await dialer.reserve("c-alive", ACCOUNT, DESTINATION)
        expired = await dialer.reserve("c-expired", ACCOUNT, DESTINATION)
        alive.answered()
        clock.advance(3)
        await fake.stop()
        fake.calls["c-expired"].ended = True  # it expired while the server was away
        await fake.start(fake.port)

        await eventually(lambda: len(fake.operations("renew")) == 2)
        assert await asyncio.wait_for(expired.must_hang_up(), 5) == "CALL_ALREADY_ENDED"
        fake.push(
            credit_control_pb2.ControlResponse(
                terminations=[
                    credit_control_pb2.CallTermination(
                        call_id="c-alive", reason="ACCOUNT_SUSPENDED"
                    )
                ]
            )
        )
        assert await asyncio.wait_for(alive.must_hang_up(), 5) == "ACCOUNT_SUSPENDED"
        result = await alive.release()

    renews = {
        op.renew.call_id: (stream, op.renew.sequence, op.renew.used_seconds)
        for stream, message in fake.messages
        for op in message.operations
        if op.WhichOneof("op") == "renew"
    }
    assert renews == {"c-alive": (2, 1, 3), "c-expired": (2, 1, 0)}
    assert result.used_seconds == 3


async def test_pending_operations_are_bounded(fake: FakeServer) -> None:
    fake.holding = True
    async with DialerClient(fake.target, max_pending_operations=2) as dialer:
        tasks = [
            asyncio.create_task(dialer.reserve(f"c-{n}", ACCOUNT, DESTINATION)) for n in range(3)
        ]
        await eventually(lambda: len(fake.held) == 2)
        await asyncio.sleep(SETTLE_SECONDS)
        assert len(fake.operations("reserve")) == 2  # the third waits for a slot
        fake.holding = False
        fake.flush()
        calls = await asyncio.wait_for(asyncio.gather(*tasks), 5)

    assert [call.call_id for call in calls] == ["c-0", "c-1", "c-2"]


async def test_cancelled_reserve_is_released_in_the_background(fake: FakeServer) -> None:
    fake.holding = True
    async with DialerClient(fake.target) as dialer:
        reserving = asyncio.create_task(dialer.reserve("c-1", ACCOUNT, DESTINATION))
        await eventually(lambda: len(fake.held) == 1)
        fake.holding = False
        reserving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reserving
        await eventually(lambda: len(fake.operations("release")) == 1)

    release = fake.operations("release")[0].release
    assert (release.call_id, release.used_seconds) == ("c-1", 0)


async def test_closing_fails_what_still_waits(fake: FakeServer) -> None:
    fake.holding = True
    async with DialerClient(fake.target) as dialer:
        reserving = asyncio.create_task(dialer.reserve("c-1", ACCOUNT, DESTINATION))
        await eventually(lambda: len(fake.held) == 1)

    with pytest.raises(StreamClosedError):
        await reserving


async def test_silent_stream_is_probed_dropped_and_its_calls_reattached(fake: FakeServer) -> None:
    # The fake answers no empty ControlRequest, so the heartbeat's probe goes unanswered.
    async with DialerClient(
        fake.target, heartbeat_interval_seconds=0.2, heartbeat_timeout_seconds=0.3
    ) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION)
        loop = asyncio.get_running_loop()
        quiet_since = loop.time()
        await eventually(lambda: fake.streams == 2, timeout_seconds=5)
        detected_after = loop.time() - quiet_since
        await eventually(lambda: len(fake.operations("renew")) == 1)
        result = await call.release(0)

    assert 0.5 <= detected_after < 2.0  # interval + timeout, plus scheduling
    probes = [stream for stream, message in fake.messages if not message.operations]
    assert probes[:1] == [1]
    renew_stream = [s for s, m in fake.messages for op in m.operations if op.HasField("renew")]
    assert renew_stream == [2]  # re-attached on the new stream
    assert result.call_id == "c-1"


async def test_idle_dialer_sends_no_heartbeat(fake: FakeServer) -> None:
    async with DialerClient(
        fake.target, heartbeat_interval_seconds=0.05, heartbeat_timeout_seconds=0.05
    ) as dialer:
        await eventually(lambda: fake.streams == 1)
        await asyncio.sleep(0.4)
        assert dialer._calls == {}

    assert fake.messages == []
    assert fake.streams == 1


async def test_renew_now_returns_the_grant_and_the_call_takes_it(fake: FakeServer) -> None:
    clock = FakeClock()
    async with DialerClient(fake.target, clock=clock) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION)  # 10 s, valid 60 s
        call.answered()
        clock.advance(3)
        first = await call.renew()  # used 3 s, as reserved (0: the server's default)
        assert (
            first
            == call.grant
            == Grant(
                allowed_seconds=13, final=False, validity_seconds=60, held=13 * PRICE_PER_SECOND
            )
        )
        second = await call.renew(used_seconds=4, requested_seconds=30)
        assert second == call.grant
        assert second.allowed_seconds == 34
        with pytest.raises(ValueError, match="below"):
            await call.renew(used_seconds=2)
        clock.advance(26)  # 29 s used: 34 allowed - 5 s margin, the automatic renewal
        await eventually(lambda: len(fake.operations("renew")) == 3)
        await call.release()
        with pytest.raises(RuntimeError, match="released"):
            await call.renew()

    renews = [op.renew for op in fake.operations("renew")]
    assert [(r.sequence, r.used_seconds, r.requested_seconds) for r in renews] == [
        (1, 3, 0),
        (2, 4, 30),
        (3, 29, 0),
    ]


async def test_renew_of_a_call_the_server_ended_raises_and_orders_the_hang_up(
    fake: FakeServer,
) -> None:
    async with DialerClient(fake.target) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION)
        fake.calls["c-1"].ended = True  # it expired on the server
        with pytest.raises(CallcreditError) as refused:
            await call.renew(0)
        assert refused.value.reason == "CALL_ALREADY_ENDED"
        assert await asyncio.wait_for(call.must_hang_up(), 5) == "CALL_ALREADY_ENDED"


async def test_cancelled_renew_still_updates_the_call(fake: FakeServer) -> None:
    async with DialerClient(fake.target) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION)
        fake.holding = True
        renewing = asyncio.create_task(call.renew(7))
        await eventually(lambda: len(fake.held) == 1)
        renewing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await renewing
        fake.holding = False
        fake.flush()
        await eventually(lambda: call.grant.allowed_seconds == 17)
        await call.release(7)


async def test_cancelled_release_still_goes_out_and_is_answered(fake: FakeServer) -> None:
    async with DialerClient(fake.target) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION)
        fake.holding = True
        releasing = asyncio.create_task(call.release(4))
        await eventually(lambda: len(fake.held) == 1)
        releasing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await releasing
        fake.holding = False
        fake.flush()
        await eventually(lambda: not dialer._pending)

    assert fake.calls["c-1"].ended
    assert [op.release.used_seconds for op in fake.operations("release")] == [4]


@pytest.mark.parametrize("max_ops, window", [(3, 2), (2, 4)])
async def test_messages_never_exceed_the_size_and_a_window_of_them_is_in_flight(
    fake: FakeServer, max_ops: int, window: int
) -> None:
    fake.holding = True  # nothing is answered: the window fills and stays full
    async with DialerClient(
        fake.target, max_ops_per_message=max_ops, max_messages_in_flight=window
    ) as dialer:
        tasks = [
            asyncio.create_task(dialer.reserve(f"c-{n}", ACCOUNT, DESTINATION)) for n in range(20)
        ]
        await eventually(lambda: len(fake.messages) == window)
        await asyncio.sleep(SETTLE_SECONDS)
        # Several messages in flight at once, none answered, each full; no more than the window.
        assert [len(message.operations) for _, message in fake.messages] == [max_ops] * window
        fake.holding = False
        fake.flush()  # answers open the window: the rest goes out, still in bounded messages
        calls = await asyncio.wait_for(asyncio.gather(*tasks), 5)

    sizes = [len(message.operations) for _, message in fake.messages]
    assert sum(sizes) == 20
    assert max(sizes) == max_ops
    assert [call.call_id for call in calls] == [f"c-{n}" for n in range(20)]
    assert {stream for stream, _ in fake.messages} == {1}


async def test_operations_due_together_are_coalesced_up_to_the_size(fake: FakeServer) -> None:
    async with DialerClient(fake.target, max_ops_per_message=4) as dialer:
        await dialer.reserve("c-first", ACCOUNT, DESTINATION)  # the stream is up
        calls = await asyncio.gather(
            *(dialer.reserve(f"c-{n}", ACCOUNT, DESTINATION) for n in range(10))
        )
        await asyncio.gather(*(call.release(0) for call in calls))

    sizes = [len(message.operations) for _, message in fake.messages]
    assert sizes == [1, 4, 4, 2, 4, 4, 2]


def test_message_size_and_window_are_checked() -> None:
    for bad in (0, 10_001):
        with pytest.raises(ValueError, match="max_ops_per_message"):
            DialerClient("127.0.0.1:1", max_ops_per_message=bad)
    with pytest.raises(ValueError, match="max_messages_in_flight"):
        DialerClient("127.0.0.1:1", max_messages_in_flight=0)


async def test_probe_goes_out_while_the_window_is_full(fake: FakeServer) -> None:
    fake.holding = True  # the one message in flight is never answered
    async with DialerClient(
        fake.target,
        max_messages_in_flight=1,
        heartbeat_interval_seconds=0.2,
        heartbeat_timeout_seconds=0.3,
    ) as dialer:
        reserving = asyncio.create_task(dialer.reserve("c-1", ACCOUNT, DESTINATION))
        await eventually(lambda: fake.streams == 2)
        fake.holding = False
        call = await asyncio.wait_for(reserving, 5)  # sent again on the new stream
        await call.release(0)

    first_stream = [message for stream, message in fake.messages if stream == 1]
    assert [len(message.operations) for message in first_stream][:2] == [1, 0]


async def test_calls_share_one_timer_task(fake: FakeServer) -> None:
    clock = FakeClock()
    async with DialerClient(fake.target, clock=clock) as dialer:
        await dialer.reserve("c-first", ACCOUNT, DESTINATION)
        tasks_before = len(asyncio.all_tasks())
        calls = await asyncio.gather(
            *(dialer.reserve(f"c-{n}", ACCOUNT, DESTINATION) for n in range(50))
        )
        for call in calls:
            call.answered()
        # No task per call: at most the timer task's one sleeper comes and goes.
        assert len(asyncio.all_tasks()) <= tasks_before + 1
        clock.advance(5)  # every call is due: one renewal each, from the one timer task
        await eventually(lambda: len(fake.operations("renew")) == 50)
        await eventually(lambda: all(call.grant.allowed_seconds == 15 for call in calls))
        await asyncio.gather(*(call.release() for call in calls))

    assert {op.renew.used_seconds for op in fake.operations("renew")} == {5}


async def test_talk_time_reported_ahead_of_the_clock_is_never_reported_lower(
    fake: FakeServer,
) -> None:
    clock = FakeClock()
    async with DialerClient(fake.target, clock=clock) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION)  # valid 60 s
        call.answered()
        assert (await call.renew(used_seconds=100)).allowed_seconds == 110
        clock.advance(55)  # validity 60 s - 5 s margin: an automatic renewal, talk clock 55 s
        await eventually(lambda: len(fake.operations("renew")) == 2)
        await asyncio.sleep(SETTLE_SECONDS)
        assert call.hangup_reason is None
        result = await call.release()

    assert [op.renew.used_seconds for op in fake.operations("renew")] == [100, 100]
    assert result.used_seconds == 100


async def test_on_grant_hears_renewals_and_pushes_and_answered_ago_counts_talk_before(
    fake: FakeServer,
) -> None:
    clock = FakeClock()
    grants: list[tuple[str, int]] = []

    def on_grant(call: DialerCall, grant: Grant) -> None:
        grants.append((call.call_id, grant.allowed_seconds))

    async with DialerClient(fake.target, clock=clock) as dialer:
        call = await dialer.reserve("c-1", ACCOUNT, DESTINATION, on_grant=on_grant)  # 10 s
        call.answered(ago_seconds=4)  # found talking for 4 s already
        assert call.used_seconds == 4
        clock.advance(1)  # 5 s used: 10 allowed - 5 s margin
        await eventually(lambda: grants == [("c-1", 15)])
        fake.push(
            credit_control_pb2.ControlResponse(
                grant_updates=[
                    credit_control_pb2.Grant(
                        call_id="c-1", allowed_seconds=40, final=False, validity_seconds=60
                    )
                ]
            )
        )
        await eventually(lambda: grants == [("c-1", 15), ("c-1", 40)])
        await call.release()

    assert fake.operations("renew")[0].renew.used_seconds == 5
