"""Drivers for CreditControlService.Control (callcredit and the echo server), and the
callcredit account set-up and end-of-run read-back.

- `drive_control`: raw grpc.aio Control streams. Slot i always uses stream i % streams;
  each stream's sender writes what is ready, at most `max_batch` operations per
  ControlRequest (1: one operation per message), with at most `window` messages
  unanswered (the server reads at most 64 ahead per stream). No task per call: the
  reader turns each Outcome into the slot's next operation directly.
- `drive_dialer`: the client library, `callcredit.dialer.DialerClient` (one stream, its
  own coalescing, windowed sender), one task per slot, through the public API only:
  `DialerClient.reserve()`, `DialerCall.renew(used_seconds, requested_seconds)` and
  `DialerCall.release(used_seconds)`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack

import grpc

from callcredit.dialer import DialerCall, DialerClient
from callcredit.errors import CallcreditError, ErrorReason
from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc
from loadtest.baselines.workload import (
    CONNECT_FEE,
    DESTINATION,
    FIRST_INCREMENT_SECONDS,
    NEXT_INCREMENT_SECONDS,
    PRICE_PER_MINUTE_MICROS,
    RENEW,
    REQUESTED_SECONDS,
    RESERVE,
    AccountTotals,
    Slot,
    Workload,
)
from loadtest.lanes import Lane, run_lanes

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
SERVER_WINDOW_MESSAGES = 64  # callcredit reads at most 64 unanswered messages per stream
ADMIN_CONCURRENCY = 64
TARIFF_ID = "bench"
REFUSALS = frozenset({ErrorReason.INSUFFICIENT_FUNDS})
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


def channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)


def _operation(slot: Slot, request_id: str) -> credit_control_pb2.Operation:
    kind = slot.kind
    if kind == RESERVE:
        return credit_control_pb2.Operation(
            request_id=request_id,
            reserve=credit_control_pb2.ReserveRequest(
                call_id=slot.call_id,
                account_id=slot.account,
                destination=DESTINATION,
                requested_seconds=REQUESTED_SECONDS,
            ),
        )
    if kind == RENEW:
        return credit_control_pb2.Operation(
            request_id=request_id,
            renew=credit_control_pb2.RenewRequest(
                call_id=slot.call_id,
                sequence=slot.sequence,
                used_seconds=slot.used,
                requested_seconds=REQUESTED_SECONDS,
            ),
        )
    return credit_control_pb2.Operation(
        request_id=request_id,
        release=credit_control_pb2.ReleaseRequest(call_id=slot.call_id, used_seconds=slot.used),
    )


def _answer(workload: Workload, slot: Slot, outcome: credit_control_pb2.Outcome) -> bool:
    """Hand one Outcome to the workload; returns whether the slot has a next operation."""
    result = outcome.WhichOneof("result")
    if result == "reserve":
        grant = outcome.reserve.grant
        return workload.answer(slot, True, grant.allowed_seconds, grant.held, 0)
    if result == "renew":
        grant = outcome.renew.grant
        return workload.answer(slot, True, grant.allowed_seconds, grant.held, 0)
    if result == "release":
        return workload.answer(slot, True, 0, 0, outcome.release.charged)
    error = CallcreditError.from_status(outcome.error)
    if error.error_reason not in REFUSALS:
        workload.error(slot, str(error))
    return workload.answer(slot, False, 0, 0, 0)


async def drive_control(
    target: str, workload: Workload, *, streams: int, max_batch: int, window: int
) -> None:
    """Run the workload over raw Control streams until it drains."""
    request_ids = [str(index) for index in range(workload.calls)]
    slots = workload.slots
    async with channel(target) as chan:
        stub = credit_control_pb2_grpc.CreditControlServiceStub(chan)
        lanes = [
            Lane[Slot](stub.Control(wait_for_ready=True), window=window, max_batch=max_batch)
            for _ in range(streams)
        ]

        async def send(lane: Lane[Slot]) -> None:
            await lane.send(slot_operation(request_ids), workload.drained)

        async def receive(lane: Lane[Slot]) -> None:
            ready = lane.ready
            while True:
                response = await lane.call.read()
                if response is grpc.aio.EOF:
                    return
                assert isinstance(response, credit_control_pb2.ControlResponse)
                for outcome in response.outcomes:
                    slot = slots[int(outcome.request_id)]
                    lane.answered(slot.msg)
                    if _answer(workload, slot, outcome):
                        ready.append(slot)
                if ready:
                    lane.wake.set()

        for slot in workload.start():
            lanes[slot.index % streams].ready.append(slot)
        await run_lanes(lanes, workload.drained, send, receive)


def slot_operation(
    request_ids: Sequence[str],
) -> Callable[[Slot, int], credit_control_pb2.Operation]:
    """What a lane sends for a slot: its next operation, the message noted on the slot."""

    def operation(slot: Slot, message: int) -> credit_control_pb2.Operation:
        slot.msg = message
        return _operation(slot, request_ids[slot.index])

    return operation


async def drive_dialer(target: str, workload: Workload, *, dialers: int = 1) -> None:
    """Run the workload through DialerClient: `dialers` clients (one stream each, the
    library's batching), slot i on client i % dialers."""

    async def run(dialer: DialerClient, slot: Slot) -> None:
        call: DialerCall | None = None
        more = True
        while more:
            kind = slot.kind
            try:
                if kind == RESERVE:
                    call = await dialer.reserve(
                        slot.call_id, slot.account, DESTINATION, REQUESTED_SECONDS
                    )
                    call.answered()
                    grant = call.grant
                    more = workload.answer(slot, True, grant.allowed_seconds, grant.held, 0)
                elif kind == RENEW:
                    assert call is not None
                    g = await call.renew(slot.used, REQUESTED_SECONDS)
                    more = workload.answer(slot, True, g.allowed_seconds, g.held, 0)
                else:
                    assert call is not None
                    result = await call.release(slot.used)
                    more = workload.answer(slot, True, 0, 0, result.charged)
            except CallcreditError as error:
                if error.error_reason not in REFUSALS:
                    workload.error(slot, str(error))
                more = workload.answer(slot, False, 0, 0, 0)

    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(DialerClient(target)) for _ in range(dialers)]
        await asyncio.gather(
            *(run(clients[slot.index % dialers], slot) for slot in workload.start())
        )


