"""Throughput of the Control stream: operations per second, one per message vs batched.

Starts `callcredit-server` as a separate process on a fresh SQLite journal (full
sync, ack after commit: the default), then drives reserve+release pairs over
several Control streams, each keeping a window of messages in flight. Prints one
line per variant and the ratio. Usage:

    python scripts/bench_control.py [--seconds 10] [--streams 4] [--batch 100]
        [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.service.processes import server_process

WINDOW_MESSAGES = 8  # messages in flight per stream


@dataclass
class Result:
    name: str
    operations: int
    messages: int
    seconds: float
    server_cpu_s: float | None = None  # the server process's user + system CPU time

    def line(self) -> str:
        cpu = ""
        if self.server_cpu_s is not None:
            cpu = (
                f"  server CPU {self.server_cpu_s / self.operations * 1e6:,.1f} us/op, "
                f"{self.server_cpu_s / self.messages * 1e6:,.0f} us/msg"
            )
        return (
            f"{self.name:<28} {self.operations / self.seconds:>10,.0f} ops/s "
            f"{self.messages / self.seconds:>9,.0f} msgs/s  ({self.operations:,} ops in "
            f"{self.seconds:.1f} s){cpu}"
        )


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of process `pid` (all its threads), from /proc.

    CPU time per operation is steadier than throughput on a shared machine: it does
    not count the time the server waited for a core.
    """
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _setup(channel: grpc.aio.Channel, accounts: int) -> None:
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    rate = admin_pb2.Rate(
        prefix="", price_per_minute_micros=1_179_600_000, first_increment_seconds=6,
        next_increment_seconds=6, connect_fee=0,
    )  # fmt: skip
    await admin.PutTariff(
        admin_pb2.PutTariffRequest(
            tariff=admin_pb2.Tariff(tariff_id="t", currency="VND", rates=[rate])
        )
    )
    for n in range(accounts):
        await admin.CreateAccount(
            admin_pb2.CreateAccountRequest(account_id=f"a{n}", currency="VND", tariff_id="t")
        )
        await admin.TopUp(
            admin_pb2.TopUpRequest(account_id=f"a{n}", amount=10**15, idempotency_key="bench")
        )


async def _drive(
    channel: grpc.aio.Channel,
    name: str,
    batch: int,
    streams: int,
    seconds: float,
    accounts: int,
    server_pid: int | None,
) -> Result:
    stub = credit_control_pb2_grpc.CreditControlServiceStub(channel)
    ids = itertools.count()
    counts = {"ops": 0, "msgs": 0}
    deadline = time.perf_counter() + seconds

    async def one_stream(k: int) -> None:
        call = stub.Control()
        window = asyncio.Semaphore(WINDOW_MESSAGES)
        done = asyncio.Event()

        async def reader() -> None:
            # The server may answer several messages in one response: every
            # message carries `batch` operations, so count answers, not responses.
            answered = 0
            async for response in call:
                counts["ops"] += len(response.outcomes)
                answered += len(response.outcomes)
                while answered >= batch:
                    answered -= batch
                    counts["msgs"] += 1
                    window.release()
            done.set()

        task = asyncio.create_task(reader())
        release_next: list[str] = []
        while time.perf_counter() < deadline:
            await window.acquire()
            ops = []
            if release_next:  # release the calls reserved by the previous message
                for call_id in release_next:
                    ops.append(credit_control_pb2.Operation(
                        request_id=f"x{call_id}",
                        release=credit_control_pb2.ReleaseRequest(call_id=call_id, used_seconds=42),
                    ))  # fmt: skip
                release_next = []
            else:
                for _ in range(batch):
                    call_id = f"{name}-{k}-{next(ids)}"
                    ops.append(credit_control_pb2.Operation(
                        request_id=f"r{call_id}",
                        reserve=credit_control_pb2.ReserveRequest(
                            call_id=call_id, account_id=f"a{next(ids) % accounts}",
                            destination="84901234567", requested_seconds=60,
                        ),
                    ))  # fmt: skip
                    release_next.append(call_id)
            await call.write(credit_control_pb2.ControlRequest(operations=ops))
        await call.done_writing()
        await task

    cpu_before = cpu_seconds(server_pid)
    start = time.perf_counter()
    await asyncio.gather(*(one_stream(k) for k in range(streams)))
    elapsed = time.perf_counter() - start
    cpu_after = cpu_seconds(server_pid)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return Result(name, counts["ops"], counts["msgs"], elapsed, cpu)


async def _main(args: argparse.Namespace, target: str, server_pid: int | None) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        await _setup(channel, args.accounts)
        single = await _drive(
            channel, "one-op-per-message", 1, args.streams, args.seconds, args.accounts,
            server_pid,
        )  # fmt: skip
        batched = await _drive(
            channel, f"batched-{args.batch}-per-message", args.batch, args.streams, args.seconds,
            args.accounts, server_pid,
        )  # fmt: skip
    print(single.line())
    print(batched.line())
    ratio = (batched.operations / batched.seconds) / (single.operations / single.seconds)
    print(f"batched / single: {ratio:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--target", default="", help="a running server instead of a fresh one")
    args = parser.parse_args()
    if args.target:
        asyncio.run(_main(args, args.target, None))
        return
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{tmp}/bench.db"
        with server_process(url) as (process, target):
            asyncio.run(_main(args, target, process.pid))


if __name__ == "__main__":
    main()
