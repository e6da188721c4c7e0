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
2. **Catch-up**: a primary and a standby under the same load; the standby is stopped
   (SIGSTOP) for --stop-seconds while the load goes on, then continued; its log says
   when it has applied the backlog (`standby caught up: N records applied in T s`).

    python scripts/ha_bench.py --database-url postgresql+psycopg://postgres@127.0.0.1/cc
    python scripts/ha_bench.py --database-url ... --seconds 10 --stop-seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `loadtest`, `tests`

from loadtest import bench_compare
from loadtest.baselines import grpc_drivers, procs
from loadtest.baselines.workload import Workload, check
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


def server_argv(url: str, folder: Path, ha: bool) -> list[str]:
    argv = [sys.executable, "-m", "callcredit_server.cli", "--listen", "127.0.0.1:0",
            "--database-url", url, "--snapshot-dir", str(folder / "snapshots"),
            "--log-level", "INFO"]  # fmt: skip
    return [*argv, "--ha"] if ha else argv


async def wait_serving(target: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await asyncio.to_thread(health, target) != SERVING:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target} is not serving after {timeout_s} s")
        await asyncio.sleep(0.05)


async def settle(task: asyncio.Task[None], seconds: float) -> None:
    done, _ = await asyncio.wait([task], timeout=seconds)
    if done:
        task.result()
        raise RuntimeError("the driver stopped before the run did")


async def run_variant(variant: str, options: argparse.Namespace, workdir: Path) -> Result:
    accounts = [f"a{n}" for n in range(options.accounts)]
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(bench_compare._journal_schema(options.database_url))
        sync = stack.enter_context(ExitStack())
        folder = workdir / variant
        folder.mkdir(parents=True)
        ha = variant != "plain"
        primary = sync.enter_context(
            procs.listening_process(server_argv(url, folder, ha), cwd=folder)
        )
        await wait_serving(primary.target)
        if variant == "ha+standby":
            (folder / "standby").mkdir()
            standby_argv = server_argv(url, folder / "standby", ha=True)
            sync.enter_context(procs.listening_process(standby_argv, cwd=folder))
        await grpc_drivers.setup_callcredit(primary.target, accounts, BALANCE)
        workload = Workload(
            calls=options.calls, renews=options.renews, accounts=accounts, tag=uuid.uuid4().hex[:8]
        )
        task = asyncio.create_task(
            grpc_drivers.drive_control(
                primary.target,
                workload,
                streams=options.streams,
                max_batch=options.batch,
                window=grpc_drivers.SERVER_WINDOW_MESSAGES,
            )
        )
        await settle(task, options.warmup)
        began = time.monotonic()
        workload.measuring = True
        await settle(task, options.seconds)
        workload.measuring = False
        elapsed = time.monotonic() - began
        workload.stop()
        await asyncio.wait_for(task, 120)
        totals = await grpc_drivers.callcredit_totals(primary.target, accounts, BALANCE)
    return Result(
        variant,
        workload.measured_ops / elapsed,
        workload.histogram.quantile_ms(0.50),
        workload.histogram.quantile_ms(0.99),
        check(totals, workload),
    )


async def catch_up(options: argparse.Namespace, workdir: Path) -> str:
    """Stop the standby for --stop-seconds under load; how long it took to catch up."""
    accounts = [f"a{n}" for n in range(options.accounts)]
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(bench_compare._journal_schema(options.database_url))
        sync = stack.enter_context(ExitStack())
        folder = workdir / "catch-up"
        (folder / "standby").mkdir(parents=True)
        primary = sync.enter_context(
            procs.listening_process(server_argv(url, folder, ha=True), cwd=folder)
        )
        await wait_serving(primary.target)
        standby = sync.enter_context(
            procs.listening_process(server_argv(url, folder / "standby", ha=True), cwd=folder)
        )
        await grpc_drivers.setup_callcredit(primary.target, accounts, BALANCE)
        workload = Workload(
            calls=options.calls, renews=options.renews, accounts=accounts, tag=uuid.uuid4().hex[:8]
        )
        task = asyncio.create_task(
            grpc_drivers.drive_control(
                primary.target,
                workload,
                streams=options.streams,
                max_batch=options.batch,
                window=grpc_drivers.SERVER_WINDOW_MESSAGES,
            )
        )
        await settle(task, options.warmup)
        workload.measuring = True
        standby.process.send_signal(signal.SIGSTOP)
        await settle(task, options.stop_seconds)
        standby.process.send_signal(signal.SIGCONT)
        ops_while_stopped = workload.measured_ops
        deadline = time.monotonic() + 600
        while not any(CAUGHT_UP.search(line) for line in standby.tail):
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not catch up in 10 minutes")
            await asyncio.sleep(0.1)
        workload.stop()
        await asyncio.wait_for(task, 120)
    found = next(m for line in standby.tail if (m := CAUGHT_UP.search(line)))
    records, seconds = int(found.group(1)), float(found.group(2))
    return (
        f"standby stopped {options.stop_seconds:g} s under load ({ops_while_stopped:,} "
        f"operations meanwhile): caught up {records:,} records in {seconds:.2f} s "
        f"({records / max(seconds, 1e-9):,.0f} records/s) while the load went on"
    )


async def run(options: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="ha-bench-"))
    print(f"{'variant':<12} {'ops/s':>8} {'p50 ms':>7} {'p99 ms':>7}  check", flush=True)
    for variant in VARIANTS * options.rounds:
        r = await run_variant(variant, options, workdir / str(uuid.uuid4().hex[:6]))
        check_text = "ok" if not r.problems else "; ".join(r.problems[:3])
        print(f"{r.variant:<12} {r.ops_per_s:>8,.0f} {r.p50_ms:>7.1f} {r.p99_ms:>7.1f}  "
              f"{check_text}", flush=True)  # fmt: skip
    if options.stop_seconds > 0:
        print(await catch_up(options, workdir), flush=True)


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
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
