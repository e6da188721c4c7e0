"""A real server process killed with SIGKILL after acknowledged work, then restarted."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2_grpc
from tests.service.conftest import UNIT_PER_SECOND
from tests.service.processes import server_process
from tests.service.streams import RawStream, release_op, renew_op, reserve_op


@asynccontextmanager
async def stubs(
    target: str,
) -> AsyncIterator[
    tuple[
        admin_pb2_grpc.AdminServiceAsyncStub, credit_control_pb2_grpc.CreditControlServiceAsyncStub
    ]
]:
    channel = grpc.aio.insecure_channel(target)
    try:
        yield (
            admin_pb2_grpc.AdminServiceStub(channel),
            credit_control_pb2_grpc.CreditControlServiceStub(channel),
        )
    finally:
        await channel.close()


async def _snapshot(
    admin: admin_pb2_grpc.AdminServiceAsyncStub, accounts: list[str]
) -> dict[str, object]:
    """Every account, every call and every ledger entry, as the server answers them."""
    seen: dict[str, object] = {}
    for account_id in accounts:
        seen[account_id] = (
            await admin.GetAccount(admin_pb2.GetAccountRequest(account_id=account_id))
        ).account
        entries = await admin.ListEntries(
            admin_pb2.ListEntriesRequest(account_id=account_id, limit=1000)
        )
        seen[f"{account_id}/entries"] = list(entries.entries)
        calls = await admin.ListCalls(admin_pb2.ListCallsRequest(account_id=account_id, limit=1000))
        seen[f"{account_id}/calls"] = list(calls.calls)
        for call in calls.calls:
            seen[call.call_id] = (
                await admin.GetCall(admin_pb2.GetCallRequest(call_id=call.call_id))
            ).call
    return seen


async def test_sigkill_after_acknowledged_burst_loses_nothing(database_url: str) -> None:
    accounts = [f"acc-{n}" for n in range(4)]
    with server_process(database_url) as (process, target):
        async with stubs(target) as (admin, dialer):
            await admin.PutTariff(
                admin_pb2.PutTariffRequest(
                    tariff=admin_pb2.Tariff(tariff_id="t", currency="VND", rates=[UNIT_PER_SECOND])
                )
            )
            for account_id in accounts:
                await admin.CreateAccount(
                    admin_pb2.CreateAccountRequest(
                        account_id=account_id, currency="VND", tariff_id="t"
                    )
                )
                await admin.TopUp(
                    admin_pb2.TopUpRequest(
                        account_id=account_id, amount=5_000, idempotency_key="first"
                    )
                )
            streams = [RawStream(dialer) for _ in range(4)]

            async def campaign(k: int) -> None:
                stream, account_id = streams[k], accounts[k]
                for n in range(40):
                    call_id = f"{account_id}-call-{n}"
                    await stream.ask(reserve_op(f"r{n}", call_id, account_id))
                    await stream.ask(renew_op(f"n{n}", call_id, 1, n))
                    if n % 4:  # three calls in four end; the rest stay open
                        await stream.ask(release_op(f"x{n}", call_id, n + 3))

            await asyncio.gather(*(campaign(k) for k in range(4)))
            await asyncio.gather(
                *(
                    admin.TopUp(
                        admin_pb2.TopUpRequest(account_id=a, amount=77, idempotency_key="second")
                    )
                    for a in accounts
                )
            )
            before = await _snapshot(admin, accounts)
        process.send_signal(signal.SIGKILL)
        process.wait()

    with server_process(database_url) as (_, target):
        async with stubs(target) as (admin, dialer):
            after = await _snapshot(admin, accounts)
            assert after == before
            # Open calls survived the crash and still work.
            stream = RawStream(dialer)
            (renewed,) = await stream.ask(renew_op("again", "acc-0-call-0", 2, 10))
            assert renewed.renew.grant.allowed_seconds == 70
            (released,) = await stream.ask(release_op("end", "acc-0-call-0", 12))
            assert released.release.charged == 12
            # A retried top-up is still recognised after the restart.
            retry = await admin.TopUp(
                admin_pb2.TopUpRequest(account_id="acc-1", amount=77, idempotency_key="second")
            )
            assert retry.account == before["acc-1"]
            await stream.close()
