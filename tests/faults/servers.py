"""The server under test: in this test's event loop, or as a `callcredit-server` process.

Both give an `Endpoint` (a channel and the stubs). The process variant proves more: a
journal fault leaves the process up, answering UNAVAILABLE, until SIGTERM stops it.
Its output goes to a log file, kept for failure messages. Nothing here blocks the event
loop: the PostgreSQL proxy runs on it.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc

from callcredit.v1 import admin_pb2_grpc, credit_control_pb2_grpc
from callcredit_server import launch
from callcredit_server.app import RunningServer, Settings, start
from tests.service.conftest import FakeClock

STARTUP_TIMEOUT_SECONDS = 60.0
SIGTERM_EXIT_TIMEOUT_SECONDS = 15.0
_STARTS = itertools.count(1)  # numbers the log files of one test run


@dataclass
class Endpoint:
    channel: grpc.aio.Channel
    admin: admin_pb2_grpc.AdminServiceAsyncStub
    dialer: credit_control_pb2_grpc.CreditControlServiceAsyncStub
    health: Any  # grpc.health.v1 HealthStub (grpc_health ships no type hints)


def connect(target: str) -> Endpoint:
    channel = grpc.aio.insecure_channel(target)
    return Endpoint(
        channel=channel,
        admin=admin_pb2_grpc.AdminServiceStub(channel),
        dialer=credit_control_pb2_grpc.CreditControlServiceStub(channel),
        health=health_pb2_grpc.HealthStub(channel),
    )


@asynccontextmanager
async def in_process_server(
    database_url: str, snapshot_dir: Path, clock: FakeClock
) -> AsyncIterator[tuple[RunningServer, Endpoint]]:
    """A server in this event loop on a free port; stopped (and its journal closed) on exit."""
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        snapshot_dir=str(snapshot_dir),
        tick_interval_ms=20,
    )
    running = await start(settings, clock_ms=clock)
    endpoint = connect(f"127.0.0.1:{running.port}")
    try:
        yield running, endpoint
    finally:
        await endpoint.channel.close()
        await running.stop(grace_seconds=0.5)


class ServerProcess:
    """`callcredit-server` on a free port (callcredit_server.launch), its log beside the
    snapshot folder; waited for in threads, never on the event loop."""

    def __init__(self, database_url: str, snapshot_dir: Path) -> None:
        # No drain on SIGTERM (tests/ops tests it): these servers stop with calls open and
        # no dialer, which would hold each stop for the drain's idle 6 s.
        args = ["--listen", "127.0.0.1:0", "--database-url", database_url,
                "--snapshot-dir", str(snapshot_dir), "--log-level", "WARNING",
                "--drain-seconds", "0"]  # fmt: skip
        log = snapshot_dir.parent / f"server-{next(_STARTS)}.log"
        self.server = launch.spawn(args, log)
        self.process = self.server.process

    @property
    def log(self) -> str:
        return self.server.log_text()

    @property
    def target(self) -> str:
        return self.server.target if self.server.poll_ready() else ""

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    async def wait_listening(self) -> str:
        await asyncio.to_thread(self.server.wait_ready, STARTUP_TIMEOUT_SECONDS)
        return self.server.target

    async def wait_exit(self) -> int:
        """The exit code of a process that must stop by itself (e.g. refusing to start)."""
        try:
            return await asyncio.to_thread(self.process.wait, STARTUP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"server did not exit by itself:\n{self.log}") from exc

    async def terminate(self) -> int:
        """SIGTERM; the exit code, once the process has stopped (it must, promptly)."""
        self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.process.wait, SIGTERM_EXIT_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"server still running {SIGTERM_EXIT_TIMEOUT_SECONDS}s after SIGTERM:\n{self.log}"
            ) from exc

    async def kill(self) -> None:
        await asyncio.to_thread(self.server.stop, kill=True)


@asynccontextmanager
async def server_process(
    database_url: str, snapshot_dir: Path
) -> AsyncIterator[tuple[ServerProcess, Endpoint]]:
    """A server process and an endpoint to it; killed on exit if the test did not stop it."""
    process = ServerProcess(database_url, snapshot_dir)
    try:
        endpoint = connect(await process.wait_listening())
        try:
            yield process, endpoint
        finally:
            await endpoint.channel.close()
    finally:
        await process.kill()