async def _bounded(jobs: Iterable[Callable[[], Awaitable[None]]], concurrency: int) -> None:
    iterator = iter(jobs)

    async def worker() -> None:
        for job in iterator:
            await job()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def setup_callcredit(target: str, accounts: list[str], balance: int) -> None:
    """The benchmark tariff, and every account topped up by `balance`."""
    async with channel(target) as chan:
        admin = admin_pb2_grpc.AdminServiceStub(chan)
        rate = admin_pb2.Rate(
            prefix="",
            price_per_minute_micros=PRICE_PER_MINUTE_MICROS,
            first_increment_seconds=FIRST_INCREMENT_SECONDS,
            next_increment_seconds=NEXT_INCREMENT_SECONDS,
            connect_fee=CONNECT_FEE,
        )
        await admin.PutTariff(
            admin_pb2.PutTariffRequest(
                tariff=admin_pb2.Tariff(tariff_id=TARIFF_ID, currency="VND", rates=[rate])
            ),
            wait_for_ready=True,
        )

        def job(account: str) -> Callable[[], Awaitable[None]]:
            async def create() -> None:
                await admin.CreateAccount(
                    admin_pb2.CreateAccountRequest(
                        account_id=account, currency="VND", tariff_id=TARIFF_ID
                    )
                )
                await admin.TopUp(
                    admin_pb2.TopUpRequest(
                        account_id=account, amount=balance, idempotency_key="bench"
                    )
                )

            return create

        await _bounded((job(account) for account in accounts), ADMIN_CONCURRENCY)


async def callcredit_totals(target: str, accounts: list[str], balance: int) -> AccountTotals:
    """Read every account back (GetAccount answers only what is durable)."""
    views: list[admin_pb2.Account] = []
    async with channel(target) as chan:
        admin = admin_pb2_grpc.AdminServiceStub(chan)

        def job(account: str) -> Callable[[], Awaitable[None]]:
            async def read() -> None:
                response = await admin.GetAccount(admin_pb2.GetAccountRequest(account_id=account))
                views.append(response.account)

            return read

        await _bounded((job(account) for account in accounts), ADMIN_CONCURRENCY)
    return AccountTotals(
        accounts=len(views),
        initial_total=balance * len(accounts),
        balance_total=sum(v.balance for v in views),
        min_balance=min(v.balance for v in views),
        negative_balances=sum(1 for v in views if v.balance < 0),
        reserved_total=sum(v.reserved for v in views),
        nonzero_reserved=sum(1 for v in views if v.reserved),
        open_holds=sum(v.active_calls for v in views),
        open_holds_total=sum(v.reserved for v in views),
    )
