"""Graceful drain: SIGTERM refuses new reserves, answers the rest, then exits 0.

The first test drives RunningServer.drain in process; the second sends SIGTERM to a
real `callcredit-server` while the dialer library has calls open, restarts it on the
same journal and port, and checks the calls continue and each is charged once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from callcredit.dialer import DialerClient
from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc
from callcredit_server.launch import ServerProcess, serving
from tests.ops.conftest import scrape
from tests.service.conftest import UNIT_PER_SECOND, Harness
from tests.service.streams import RawStream, release_op, renew_op, reserve_op

DRAIN_SECONDS = 6
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _reason(status: object) -> str:
    for detail in status.details:  # type: ignore[attr-defined]
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {status}")


async def _health(channel: grpc.aio.Channel) -> int:
    checked = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="")
    )
    return int(checked.status)


async def test_drain_refuses_new_reserves_answers_the_rest_and_ends_when_calls_end(
    harness: Harness,
) -> None:
    metrics = harness.running.metrics
    assert metrics is not None
    await harness.funded_account("acc", 1_000)
    stream = RawStream(harness.dialer)
    await stream.ask(reserve_op("r1", "c1", "acc"), reserve_op("r2", "c2", "acc"))

    draining = asyncio.create_task(harness.running.drain(30))
    async with asyncio.timeout(5):
        while await _health(harness.channel) != NOT_SERVING:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    (refused,) = await stream.ask(reserve_op("r3", "c3", "acc"))
    assert refused.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert _reason(refused.error) == "UNAVAILABLE"
    assert "draining" in refused.error.message
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await harness.dialer.Reserve(
            credit_control_pb2.ReserveRequest(call_id="c4", account_id="acc", destination="84")
        )
    assert unary.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "draining" in (unary.value.details() or "")
    (renewed,) = await stream.ask(renew_op("n1", "c1", 1, 5))
    assert renewed.renew.grant.allowed_seconds == 65
    (released,) = await stream.ask(release_op("x1", "c1", 9))
    assert released.release.charged == 9
    seen = await scrape(metrics.port)
    assert seen["callcredit_draining", ()] == 1
    assert (
        seen["callcredit_operations_total", (("kind", "reserve"), ("outcome", "UNAVAILABLE"))] == 2
    )
    await asyncio.sleep(0.3)
    assert not draining.done()  # c2 is still open

    await stream.ask(release_op("x2", "c2", 1))
    await asyncio.wait_for(draining, 2)  # no call open: the drain ends before its grace
    await harness.running.stop(grace_seconds=5)
    assert await stream.ended() == grpc.StatusCode.OK  # closed by the server, not cut


# ------------------------------------------------------------ real processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _server(database_url: str, port: int, metrics_port: int, log: Path) -> Iterator[ServerProcess]:
    """`callcredit-server` with JSON logs to `log`; killed on exit if it still runs."""
    args = ["--listen", f"127.0.0.1:{port}", "--database-url", database_url,
            "--log-format", "json", "--log-level", "INFO", "--drain-seconds", str(DRAIN_SECONDS),
            "--grant-seconds", "30", "--validity-seconds", "30",
            "--metrics-listen", f"127.0.0.1:{metrics_port}"]  # fmt: skip
    with serving(args, log, kill=True) as server:
        yield server


async def _exit_code(process: subprocess.Popen[bytes], timeout: float) -> int:
    return await asyncio.wait_for(asyncio.to_thread(process.wait), timeout)


async def test_sigterm_drains_and_a_restart_continues_the_calls(
    database_url: str, tmp_path: Path
) -> None:
    port, metrics_port = _free_port(), _free_port()
    target = f"127.0.0.1:{port}"
    renewed = ("callcredit_operations_total", (("kind", "renew"), ("outcome", "OK")))
    first_log = tmp_path / "first.log"
    with _server(database_url, port, metrics_port, first_log) as first_server:
        first = first_server.process
        channel = grpc.aio.insecure_channel(target)
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        raw = RawStream(credit_control_pb2_grpc.CreditControlServiceStub(channel))
        await admin.PutTariff(
            admin_pb2.PutTariffRequest(
                tariff=admin_pb2.Tariff(tariff_id="t", currency="VND", rates=[UNIT_PER_SECOND])
            )
        )
        await admin.CreateAccount(
            admin_pb2.CreateAccountRequest(account_id="acc", currency="VND", tariff_id="t")
        )
        await admin.TopUp(
            admin_pb2.TopUpRequest(account_id="acc", amount=10_000, idempotency_key="seed")
        )
        async with DialerClient(target) as dialer:
            calls = [await dialer.reserve(f"c-{n}", "acc", "84901234567") for n in range(4)]
            for call in calls:
                call.answered()
            (raw_grant,) = await raw.ask(reserve_op("r", "raw-1", "acc"))
            assert raw_grant.reserve.grant.allowed_seconds == 30

            first.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                while await _health(channel) != NOT_SERVING:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            renewed_before = (await scrape(metrics_port)).get(renewed, 0)
            # New reserves are refused UNAVAILABLE; the library's waits through the restart.
            (refused,) = await raw.ask(reserve_op("r2", "raw-2", "acc"))
            assert _reason(refused.error) == "UNAVAILABLE"
            assert "draining" in refused.error.message
            late = asyncio.create_task(dialer.reserve("c-late", "acc", "84901234567"))
            # Renewals and releases are answered during the grace.
            (renew,) = await raw.ask(renew_op("n", "raw-1", 1, 2))
            assert renew.renew.grant.allowed_seconds == 32
            (release,) = await raw.ask(release_op("x", "raw-1", 3))
            assert release.release.charged == 3
            ended = await calls[0].release(2)
            assert ended.charged == 2
            async with asyncio.timeout(10):  # the refused reserve's retries re-attach calls
                while (await scrape(metrics_port)).get(renewed, 0) <= renewed_before:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            assert first.poll() is None  # still draining
            assert not late.done()

            assert await _exit_code(first, DRAIN_SECONDS + 20) == 0
            assert await raw.ended() in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE)
            await channel.close()

            with _server(database_url, port, metrics_port, tmp_path / "second.log") as restarted:
                second = restarted.process
                late_call = await asyncio.wait_for(late, 30)
                late_call.answered()
                # The open calls re-attached to the restarted server and go on.
                assert all(call.hangup_reason is None for call in calls[1:])
                results = [await asyncio.wait_for(c.release(), 15) for c in calls[1:]]
                results.append(await asyncio.wait_for(late_call.release(1), 15))
                assert all(r.charged == r.used_seconds > 0 for r in results[:3])

                channel = grpc.aio.insecure_channel(target)
                admin = admin_pb2_grpc.AdminServiceStub(channel)
                account = (
                    await admin.GetAccount(admin_pb2.GetAccountRequest(account_id="acc"))
                ).account
                entries = (
                    await admin.ListEntries(
                        admin_pb2.ListEntriesRequest(account_id="acc", limit=1000)
                    )
                ).entries
                for call_id in ("c-0", "c-1", "c-2", "c-3", "c-late", "raw-1"):
                    got = (await admin.GetCall(admin_pb2.GetCallRequest(call_id=call_id))).call
                    assert got.state == admin_pb2.CALL_STATE_RELEASED, call_id
                await channel.close()
                second.send_signal(signal.SIGTERM)  # nothing open: exits at once
                assert await _exit_code(second, 15) == 0
                assert not restarted.ready_file.exists()  # a clean exit takes it away

    charges: dict[str, int] = {}
    for entry in entries:
        if entry.kind != admin_pb2.ENTRY_KIND_TOP_UP:
            assert entry.kind == admin_pb2.ENTRY_KIND_CALL_CHARGE, entry
            assert entry.call_id not in charges, f"{entry.call_id} charged twice"
            charges[entry.call_id] = -entry.amount
    expected = {"c-0": 2, "raw-1": 3} | {r.call_id: r.charged for r in results}
    assert charges == expected
    assert sum(entry.amount for entry in entries) == account.balance
    assert account.balance == 10_000 - sum(expected.values())
    assert account.reserved == 0
    # Every log line of the first server is one JSON object; the drain is in them.
    logged = [json.loads(line) for line in first_log.read_text().splitlines()]
    messages = [line["message"] for line in logged]
    assert any(m.startswith("draining: new reserves refused") for m in messages)
    assert any(m.startswith("stopped: journal flushed") for m in messages)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in logged)


async def test_drain_ends_when_no_dialer_stream_is_connected(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("callcredit_server.app.DRAIN_IDLE_SECONDS", 0.5)
    await harness.funded_account("acc", 1_000)
    stream = RawStream(harness.dialer)
    await stream.ask(reserve_op("r1", "c1", "acc"))
    draining = asyncio.create_task(harness.running.drain(30))
    await asyncio.sleep(1.0)
    assert not draining.done()  # a dialer is connected and its call is open
    await stream.close()
    await asyncio.wait_for(draining, 3)  # the call stays open, but nobody is left to serve
