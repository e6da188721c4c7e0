"""A real server on an ephemeral port, in this test's event loop, with a clock we move."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2_grpc
from callcredit_server.app import RunningServer, Settings, start

START_MS = 1_790_000_000_000
# 1 minor unit per second, billed per second: a grant of N seconds holds N.
UNIT_PER_SECOND = admin_pb2.Rate(
    prefix="",
    price_per_minute_micros=60_000_000,
    first_increment_seconds=1,
    next_increment_seconds=1,
    connect_fee=0,
)


class FakeClock:
    """Milliseconds that only move when a test says so, and never backwards."""

    def __init__(self, now_ms: int = START_MS) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self.now_ms += int(seconds * 1000)


@dataclass
class Harness:
    running: RunningServer
    channel: grpc.aio.Channel
    admin: admin_pb2_grpc.AdminServiceAsyncStub
    dialer: credit_control_pb2_grpc.CreditControlServiceAsyncStub
    clock: FakeClock
    settings: Settings

    async def account(self, account_id: str) -> admin_pb2.Account:
        response = await self.admin.GetAccount(admin_pb2.GetAccountRequest(account_id=account_id))
        return response.account

    async def funded_account(
        self, account_id: str, amount: int, *, rate: admin_pb2.Rate = UNIT_PER_SECOND, **fields: int
    ) -> admin_pb2.Account:
        """A tariff `t-<account>` with one default rate, and an account topped up by amount."""
        tariff_id = f"t-{account_id}"
        await self.admin.PutTariff(
            admin_pb2.PutTariffRequest(
                tariff=admin_pb2.Tariff(tariff_id=tariff_id, currency="VND", rates=[rate])
            )
        )
        await self.admin.CreateAccount(
            admin_pb2.CreateAccountRequest(
                account_id=account_id, currency="VND", tariff_id=tariff_id, **fields
            )
        )
        if amount:
            response = await self.admin.TopUp(
                admin_pb2.TopUpRequest(
                    account_id=account_id, amount=amount, idempotency_key=f"seed-{account_id}"
                )
            )
            return response.account
        return await self.account(account_id)


async def open_harness(settings: Settings, clock: FakeClock) -> Harness:
    running = await start(settings, clock_ms=clock)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
    return Harness(
        running=running,
        channel=channel,
        admin=admin_pb2_grpc.AdminServiceStub(channel),
        dialer=credit_control_pb2_grpc.CreditControlServiceStub(channel),
        clock=clock,
        settings=settings,
    )


@pytest.fixture
async def harness(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        snapshot_dir=str(tmp_path / "snapshots"),
        grant_seconds=60,
        max_grant_seconds=600,
        validity_seconds=120,
        tick_interval_ms=20,
    )
    h = await open_harness(settings, FakeClock())
    try:
        yield h
    finally:
        await h.channel.close()
        await h.running.stop(grace_seconds=0.5)
