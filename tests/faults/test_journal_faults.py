"""Real journal faults under a running server: fail-stop, nothing acknowledged lost, exact restart.

Each test runs `scenario.py`'s story: acknowledged work, a real fault, then every change
and read answered UNAVAILABLE (unary RPCs: the gRPC status; the Control stream: error
Outcomes, the stream staying open), grpc.health.v1 Check("") NOT_SERVING, no push of an
unjournaled change; the fault is fixed, the server restarted, and it holds exactly what
was acknowledged, with the refused operations applied once when retried.

| fault | mechanism | server |
|---|---|---|
| PostgreSQL unreachable | TCP proxy cut: listener closed, connections reset | process |
| PostgreSQL commit reply lost | proxy passes COMMIT, drops its reply, cuts | in-process |
| SQLite disk full | tmpfs filled to ENOSPC: SQLITE_FULL | in-process |
| SQLite file system read-only | ext4 error, kernel remounts read-only: EROFS | process |
| SQLite journal on a read-only fs at start | tmpfs remounted read-only between runs | process |

Two more: a stalled PostgreSQL (packets dropped, not refused) fails stop within the
commit time limit, and history reads while PostgreSQL is unreachable answer UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2

from callcredit.v1 import admin_pb2
from tests.faults.conftest import PostgresSchema
from tests.faults.filesystems import ext4_image, small_tmpfs
from tests.faults.proxy import TcpProxy
from tests.faults.scenario import (
    FAULT_TOPUP,
    RPC_TIMEOUT_SECONDS,
    acknowledged_work,
    expect_fail_stop,
    expect_not_serving,
    expect_refused_everywhere,
    expect_resumed_exactly,
    expect_unavailable,
    health,
    snapshot,
)
from tests.faults.servers import ServerProcess, in_process_server, server_process
from tests.service.conftest import FakeClock

SERVING = health_pb2.HealthCheckResponse.SERVING
TMPFS_BYTES = 2 * 1024 * 1024  # room for the journal of the story, nothing more
EXT4_IMAGE_BYTES = 16 * 1024 * 1024
# A database that stops answering must not hold the server (and every dialer) waiting:
# within this the server should give up on the commit and fail-stop.
STALLED_COMMIT_DEADLINE_SECONDS = 10.0


def _sqlite_error_names(exc: BaseException) -> set[str]:
    """The SQLite result codes (SQLITE_FULL, ...) anywhere in an exception's causes."""
    names: set[str] = set()
    seen: BaseException | None = exc
    while seen is not None:
        driver = getattr(seen, "orig", None)  # SQLAlchemy's DBAPIError keeps the driver's
        for candidate in (seen, driver):
            if isinstance(candidate, sqlite3.Error):
                names.add(getattr(candidate, "sqlite_errorname", ""))
        seen = seen.__cause__ or seen.__context__
    return names


# ------------------------------------------------------------------ PostgreSQL


