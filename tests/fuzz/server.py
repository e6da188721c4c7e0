"""A real callcredit server on its own event loop thread, for synchronous fuzz tests.

Hypothesis drives plain functions; the server runs in a background thread with
a clock that only moves when a test says so (so nothing expires while a state
digest is compared). Clients talk to it over real gRPC on a real port.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc
from callcredit_server.app import RunningServer, Settings, start
from callcredit_server.core import StateMachine
from tests.service.conftest import UNIT_PER_SECOND, FakeClock

T = TypeVar("T")

A = admin_pb2
C = credit_control_pb2
RPC_TIMEOUT_SECONDS = 20.0  # an answer slower than this is a hang
CLIENT_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

# What every fuzzed server starts with: ids a generated request can hit.
ACCOUNTS = ("acc", "acc2", "poor", "capped", "susp", "closed", "usd")
TARIFFS = ("t-vnd", "t-usd", "t-free")
CALLS = ("call-a", "call-b", "call-c", "call-r", "call-x", "call-e")
KEYS = ("seed-acc", "seed-acc2", "k1")

Digest = tuple[Any, ...]


class ServerThread:
    """`callcredit_server.app.start` on a loop of its own; sync stubs to it."""

    def __init__(self, root: Path, **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server")
        self.thread.daemon = True
        self.thread.start()
        self.clock = FakeClock()
        base: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "database_url": f"sqlite:///{root / 'journal.db'}",
            "snapshot_dir": str(root / "snapshots"),
            "tick_interval_ms": 20,
            "snapshot_every_records": 0,
        }
        self.settings = Settings(**{**base, **settings})
        self.running: RunningServer = self.run(start(self.settings, clock_ms=self.clock))
        self.target = f"127.0.0.1:{self.running.port}"
        self.channel = grpc.insecure_channel(self.target, options=CLIENT_OPTIONS)
        self.admin = admin_pb2_grpc.AdminServiceStub(self.channel)
        self.dialer = credit_control_pb2_grpc.CreditControlServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.channel.close()
        try:
            self.run(self.running.stop(grace_seconds=0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    # ------------------------------------------------------------- checks

    def serving(self) -> bool:
        """Health says SERVING within a few seconds."""
        try:
            answer = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        except grpc.RpcError:
            return False
        return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)

    def digest(self) -> Digest:
        """The whole durable state: the machine's image (without its clock) and journal tail.

        Read on the writer's turn, so it is whole, and answered only once the
        journal covers it. A refused request must leave every part equal.
        """

        def read(machine: StateMachine) -> tuple[dict[str, Any], list[str]]:
            image = machine.image()
            image.pop("now_ms", None)
            return image, machine.audit()

        async def both() -> Digest:
            image, problems = await self.running.writer.read(read)
            last_seq = await asyncio.to_thread(self.running.journal.last_seq)
            return image, last_seq, tuple(problems)

        return self.run(both())

    def audit(self) -> list[str]:
        """Every broken invariant of the state now (empty when sound)."""
        return list(self.digest()[2])

    # ------------------------------------------------------------- seeding

    def seed(self) -> None:
        """Tariffs, accounts in every status, calls in every state (see the tuples above)."""
        free = A.Rate(
            prefix="",
            price_per_minute_micros=0,
            first_increment_seconds=1,
            next_increment_seconds=1,
            connect_fee=0,
        )
        pricey = A.Rate(
            prefix="84",
            price_per_minute_micros=1_200_000_000,
            first_increment_seconds=30,
            next_increment_seconds=6,
            connect_fee=500,
        )
        t = RPC_TIMEOUT_SECONDS
        for tariff_id, currency, rates in (
            ("t-vnd", "VND", [UNIT_PER_SECOND, pricey]),
            ("t-usd", "USD", [UNIT_PER_SECOND]),
            ("t-free", "VND", [free]),
        ):
            tariff = A.Tariff(tariff_id=tariff_id, currency=currency, rates=rates)
            self.admin.PutTariff(A.PutTariffRequest(tariff=tariff), timeout=t)
        for account_id, currency, tariff_id, cap, money in (
            ("acc", "VND", "t-vnd", 0, 1_000_000),
            ("acc2", "VND", "t-vnd", 0, 5_000),
            ("poor", "VND", "t-vnd", 0, 0),
            ("capped", "VND", "t-vnd", 3, 1_000_000),
            ("susp", "VND", "t-vnd", 0, 100_000),
            ("closed", "VND", "t-free", 0, 0),
            ("usd", "USD", "t-usd", 0, 700),
        ):
            self.admin.CreateAccount(
                A.CreateAccountRequest(
                    account_id=account_id,
                    currency=currency,
                    tariff_id=tariff_id,
                    max_concurrent_calls=cap,
                ),
                timeout=t,
            )
            if money:
                self.admin.TopUp(
                    A.TopUpRequest(
                        account_id=account_id, amount=money, idempotency_key=f"seed-{account_id}"
                    ),
                    timeout=t,
                )
        # call-e expired (charged its allowed seconds; a late Release refunds).
        self.dialer.Reserve(
            C.ReserveRequest(call_id="call-e", account_id="acc", destination="84901"), timeout=t
        )
        self.clock.advance(self.settings.validity_seconds + 10)
        self._wait_for_state("call-e", A.CALL_STATE_EXPIRED)
        for call_id, account_id in (
            ("call-a", "acc"),
            ("call-b", "acc2"),
            ("call-c", "capped"),
            ("call-r", "acc"),
            ("call-x", "susp"),
        ):
            self.dialer.Reserve(
                C.ReserveRequest(call_id=call_id, account_id=account_id, destination="84901"),
                timeout=t,
            )
        self.dialer.Release(C.ReleaseRequest(call_id="call-r", used_seconds=42), timeout=t)
        self.admin.UpdateAccount(
            A.UpdateAccountRequest(account_id="susp", status=A.ACCOUNT_STATUS_SUSPENDED), timeout=t
        )
        self.admin.UpdateAccount(
            A.UpdateAccountRequest(account_id="closed", status=A.ACCOUNT_STATUS_CLOSED), timeout=t
        )

    def _wait_for_state(self, call_id: str, state: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            call = self.admin.GetCall(
                A.GetCallRequest(call_id=call_id), timeout=RPC_TIMEOUT_SECONDS
            )
            if call.call.state == state:
                return
            time.sleep(0.02)
        raise AssertionError(f"{call_id} did not reach state {state}")
