"""What the changefeed costs the writer: Control throughput with 0 and with N followers.

For each follower count (0 and 10 by default) it starts a fresh `callcredit-server` on a
fresh SQLite journal, starts that many WatchEvents streams in a separate process (so
their client work does not slow the driver), drives batched reserve+release pairs over
Control streams for --seconds (scripts/bench_control.py's driver), and prints
throughput, the server's CPU per operation, and how many events each follower got.

The events are made by the projector, the server's child process (projector.py): the
script reports its CPU per operation apart, counted until it has stored the events of
every record of the run (how far behind it was when the drive ended, and how long it
took to catch up, are printed too). A server without a projector child (an older
version, run with PYTHONPATH) gets no projector line. Usage:

    python scripts/bench_changefeed.py [--seconds 30] [--followers 0,10] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import grpc

from callcredit.v1 import admin_pb2, admin_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_control import _drive, _setup

from callcredit_server.journal import Journal
from loadtest.baselines.procs import process_cpu_seconds
from tests.service.processes import server_process

CATCH_UP_TIMEOUT_SECONDS = 300.0


def _projectors(pid: int) -> list[int]:
    """The projector children of server `pid` (none for a server without one)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_bytes().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and b"projector" in (stat.parent / "cmdline").read_bytes():
            children.append(int(stat.parent.name))
    return children


async def _caught_up(url: str) -> tuple[int, float]:
    """Wait until the projector has stored the events of the journal's last record:
    how many records it was behind at first, and how long the wait took."""
    started = time.perf_counter()
    with Journal(url) as journal:
        behind = journal.last_seq() - journal.projected_through()
        while journal.projected_through() < journal.last_seq():
            if time.perf_counter() - started > CATCH_UP_TIMEOUT_SECONDS:
                raise TimeoutError("the projector did not catch up")
            await asyncio.sleep(0.05)
    return behind, time.perf_counter() - started


async def _follow(target: str, streams: int) -> None:
    """The follower process: `streams` WatchEvents from the end, counted until killed."""
    counts = [0] * streams
    cut = [""] * streams

    async def one(k: int) -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            try:
                async for response in stub.WatchEvents(admin_pb2.WatchEventsRequest(from_end=True)):
                    counts[k] += len(response.events)
            except grpc.aio.AioRpcError as exc:
                cut[k] = str(exc.code())

    tasks = [asyncio.create_task(one(k)) for k in range(streams)]
    await asyncio.to_thread(sys.stdin.read)  # until the parent closes our stdin
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(" ".join(f"{c}{'!' + x if x else ''}" for c, x in zip(counts, cut, strict=True)))


async def _measure(
    target: str, url: str, args: argparse.Namespace, followers: int, pid: int
) -> str:
    async with grpc.aio.insecure_channel(target) as channel:
        await _setup(channel, args.accounts)
        projectors = _projectors(pid)
        if projectors:
            await _caught_up(url)  # the set-up's events are not the run's
        projector_before = process_cpu_seconds(projectors)
        follower: asyncio.subprocess.Process | None = None
        if followers:
            follower = await asyncio.create_subprocess_exec(
                *(sys.executable, __file__, "--follow", target, "--streams", str(followers)),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            await asyncio.sleep(1.0)  # the streams are open
        result = await _drive(
            channel, f"{followers}-followers", args.batch, args.streams, args.seconds,
            args.accounts, None, pid,
        )  # fmt: skip
        got = ""
        if projectors:
            behind, waited = await _caught_up(url)
            cpu = process_cpu_seconds(projectors) - projector_before
            got += (
                f"\n  projector CPU {cpu / result.operations * 1e6:,.1f} us/op; "
                f"{behind:,} records behind at the end, caught up {waited:.1f} s later"
            )
        if follower is not None:
            out, _ = await asyncio.wait_for(follower.communicate(b""), 60)
            got += f"\n  events per follower: {out.decode().strip()}"
    return result.line() + got


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--followers", default="0,10")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--follow", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follow:
        asyncio.run(_follow(args.follow, args.streams))
        return
    for followers in (int(n) for n in args.followers.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/bench.db"
            with server_process(url) as (process, target):
                print(asyncio.run(_measure(target, url, args, followers, process.pid)), flush=True)


if __name__ == "__main__":
    main()
