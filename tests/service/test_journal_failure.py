"""A journal that cannot be written stops the server taking work; nothing acked is lost."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from callcredit.v1 import admin_pb2
from callcredit_server.journal import JournalError, JournalRecord
from tests.service.conftest import FakeClock, Harness, open_harness
from tests.service.streams import RawStream, renew_op, reserve_op


async def test_a_failed_commit_answers_unavailable_and_a_restart_resumes_exactly(
    harness: Harness,
) -> None:
    await harness.funded_account("acc", 1_000)
    stream = RawStream(harness.dialer)
    (granted,) = await stream.ask(reserve_op("r1", "c1", "acc"))
    acked = await harness.account("acc")

    def broken(records: Sequence[JournalRecord]) -> None:
        raise JournalError("disk on fire")

    harness.running.journal.append = broken  # type: ignore[method-assign]
    (lost,) = await stream.ask(reserve_op("r2", "c2", "acc"))
    assert lost.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    for attempt in (
        harness.admin.TopUp(
            admin_pb2.TopUpRequest(account_id="acc", amount=5, idempotency_key="k")
        ),
        harness.admin.GetAccount(admin_pb2.GetAccountRequest(account_id="acc")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await attempt
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    health = health_pb2_grpc.HealthStub(harness.channel)
    checked = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert checked.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await stream.close()
    await harness.channel.close()
    await harness.running.stop(grace_seconds=0.5)

    # The operator fixes the disk and restarts: exactly the acknowledged state is back.
    restarted = await open_harness(harness.settings, FakeClock(harness.clock.now_ms))
    try:
        assert await restarted.account("acc") == acked
        again = RawStream(restarted.dialer)
        (renewed,) = await again.ask(renew_op("n", "c1", 1, 10))
        assert renewed.renew.grant.allowed_seconds == 70
        assert granted.reserve.grant.allowed_seconds == 60
        (fresh,) = await again.ask(reserve_op("r2", "c2", "acc"))  # c2 never happened
        assert fresh.reserve.grant.allowed_seconds == 60
        await again.close()
    finally:
        await restarted.channel.close()
        await restarted.running.stop(grace_seconds=0.5)
