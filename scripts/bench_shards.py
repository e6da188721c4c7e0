"""A measured sketch of docs/scaling.md: one single writer vs two, each owning half the
accounts.

The workload is loadtest/bench_compare.py's (loadtest/baselines/workload.py): N calls
(--calls, default 1,000) in a closed loop of reserve -> R renews -> release over
--accounts (default 10,000) accounts, driven by raw Control streams that coalesce up to
--batch (default 100) operations per message. It runs against

  1 shard   one `callcredit-server` owning every account (its own journal);
  2 shards  two `callcredit-server` processes, each owning the accounts whose stable
            hash maps to it, each with its own journal.

The client routes the way docs/scaling.md describes: account_id -> logical shard
(crc32 of the id, modulo LOGICAL_SHARDS) -> server (the shard map). A Reserve goes to
its account's server; Renew and Release name only the call, so the client remembers the
server each call was reserved on. A misrouted operation would find no such account or
call and fail the run's check, so a passing check also says the routing held.

Printed per variant: ops/s, latency, the CPU of the client, of each server and of the
whole machine, and server CPU per operation; then the 2-shard / 1-shard ratio. The load
generator is one Python process on the same cores as the servers.

    python scripts/bench_shards.py --seconds 10
    python scripts/bench_shards.py --seconds 10 --rounds 2        # 1, 2, 1, 2: less noise
    python scripts/bench_shards.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `loadtest` importable

import grpc

from callcredit.v1 import credit_control_pb2, credit_control_pb2_grpc
from loadtest import bench_compare
from loadtest.baselines import grpc_drivers, procs
from loadtest.baselines.grpc_drivers import _answer, slot_operation
from loadtest.baselines.workload import RESERVE, AccountTotals, Slot, Workload, check
from loadtest.lanes import Lane, run_lanes

LOGICAL_SHARDS = 64
"""Fixed for the life of a deployment: an account's logical shard never changes; only
the map from logical shards to servers does (docs/scaling.md)."""
BALANCE = bench_compare.ACCOUNT_BALANCE
DRAIN_TIMEOUT_SECONDS = 120.0


# -- routing --------------------------------------------------------------------------


def logical_shard(account_id: str) -> int:
    """A stable hash: the same on every machine, every Python, every restart (never
    Python's salted hash())."""
    return zlib.crc32(account_id.encode()) % LOGICAL_SHARDS


def shard_map(servers: int) -> list[int]:
    """logical shard -> server index: contiguous runs of logical shards per server."""
    return [shard * servers // LOGICAL_SHARDS for shard in range(LOGICAL_SHARDS)]


class Router:
    """What a dialer library would keep: the shard map, and each open call's server."""

    def __init__(self, accounts: Sequence[str], servers: int) -> None:
        owners = shard_map(servers)
        self.server_of_account = {a: owners[logical_shard(a)] for a in accounts}
        self.server_of_call: dict[str, int] = {}

    def accounts_of(self, server: int) -> list[str]:
        return [a for a, s in self.server_of_account.items() if s == server]

    def route(self, call_id: str, kind: int, account: str) -> int:
        if kind == RESERVE:
            server = self.server_of_account[account]
            self.server_of_call[call_id] = server
            return server
        return self.server_of_call[call_id]

    def forget(self, call_id: str) -> None:
        self.server_of_call.pop(call_id, None)


# -- the driver -----------------------------------------------------------------------


async def drive_sharded(
    targets: Sequence[str],
    router: Router,
    workload: Workload,
    *,
    streams_per_server: int,
    max_batch: int,
    window: int,
) -> None:
    """grpc_drivers.drive_control with one set of lanes per server: each slot's next
    operation goes to the lane of its call's server (its account's, for a Reserve)."""
    request_ids = [str(index) for index in range(workload.calls)]
    slots = workload.slots
    async with AsyncExitStack() as stack:
        lanes: list[list[Lane[Slot]]] = []
        for target in targets:
            chan = await stack.enter_async_context(grpc_drivers.channel(target))
            stub = credit_control_pb2_grpc.CreditControlServiceStub(chan)
            lanes.append(
                [
                    Lane[Slot](
                        stub.Control(wait_for_ready=True), window=window, max_batch=max_batch
                    )
                    for _ in range(streams_per_server)
                ]
            )
        every_lane = [lane for per_server in lanes for lane in per_server]

        def lane_of(slot_index: int) -> Lane[Slot]:
            slot = slots[slot_index]
            server = router.route(slot.call_id, slot.kind, slot.account)
            return lanes[server][slot_index % streams_per_server]

        async def send(lane: Lane[Slot]) -> None:
            await lane.send(slot_operation(request_ids), workload.drained)

        async def receive(lane: Lane[Slot]) -> None:
            while True:
                response = await lane.call.read()
                if response is grpc.aio.EOF:
                    return
                assert isinstance(response, credit_control_pb2.ControlResponse)
                woken: set[int] = set()
                for outcome in response.outcomes:
                    slot = slots[int(outcome.request_id)]
                    lane.answered(slot.msg)
                    ended = slot.call_id
                    if _answer(workload, slot, outcome):
                        if slot.call_id != ended:  # the call ended, the slot placed another
                            router.forget(ended)
                        target = lane_of(slot.index)
                        target.ready.append(slot)
                        woken.add(id(target))
                    else:
                        router.forget(ended)
                for other in every_lane:
                    if id(other) in woken:
                        other.wake.set()

        for slot in workload.start():
            lane_of(slot.index).ready.append(slot)
        await run_lanes(every_lane, workload.drained, send, receive)


# -- measuring ------------------------------------------------------------------------


@dataclass
class Result:
    shards: int
    round: int
    ops_per_second: float
    p50_ms: float
    p99_ms: float
    ops: int
    seconds: float
    client_cpu_pct: float
    server_cpu_pct: list[float]
    """Each server process's CPU over the window, % of one core."""
    server_us_per_op: float
    """All servers' CPU microseconds per operation."""
    machine_cpu_pct: float
    accounts_per_server: list[int]
    calls: int
    check_ok: bool
    problems: list[str]


def _snapshot(pids: Sequence[int]) -> tuple[float, float, list[float], float, float]:
    busy, total = procs.machine_cpu_seconds()
    servers = [procs.process_cpu_seconds([pid]) for pid in pids]
    return time.perf_counter(), procs.self_cpu_seconds(), servers, busy, total


async def _settle(task: asyncio.Task[None], seconds: float) -> None:
    done, _ = await asyncio.wait([task], timeout=seconds)
    if done:
        task.result()
        raise RuntimeError("the driver stopped before the run did")


async def run_variant(
    shards: int, round_number: int, options: argparse.Namespace, workdir: Path
) -> Result:
    """Start `shards` servers, set up their accounts, run the workload, check it."""
    accounts = [f"a{n}" for n in range(options.accounts)]
    router = Router(accounts, shards)
    owned = [router.accounts_of(server) for server in range(shards)]
    async with AsyncExitStack() as stack:
        sync = stack.enter_context(ExitStack())
        servers = []
        for server in range(shards):
            folder = workdir / f"r{round_number}-of{shards}-shard{server}"
            folder.mkdir()
            if options.database_url:  # each shard its own schema, as each would in production
                url = await stack.enter_async_context(
                    bench_compare._journal_schema(options.database_url)
                )
            else:
                url = f"sqlite:///{folder}/journal.db"
            servers.append(
                sync.enter_context(procs.callcredit_server(url, folder / "snapshots", folder))
            )
        targets = [s.target for s in servers]
        await asyncio.gather(
            *(
                grpc_drivers.setup_callcredit(t, mine, BALANCE)
                for t, mine in zip(targets, owned, strict=True)
            )
        )
        workload = Workload(
            calls=options.calls, renews=options.renews, accounts=accounts, tag=uuid.uuid4().hex[:10]
        )
        pids = [s.pid for s in servers]
        task = asyncio.create_task(
            drive_sharded(
                targets,
                router,
                workload,
                streams_per_server=options.streams_per_shard,
                max_batch=options.batch,
                window=grpc_drivers.SERVER_WINDOW_MESSAGES,
            )
        )
        try:
            await _settle(task, options.warmup)
            t0, client0, server0, busy0, total0 = _snapshot(pids)
            workload.measuring = True
            await _settle(task, options.seconds)
            workload.measuring = False
            t1, client1, server1, busy1, total1 = _snapshot(pids)
            workload.stop()
            await asyncio.wait_for(asyncio.shield(task), DRAIN_TIMEOUT_SECONDS)
        finally:
            if not task.done():
                task.cancel()
                await asyncio.wait([task])
        parts = await asyncio.gather(
            *(
                grpc_drivers.callcredit_totals(t, mine, BALANCE)
                for t, mine in zip(targets, owned, strict=True)
            )
        )
        for s in servers:
            if s.process.poll() is not None:
                raise RuntimeError(f"callcredit-server exited: {s.log_text()[-500:]}")
    elapsed = t1 - t0
    ops = workload.measured_ops
    server_cpu = [(b - a) / elapsed for a, b in zip(server0, server1, strict=True)]
    problems = check(_merge(parts), workload)
    if router.server_of_call:
        problems.append(f"{len(router.server_of_call)} calls still remembered after the drain")
    cores = os.cpu_count() or 1
    return Result(
        shards=shards,
        round=round_number,
        ops_per_second=ops / elapsed,
        p50_ms=workload.histogram.quantile_ms(0.50),
        p99_ms=workload.histogram.quantile_ms(0.99),
        ops=ops,
        seconds=elapsed,
        client_cpu_pct=100 * (client1 - client0) / elapsed,
        server_cpu_pct=[100 * c for c in server_cpu],
        server_us_per_op=sum(server_cpu) * elapsed / max(ops, 1) * 1e6,
        machine_cpu_pct=100 * (busy1 - busy0) / max(total1 - total0, 1e-9) * cores,
        accounts_per_server=[len(mine) for mine in owned],
        calls=workload.calls_released,
        check_ok=not problems,
        problems=problems,
    )


def _merge(parts: Sequence[AccountTotals]) -> AccountTotals:
    return AccountTotals(
        accounts=sum(p.accounts for p in parts),
        initial_total=sum(p.initial_total for p in parts),
        balance_total=sum(p.balance_total for p in parts),
        min_balance=min(p.min_balance for p in parts),
        negative_balances=sum(p.negative_balances for p in parts),
        reserved_total=sum(p.reserved_total for p in parts),
        nonzero_reserved=sum(p.nonzero_reserved for p in parts),
        open_holds=sum(p.open_holds for p in parts),
        open_holds_total=sum(p.open_holds_total for p in parts),
    )


# -- the run --------------------------------------------------------------------------


def _line(r: Result) -> str:
    servers = " + ".join(f"{c:.0f}%" for c in r.server_cpu_pct)
    check_text = "ok" if r.check_ok else "FAILED: " + "; ".join(r.problems)
    return (
        f"{r.shards} shard(s) round {r.round}: {r.ops_per_second:>9,.0f} ops/s  "
        f"p50 {r.p50_ms:7.2f} ms  p99 {r.p99_ms:7.2f} ms  client {r.client_cpu_pct:3.0f}%  "
        f"server(s) {servers}  {r.server_us_per_op:.0f} µs/op  "
        f"machine {r.machine_cpu_pct:3.0f}%  check {check_text}"
    )


async def run(options: argparse.Namespace) -> list[Result]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        for round_number in range(1, options.rounds + 1):
            for shards in (1, 2):
                result = await run_variant(shards, round_number, options, Path(tmp))
                print(_line(result), flush=True)
                results.append(result)
    return results


def summary(results: Sequence[Result]) -> list[str]:
    lines = []
    for shards in (1, 2):
        mine = [r for r in results if r.shards == shards]
        ops = sum(r.ops for r in mine) / sum(r.seconds for r in mine)
        us = sum(r.server_us_per_op * r.ops for r in mine) / max(sum(r.ops for r in mine), 1)
        lines.append(f"{shards} shard(s): {ops:,.0f} ops/s, {us:.0f} server µs/op (all rounds)")
    one = [r for r in results if r.shards == 1]
    two = [r for r in results if r.shards == 2]
    ratio = (sum(r.ops for r in two) / sum(r.seconds for r in two)) / (
        sum(r.ops for r in one) / sum(r.seconds for r in one)
    )
    lines.append(f"2 shards / 1 shard: {ratio:.2f}x ops/s")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per variant")
    parser.add_argument("--warmup", type=float, default=2.0, help="before each measurement")
    parser.add_argument("--calls", type=int, default=1_000, help="concurrent calls")
    parser.add_argument("--renews", type=int, default=2, help="renews per call")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=100, help="most operations per message")
    parser.add_argument("--streams-per-shard", type=int, default=1, help="Control streams")
    parser.add_argument("--rounds", type=int, default=1, help="1 then 2 shards, this many times")
    parser.add_argument(
        "--database-url", default="",
        help="PostgreSQL journals (a fresh schema per shard) instead of SQLite files",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--no-uvloop", action="store_true", help="the default asyncio loop")
    options = parser.parse_args(argv)
    if options.calls < 1 or options.accounts < 2 or options.rounds < 1 or options.seconds <= 0:
        parser.error("--calls >= 1, --accounts >= 2, --rounds >= 1, --seconds > 0")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"{os.cpu_count()} CPUs, load average at start {load}. {bench_compare.SHARED_NOTE}")
    if options.no_uvloop:
        results = asyncio.run(run(options))
    else:
        import uvloop

        results = uvloop.run(run(options))
    print()
    for line in summary(results):
        print(line)
    if options.json:
        options.json.write_text(
            json.dumps(
                {"argv": sys.argv[1:] if argv is None else argv, "loadavg_at_start": load,
                 "results": [asdict(r) for r in results], "summary": summary(results)},
                indent=2,
            )
        )  # fmt: skip
    return 0 if all(r.check_ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
