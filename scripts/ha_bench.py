"""What a hot standby costs and how fast it catches up (issue 11), on PostgreSQL.

1. **Throughput side by side**, loadtest/bench_compare.py's workload (--calls calls in a
   closed loop of reserve -> --renews renews -> release over --accounts accounts, raw
   Control streams coalescing at most --batch operations per message), against

     plain        `callcredit-server` on the PostgreSQL journal, no --ha;
     ha           a --ha primary alone: its lease renewals, and the epoch check (the
                  lease row read FOR SHARE) in every group commit;
     ha+standby   the same with a standby tailing the journal (on this machine, so its
                  CPU competes with the primary's);

   each on a fresh schema, warmed up --warmup s, measured --seconds s, drained and
   checked (no balance below zero, nothing held, money out = what releases charged).
   Besides ops/s and latency, each server's CPU time over the measured seconds per
   operation (/proc/PID/stat utime + stime: the server process alone, not PostgreSQL's
   backends nor a snapshot's forked child), which the machine's other load disturbs far
   less than throughput; with --rounds > 1, the variants alternate and the medians follow.
2. **Catch-up**: a primary and a standby under the same load; the standby is stopped
   (SIGSTOP) for --stop-seconds while the load goes on, then continued; its log says
   when it has applied the backlog (`standby caught up: N records applied in T s`).
3. **The takeover's state-sized step** (--takeover-calls N): a new primary's first
   command, `Takeover`, restarts the validity of every open call in memory (its record
   writes no history row); with N open calls (one per account) journalled in a fresh
   schema, the apply and the group commit of that one record are timed. The rest of a takeover
   (the lease's expiry, ending sessions, taking the lease, reading the last records)
   does not grow with the state.

    python scripts/ha_bench.py --database-url postgresql+psycopg://postgres@127.0.0.1/cc
    python scripts/ha_bench.py --database-url ... --seconds 10 --stop-seconds 60
    python scripts/ha_bench.py --database-url ... --seconds 10 --rounds 5 --stop-seconds 0
    python scripts/ha_bench.py --database-url ... --seconds 0 --stop-seconds 0 \\
        --takeover-calls 100000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, AsyncExitStack, ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `loadtest`, `tests`

from callcredit_server import launch
from callcredit_server.clock import wall_clock_ms
from callcredit_server.core import (
    Command,
    CreateAccount,
    PutTariff,
    Rate,
    Reserve,
    StateMachine,
    Takeover,
    Tariff,
    TopUp,
)
from callcredit_server.journal import Journal, JournalRecord
from loadtest import bench_compare
from loadtest.baselines import grpc_drivers
from loadtest.baselines.procs import process_cpu_seconds
from loadtest.baselines.workload import DESTINATION, Workload, check
from tests.ha.cluster import SERVING, health

BALANCE = bench_compare.ACCOUNT_BALANCE
VARIANTS = ("plain", "ha", "ha+standby")
CAUGHT_UP = re.compile(r"standby caught up: (\d+) records applied in ([\d.]+) s")


@dataclass
class Result:
    variant: str
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    problems: list[str]
    primary_cpu_us_per_op: float  # the primary process's CPU time / operations, measured
    standby_cpu_us_per_op: float  # the same of the standby (0 without one)


def server(url: str, folder: Path, ha: bool) -> AbstractContextManager[launch.ServerProcess]:
    """A server on a free port, its log in `folder`; with `ha`, it may be a standby."""
    args = ["--listen", "127.0.0.1:0", "--database-url", url,
            "--snapshot-dir", str(folder / "snapshots"), "--log-level", "INFO"]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    return launch.serving([*args, "--ha"] if ha else args, folder / "server.log", cwd=folder)


async def wait_serving(target: str, timeout_seconds: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while await asyncio.to_thread(health, target) != SERVING:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target} is not serving after {timeout_seconds} s")
        await asyncio.sleep(0.05)


async def drive(
    target: str, accounts: list[str], options: argparse.Namespace
) -> tuple[Workload, asyncio.Task[None]]:
    """Open `accounts` on the server at `target` and start the dialer workload on it."""
    await grpc_drivers.setup_callcredit(target, accounts, BALANCE)
    workload = Workload(
        calls=options.calls, renews=options.renews, accounts=accounts, tag=uuid.uuid4().hex[:8]
    )
    task = asyncio.create_task(
        grpc_drivers.drive_control(
            target,
            workload,
            streams=options.streams,
            max_batch=options.batch,
            window=grpc_drivers.SERVER_WINDOW_MESSAGES,
        )
    )
    return workload, task


async def run_variant(variant: str, options: argparse.Namespace, workdir: Path) -> Result:
    accounts = [f"a{n}" for n in range(options.accounts)]
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(bench_compare._journal_schema(options.database_url))
        sync = stack.enter_context(ExitStack())
        folder = workdir / variant
        primary = sync.enter_context(server(url, folder, ha=variant != "plain"))
        await wait_serving(primary.target)
        pids = [primary.pid]
        if variant == "ha+standby":
            pids.append(sync.enter_context(server(url, folder / "standby", ha=True)).pid)
        workload, task = await drive(primary.target, accounts, options)
        await bench_compare._settle(task, options.warmup)
        cpu_before = [process_cpu_seconds([pid]) for pid in pids]
        began = time.monotonic()
        workload.measuring = True
        await bench_compare._settle(task, options.seconds)
        workload.measuring = False
        elapsed = time.monotonic() - began
        cpu = [process_cpu_seconds([pid]) - b for pid, b in zip(pids, cpu_before, strict=True)]
        cpu.append(0.0)  # no standby
        workload.stop()
        await asyncio.wait_for(task, 120)
        totals = await grpc_drivers.callcredit_totals(primary.target, accounts, BALANCE)
    ops = max(workload.measured_ops, 1)
    return Result(
        variant,
        workload.measured_ops / elapsed,
        workload.histogram.quantile_ms(0.50),
        workload.histogram.quantile_ms(0.99),
        check(totals, workload),
        cpu[0] / ops * 1e6,
        cpu[1] / ops * 1e6,
    )


async def catch_up(options: argparse.Namespace, workdir: Path) -> str:
    """Stop the standby for --stop-seconds under load; how long it took to catch up."""
    accounts = [f"a{n}" for n in range(options.accounts)]
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(bench_compare._journal_schema(options.database_url))
        sync = stack.enter_context(ExitStack())
        folder = workdir / "catch-up"
        primary = sync.enter_context(server(url, folder, ha=True))
        await wait_serving(primary.target)
        standby = sync.enter_context(server(url, folder / "standby", ha=True))
        workload, task = await drive(primary.target, accounts, options)
        await bench_compare._settle(task, options.warmup)
        workload.measuring = True
        standby.process.send_signal(signal.SIGSTOP)
        await bench_compare._settle(task, options.stop_seconds)
        standby.process.send_signal(signal.SIGCONT)
        ops_while_stopped = workload.measured_ops
        deadline = time.monotonic() + 600
        while not CAUGHT_UP.search(standby.log_text()):
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not catch up in 10 minutes")
            await asyncio.sleep(0.1)
        workload.stop()
        await asyncio.wait_for(task, 120)
        found = CAUGHT_UP.search(standby.log_text())
    assert found is not None
    records, seconds = int(found.group(1)), float(found.group(2))
    return (
        f"standby stopped {options.stop_seconds:g} s under load ({ops_while_stopped:,} "
        f"operations meanwhile): caught up {records:,} records in {seconds:.2f} s "
        f"({records / max(seconds, 1e-9):,.0f} records/s) while the load went on"
    )


def _scale_commands(calls: int) -> Iterator[Command]:
    yield PutTariff(Tariff("t", "VND", (Rate("", 60_000_000, 1, 1, 0),)))
    for n in range(calls):
        yield CreateAccount(f"a{n}", "VND", "t", 0, 0)
        yield TopUp(f"a{n}", 1_000_000, "seed", "")
        yield Reserve(f"c{n}", f"a{n}", DESTINATION, 60, 60, 120)


async def takeover_record(options: argparse.Namespace) -> str:
    """Time the apply and the commit of Takeover with --takeover-calls open calls."""
    async with bench_compare._journal_schema(options.database_url) as url:
        journal = Journal(url)
        machine = StateMachine()
        now_ms = wall_clock_ms()
        seq = 0
        commands = _scale_commands(options.takeover_calls)
        built = time.perf_counter()
        while batch := list(itertools.islice(commands, 20_000)):
            records = []
            for command in batch:
                step = machine.apply(command, now_ms)
                seq += 1
                records.append(JournalRecord(seq, now_ms, command))
            await asyncio.to_thread(journal.append, records)
        built_s = time.perf_counter() - built
        started = time.perf_counter()
        step = machine.apply(Takeover(epoch=2), now_ms + 5_000)
        applied_s = time.perf_counter() - started
        record = JournalRecord(seq + 1, now_ms + 5_000, Takeover(epoch=2))
        started = time.perf_counter()
        await asyncio.to_thread(journal.append, [record])
        committed_s = time.perf_counter() - started
        journal.close()
    return (
        f"Takeover with {options.takeover_calls:,} open calls ({seq:,} records built in "
        f"{built_s:.0f} s): apply {applied_s * 1000:.0f} ms, commit of its "
        f"{len(step.calls):,} call rows {committed_s * 1000:.0f} ms"
    )


async def run(options: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="ha-bench-"))
    print(f"{'variant':<12} {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'primary us/op':>13} "
          f"{'standby us/op':>13}  check  (load average {os.getloadavg()[0]:.1f})",
          flush=True)  # fmt: skip
    results: dict[str, list[Result]] = {variant: [] for variant in VARIANTS}
    for variant in VARIANTS * options.rounds if options.seconds else ():
        r = await run_variant(variant, options, workdir / str(uuid.uuid4().hex[:6]))
        results[variant].append(r)
        check_text = "ok" if not r.problems else "; ".join(r.problems[:3])
        print(f"{r.variant:<12} {r.ops_per_s:>8,.0f} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f} "
              f"{r.primary_cpu_us_per_op:>13.1f} {r.standby_cpu_us_per_op:>13.1f}  "
              f"{check_text}  (load average {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    for variant, rounds in results.items() if options.rounds > 1 and options.seconds else ():
        print(f"{variant:<12} median of {len(rounds)}: "
              f"{statistics.median(r.ops_per_s for r in rounds):,.0f} ops/s, primary "
              f"{statistics.median(r.primary_cpu_us_per_op for r in rounds):.1f} us/op, "
              f"standby {statistics.median(r.standby_cpu_us_per_op for r in rounds):.1f} us/op",
              flush=True)  # fmt: skip
    if options.stop_seconds > 0:
        print(await catch_up(options, workdir), flush=True)
    if options.takeover_calls:
        print(await takeover_record(options), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", required=True, help="a PostgreSQL URL")
    parser.add_argument("--calls", type=int, default=1_000)
    parser.add_argument("--renews", type=int, default=2)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the three variants")
    parser.add_argument("--stop-seconds", type=float, default=60.0, help="0: no catch-up run")
    parser.add_argument("--takeover-calls", type=int, default=0, help="e.g. 100000; 0: skip")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