@pytest.mark.postgres
async def test_postgresql_unreachable_process_refuses_until_sigterm_then_resumes(
    postgres_schema: PostgresSchema, proxy: TcpProxy, tmp_path: Path
) -> None:
    url = postgres_schema.via(proxy.port)
    snapshots = tmp_path / "snapshots"
    async with server_process(url, snapshots) as (process, endpoint):
        stream = await acknowledged_work(endpoint)
        # A blip while idle is no fault: the dead pooled connection is replaced.
        proxy.cut()
        proxy.listen()
        await endpoint.admin.TopUp(
            admin_pb2.TopUpRequest(account_id="acc-a", amount=7, idempotency_key="k-blip"),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        assert await health(endpoint) == SERVING
        before = await snapshot(endpoint)

        proxy.cut()  # PostgreSQL unreachable: connections refused
        await expect_fail_stop(endpoint, stream)
        proxy.listen()  # reachable again: still fail-stopped until restarted
        await asyncio.sleep(0.5)
        await expect_refused_everywhere(endpoint, stream, tag="g")
        assert process.running, process.log
        await stream.close()
        assert await process.terminate() == 0, process.log

    async with server_process(url, snapshots) as (process, endpoint):
        await expect_resumed_exactly(endpoint, before)
        assert await process.terminate() == 0, process.log


@pytest.mark.postgres
async def test_postgresql_commit_reply_lost_is_unavailable_and_applied_once(
    postgres_schema: PostgresSchema, proxy: TcpProxy, tmp_path: Path
) -> None:
    """PostgreSQL commits k-fault but the server never hears: UNAVAILABLE, yet durable."""
    url = postgres_schema.via(proxy.port)
    snapshots = tmp_path / "snapshots"
    clock = FakeClock()
    async with in_process_server(url, snapshots, clock) as (_, endpoint):
        stream = await acknowledged_work(endpoint)
        before = await snapshot(endpoint)
        proxy.lose_next_commit_reply()
        await expect_fail_stop(endpoint, stream)
        assert proxy.commit_reply_lost.is_set()
        await stream.close()

    proxy.listen()
    async with in_process_server(url, snapshots, FakeClock(clock.now_ms)) as (_, endpoint):
        await expect_resumed_exactly(endpoint, before, fault_topup_durable=True)


@pytest.mark.postgres
async def test_postgresql_stalled_commit_fails_stop_within_a_bound(
    postgres_schema: PostgresSchema, proxy: TcpProxy, tmp_path: Path
) -> None:
    url = postgres_schema.via(proxy.port)
    snapshots = tmp_path / "snapshots"
    async with in_process_server(url, snapshots, FakeClock()) as (_, endpoint):
        stream = await acknowledged_work(endpoint)
        proxy.stall()
        try:
            await expect_unavailable(
                endpoint.admin.TopUp(FAULT_TOPUP, timeout=STALLED_COMMIT_DEADLINE_SECONDS)
            )
            await expect_not_serving(endpoint)
        finally:
            proxy.cut()  # unblocks the journal thread, so the server can stop
            await stream.close()


@pytest.mark.postgres
async def test_postgresql_unreachable_history_read_is_unavailable(
    postgres_schema: PostgresSchema, proxy: TcpProxy, tmp_path: Path
) -> None:
    url = postgres_schema.via(proxy.port)
    snapshots = tmp_path / "snapshots"
    async with in_process_server(url, snapshots, FakeClock()) as (_, endpoint):
        stream = await acknowledged_work(endpoint)
        await stream.close()
        proxy.cut()  # nothing is committed after this, so the writer has not failed
        await expect_unavailable(
            endpoint.admin.ListEntries(
                admin_pb2.ListEntriesRequest(account_id="acc-a"), timeout=RPC_TIMEOUT_SECONDS
            )
        )
        await expect_unavailable(
            endpoint.admin.ListCalls(
                admin_pb2.ListCallsRequest(account_id="acc-a"), timeout=RPC_TIMEOUT_SECONDS
            )
        )


# ------------------------------------------------------------------ SQLite


async def test_sqlite_disk_full_fails_stop_and_resumes_after_space_is_freed(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "mnt", TMPFS_BYTES) as fs:
        url = f"sqlite:///{fs.path / 'journal.db'}"
        snapshots = tmp_path / "snapshots"  # off the faulty file system: the journal is tested
        clock = FakeClock()
        async with in_process_server(url, snapshots, clock) as (running, endpoint):
            failures: list[BaseException] = []
            running.writer.on_failure(failures.append)
            stream = await acknowledged_work(endpoint)
            before = await snapshot(endpoint)
            fs.fill()
            await expect_fail_stop(endpoint, stream)
            assert len(failures) == 1
            assert "SQLITE_FULL" in _sqlite_error_names(failures[0]), repr(failures[0])
            fs.free()  # space again: still fail-stopped until restarted
            await expect_refused_everywhere(endpoint, stream, tag="g")
            await stream.close()

        async with in_process_server(url, snapshots, FakeClock(clock.now_ms)) as (_, endpoint):
            await expect_resumed_exactly(endpoint, before)


async def test_sqlite_file_system_turned_read_only_process_refuses_then_resumes(
    tmp_path: Path,
) -> None:
    with ext4_image(tmp_path / "fs.img", tmp_path / "mnt", EXT4_IMAGE_BYTES) as fs:
        url = f"sqlite:///{fs.path / 'journal.db'}"
        snapshots = tmp_path / "snapshots"  # off the faulty file system: the journal is tested
        async with server_process(url, snapshots) as (process, endpoint):
            stream = await acknowledged_work(endpoint)
            before = await snapshot(endpoint)
            fs.fail()  # the kernel remounts it read-only under the open journal
            await expect_fail_stop(endpoint, stream)
            await asyncio.sleep(0.5)
            await expect_refused_everywhere(endpoint, stream, tag="g")
            assert process.running, process.log
            await stream.close()
            assert await process.terminate() == 0, process.log

        fs.repair()  # unmount, e2fsck, mount read-write
        async with server_process(url, snapshots) as (process, endpoint):
            await expect_resumed_exactly(endpoint, before)
            assert await process.terminate() == 0, process.log


async def test_sqlite_journal_on_a_read_only_file_system_refuses_to_start(tmp_path: Path) -> None:
    """A server that could not write a record must not come up SERVING: it exits, saying why."""
    with small_tmpfs(tmp_path / "mnt", TMPFS_BYTES) as fs:
        url = f"sqlite:///{fs.path / 'journal.db'}"
        snapshots = tmp_path / "snapshots"
        async with server_process(url, snapshots) as (process, endpoint):
            stream = await acknowledged_work(endpoint)
            before = await snapshot(endpoint)
            await stream.close()
            assert await process.terminate() == 0, process.log

        fs.remount(read_only=True)
        refused = ServerProcess(url, snapshots)
        try:
            assert await refused.wait_exit() == 1, refused.log
            assert not refused.target, refused.log  # it never listened
            lines = refused.log.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), refused.log
        finally:
            await refused.kill()

        fs.remount(read_only=False)
        async with server_process(url, snapshots) as (process, endpoint):
            await expect_resumed_exactly(endpoint, before)
            assert await process.terminate() == 0, process.log
