"""One command, one run: the same dialer workload against callcredit and what users would
build instead (issue 4).

N concurrent calls (--calls, default 1,000) run a closed loop: reserve -> R renews
-> release with a used_seconds, then the slot places its next call. Two workloads by
default (--renews 2,0): R = 2, and R = 0 (reserve -> release: every operation opens or
ends a call). Each system runs each on one hot account and on --accounts (default
10,000) accounts:

  callcredit     callcredit-server (own process, fresh SQLite journal, default durability):
                 single   one operation per ControlRequest, raw grpc.aio Control streams
                 dialer   the client library's batching (callcredit.dialer.DialerClient)
                 batched  a raw stream, everything ready coalesced (--batch: <= 100 ops/message)
  callcredit-pg  the same on a PostgreSQL journal (only with --database-url)
  postgres       a conditional UPDATE per operation over a pool of psycopg connections,
                 synchronous_commit on
  redis          a Lua check-and-hold script (EVALSHA) on --redis-url: single (one command
                 at a time from many connections) and pipelined
  redis-aof      the same on a private redis-server with appendfsync always (durable per
                 answer, as the others), when redis-server is installed
  echo           a CreditControlService that answers every operation with a canned
                 Outcome (no state, no journal): the ceiling of Python gRPC here
  callcredit-old with --old-server DIR: another version of the server (the package
                 callcredit_server in DIR), each mode run right after this checkout's,
                 with the same client: old and new side by side, interleaved

Every run is checked: no balance below zero, nothing reserved or held once every call is
released, and the money that left the balances equals what the releases charged.
Latency is per operation, measured at the client, from the moment the operation is due
to its answer. The load generator is one Python process on the same machine as the
servers: its CPU is reported next to theirs.

    python loadtest/bench_compare.py --seconds 10
    python loadtest/bench_compare.py --only callcredit,echo --calls 200 --seconds 5
    python loadtest/bench_compare.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench
    python loadtest/bench_compare.py --only callcredit --old-server /tmp/old/server
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `loadtest` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
import psycopg

from loadtest.baselines import grpc_drivers, postgres, procs, redis_design
from loadtest.baselines.workload import AccountTotals, Workload, check

SYSTEMS = ("callcredit", "callcredit-pg", "postgres", "redis", "redis-aof", "echo")
MODES = ("single", "dialer", "batched")  # the gRPC systems' ways to send operations
DEFAULT_PG_URL = "postgresql://postgres@127.0.0.1:5432/bench_compare"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
HOT_BALANCE = 10**14
ACCOUNT_BALANCE = 10**12
DRAIN_TIMEOUT_SECONDS = 120.0
SHARED_NOTE = (
    "The load generator (one Python process) runs on the same machine as the servers and "
    "shares its cores; client CPU is its own process (every thread), server CPU the "
    "server's process(es) with their children (callcredit's projector), machine = all cores "
    "busy (of 100% x cores)."
)


@dataclass
class Options:
    seconds: float = 10.0
    warmup: float = 2.0
    calls: int = 1_000
    renews: tuple[int, ...] = (2, 0)
    """Renews per call of each workload, run in this order (0: reserve -> release)."""
    accounts: int = 10_000
    only: tuple[str, ...] = SYSTEMS
    database_url: str = ""
    pg_url: str = DEFAULT_PG_URL
    pg_pool: int = 16
    redis_url: str = DEFAULT_REDIS_URL
    redis_clients: int = 64
    redis_pipelines: int = 4
    streams: int = 0
    """Control streams for one-operation-per-message (0: enough for 64 calls each)."""
    window: int = grpc_drivers.SERVER_WINDOW_MESSAGES
    batch: int = 100
    """Most operations per ControlRequest in the raw batched mode (DialerClient: 1,000)."""
    batch_streams: int = 1
    dialers: int = 1
    """DialerClients (one stream each) the library mode spreads the calls over."""
    layouts: tuple[str, ...] = ("hot", "many")
    modes: tuple[str, ...] = MODES
    """The gRPC systems' modes to run (callcredit, callcredit-old, callcredit-pg, echo)."""
    use_uvloop: bool = True
    quiet: bool = False
    hot_balance: int = HOT_BALANCE
    balance: int = ACCOUNT_BALANCE
    """Each account's balance in the spread layout."""
    raise_errors: bool = False
    """Raise a system's failure instead of recording it and going on (tests)."""
    unsafe: bool = False
    """The PostgreSQL and Redis designs without their balance condition: they overdraw,
    and the check must say so (tests only)."""
    old_server: str = ""
    """A directory holding another callcredit_server package: run as callcredit-old."""


@dataclass
class Result:
    system: str
    layout: str
    mode: str
    ops_per_second: float
    p50_ms: float
    p99_ms: float
    ops: int
    seconds: float
    calls: int
    refused: int
    cut: int
    client_cpu_pct: float
    """CPU of the load generator's process over the window, % of one core."""
    server_cpu_pct: float | None
    """CPU of the server process(es) we can attribute, their children included (the
    projector), % of one core."""
    server_children_cpu_pct: float | None
    """Of server_cpu_pct, the part of the servers' child processes."""
    client_us_per_op: float
    server_us_per_op: float | None
    machine_cpu_pct: float
    check_ok: bool
    problems: list[str]
    durability: str
    renews: int = 2
    """The workload: renews per call."""
    notes: str = ""
    key: str = ""
    """system/mode, for the ratios."""


@dataclass
class Report:
    options: Options
    started: str
    machine: dict[str, str]
    results: list[Result] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def find(self, key: str, layout: str, renews: int) -> Result | None:
        for result in self.results:
            if result.key == key and result.layout == layout and result.renews == renews:
                return result
        return None

    def ratios(self) -> list[tuple[str, int, str, float]]:
        """(layout, renews, label, ratio of ops/s) for the comparisons the issues ask for."""
        dialer = "callcredit batched (DialerClient)"
        raw = "callcredit batched (raw)"
        on_pg = "callcredit on a PostgreSQL journal"
        pairs = [
            ("callcredit/dialer", "postgres/pool", f"{dialer} / PostgreSQL"),
            ("callcredit/dialer", "redis/pipelined", f"{dialer} / Redis pipelined"),
            ("callcredit/dialer", "redis-aof/pipelined", f"{dialer} / Redis AOF pipelined"),
            ("callcredit/batched", "postgres/pool", f"{raw} / PostgreSQL"),
            ("callcredit/batched", "redis/pipelined", f"{raw} / Redis pipelined"),
            ("callcredit/batched", "redis-aof/pipelined", f"{raw} / Redis AOF pipelined"),
            ("callcredit/single", "echo/single", "callcredit single / echo single"),
            ("callcredit/dialer", "echo/dialer", f"{dialer} / echo (DialerClient)"),
            ("callcredit/batched", "echo/batched", f"{raw} / echo batched (raw)"),
            ("callcredit-pg/dialer", "postgres/pool", f"{on_pg}, DialerClient / PostgreSQL"),
            ("callcredit-pg/single", "echo/single", f"{on_pg}, single / echo single"),
            ("callcredit/single", "callcredit-old/single", "new server / old, single"),
            ("callcredit/dialer", "callcredit-old/dialer", "new server / old, DialerClient"),
            ("callcredit/batched", "callcredit-old/batched", "new server / old, raw batched"),
        ]
        out = []
        for renews in self.options.renews:
            for layout in self.options.layouts:
                for top, bottom, label in pairs:
                    a, b = self.find(top, layout, renews), self.find(bottom, layout, renews)
                    if a is not None and b is not None and b.ops_per_second > 0:
                        out.append((layout, renews, label, a.ops_per_second / b.ops_per_second))
        return out


# -- measuring one variant ------------------------------------------------------------


@dataclass
class Window:
    ops: int
    seconds: float
    client_cpu: float
    server_cpu: float | None
    server_children_cpu: float | None
    machine_busy: float
    cores: int


def _cpu_snapshot(
    server_pids: list[int],
) -> tuple[float, float, tuple[float, float] | None, float, float]:
    busy, total = procs.machine_cpu_seconds()
    server = procs.tree_cpu_seconds(server_pids) if server_pids else None
    return time.perf_counter(), procs.self_cpu_seconds(), server, busy, total


async def _settle(task: asyncio.Task[object], seconds: float) -> None:
    """Sleep `seconds`, failing early if the driver ended (it must run until stopped)."""
    done, _ = await asyncio.wait([task], timeout=seconds)
    if done:
        task.result()
        raise RuntimeError("the driver stopped before the run did")


async def measure(
    workload: Workload,
    drive: Awaitable[object],
    server_pids: list[int],
    options: Options,
) -> Window:
    """Run the driver: warm up, count ops for options.seconds, then stop and drain."""
    task: asyncio.Task[object] = asyncio.ensure_future(drive)
    try:
        await _settle(task, options.warmup)
        t0, client0, server0, busy0, total0 = _cpu_snapshot(server_pids)
        workload.measuring = True
        await _settle(task, options.seconds)
        workload.measuring = False
        t1, client1, server1, busy1, total1 = _cpu_snapshot(server_pids)
        workload.stop()
        await asyncio.wait_for(asyncio.shield(task), DRAIN_TIMEOUT_SECONDS)
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
    elapsed = t1 - t0
    cores = os.cpu_count() or 1
    server_cpu = server_children_cpu = None
    if server0 is not None and server1 is not None:
        server_cpu = (sum(server1) - sum(server0)) / elapsed
        server_children_cpu = (server1[1] - server0[1]) / elapsed
    return Window(
        ops=workload.measured_ops,
        seconds=elapsed,
        client_cpu=(client1 - client0) / elapsed,
        server_cpu=server_cpu,
        server_children_cpu=server_children_cpu,
        machine_busy=(busy1 - busy0) / max(total1 - total0, 1e-9) * cores,
        cores=cores,
    )


def _result(
    system: str,
    layout: str,
    mode: str,
    label: str,
    workload: Workload,
    window: Window,
    totals: AccountTotals | None,
    durability: str,
    notes: str = "",
) -> Result:
    problems = check(totals, workload)
    return Result(
        system=system,
        layout=layout,
        mode=label,
        ops_per_second=window.ops / window.seconds,
        p50_ms=workload.histogram.quantile_ms(0.50),
        p99_ms=workload.histogram.quantile_ms(0.99),
        ops=window.ops,
        seconds=window.seconds,
        calls=workload.calls_released,
        refused=workload.refused_reserves,
        cut=workload.cut_grants,
        client_cpu_pct=100 * window.client_cpu,
        server_cpu_pct=None if window.server_cpu is None else 100 * window.server_cpu,
        server_children_cpu_pct=(
            None if window.server_children_cpu is None else 100 * window.server_children_cpu
        ),
        client_us_per_op=_per_op(window.client_cpu, window),
        server_us_per_op=None if window.server_cpu is None else _per_op(window.server_cpu, window),
        machine_cpu_pct=100 * window.machine_busy,
        check_ok=not problems,
        problems=problems,
        durability=durability,
        renews=workload.renews,
        notes=notes,
        key=f"{system}/{mode}",
    )


def _per_op(cpu_share: float, window: Window) -> float:
    """CPU microseconds per measured operation."""
    return cpu_share * window.seconds / max(window.ops, 1) * 1e6


# -- the systems ----------------------------------------------------------------------


def _accounts(layout: str, options: Options) -> tuple[list[str], int]:
    if layout == "hot":
        return ["hot"], options.hot_balance
    return [f"a{n}" for n in range(options.accounts)], options.balance


def _layout_name(layout: str, options: Options) -> str:
    return "hot (1 account)" if layout == "hot" else f"{options.accounts:,} accounts"


def _workload_name(renews: int) -> str:
    return f"reserve, {renews} renews, release" if renews else "reserve, release"


def _workload(accounts: list[str], options: Options) -> Workload:
    """The workload of this pass: `run` narrows options.renews to one value per pass."""
    (renews,) = options.renews
    return Workload(
        calls=options.calls, renews=renews, accounts=accounts, tag=uuid.uuid4().hex[:10]
    )


def _streams(options: Options) -> int:
    if options.streams:
        return options.streams
    return max(1, math.ceil(options.calls / options.window))


def _grpc_modes(
    options: Options,
) -> list[tuple[str, str, Callable[[str, Workload], Awaitable[None]]]]:
    streams = _streams(options)

    async def single(target: str, workload: Workload) -> None:
        await grpc_drivers.drive_control(
            target, workload, streams=streams, max_batch=1, window=options.window
        )

    async def dialer(target: str, workload: Workload) -> None:
        await grpc_drivers.drive_dialer(target, workload, dialers=options.dialers)

    async def batched(target: str, workload: Workload) -> None:
        await grpc_drivers.drive_control(
            target,
            workload,
            streams=options.batch_streams,
            max_batch=options.batch,
            window=options.window,
        )

    modes = [
        ("single", f"single: 1 op/message, {streams} streams", single),
        ("dialer", f"batched: DialerClient x {options.dialers} (1 stream each)", dialer),
        (
            "batched",
            f"batched: raw, <={options.batch:,} ops/message, {options.batch_streams} stream(s)",
            batched,
        ),
    ]
    return [mode for mode in modes if mode[0] in options.modes]


async def run_callcredit(
    report: Report, layout: str, options: Options, system: str, database_url: str
) -> None:
    for variant in _grpc_modes(options):
        await _run_callcredit_mode(report, layout, options, system, database_url, variant)
        if options.old_server and system == "callcredit":
            old = "callcredit-old"
            await _run_callcredit_mode(report, layout, options, old, database_url, variant)


async def _run_callcredit_mode(
    report: Report,
    layout: str,
    options: Options,
    system: str,
    database_url: str,
    variant: tuple[str, str, Callable[[str, Workload], Awaitable[None]]],
) -> None:
    mode, label, drive = variant
    accounts, balance = _accounts(layout, options)
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        async with AsyncExitStack() as stack:
            if database_url:
                url = await stack.enter_async_context(_journal_schema(database_url))
                durability = "PostgreSQL journal, ack after commit"
            else:
                url = f"sqlite:///{tmp}/journal.db"
                durability = "SQLite journal (WAL, synchronous=FULL), ack after commit"
            snapshots = Path(tmp) / "snapshots"
            server = stack.enter_context(
                procs.legacy_callcredit_server(url, snapshots, Path(tmp), options.old_server)
                if system == "callcredit-old"
                else procs.callcredit_server(url, snapshots, Path(tmp))
            )
            await grpc_drivers.setup_callcredit(server.target, accounts, balance)
            workload = _workload(accounts, options)
            window = await measure(workload, drive(server.target, workload), [server.pid], options)
            totals = await grpc_drivers.callcredit_totals(server.target, accounts, balance)
            if server.process.poll() is not None:
                raise RuntimeError(f"callcredit-server exited: {server.log_text()[-500:]}")
    _add(report, _result(system, layout, mode, label, workload, window, totals, durability))


def _journal_schema(database_url: str) -> _SchemaContext:
    return _SchemaContext(database_url)


class _SchemaContext:
    """A fresh schema for callcredit's PostgreSQL journal, in the given database; the
    server's URL points its search_path at it. Dropped after."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self.schema = f"bench_compare_journal_{uuid.uuid4().hex[:12]}"

    async def __aenter__(self) -> str:
        async with await psycopg.AsyncConnection.connect(
            postgres.conninfo(self.database_url), autocommit=True
        ) as conn:
            await conn.execute(f'CREATE SCHEMA "{self.schema}"')
        separator = "&" if "?" in self.database_url else "?"
        return f"{self.database_url}{separator}options=-csearch_path%3D{self.schema}"

    async def __aexit__(self, *exc: object) -> None:
        async with await psycopg.AsyncConnection.connect(
            postgres.conninfo(self.database_url), autocommit=True
        ) as conn:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')


async def run_echo(report: Report, layout: str, options: Options) -> None:
    accounts, _ = _accounts(layout, options)
    for mode, label, drive in _grpc_modes(options):
        with procs.echo_server(procs.REPO) as server:
            workload = _workload(accounts, options)
            window = await measure(workload, drive(server.target, workload), [server.pid], options)
        _add(
            report,
            _result(
                "echo", layout, mode, label, workload, window, None, "none (no state)",
                notes="shape check only",
            ),
        )  # fmt: skip


async def run_postgres(
    report: Report, layout: str, options: Options, *, unsafe: bool = False
) -> None:
    accounts, balance = _accounts(layout, options)
    durability = await postgres.synchronous_commit(options.pg_url)
    async with postgres.postgres_schema(options.pg_url, accounts, balance) as schema:
        workload = _workload(accounts, options)
        pids: list[int] = []
        window = await measure(
            workload,
            _postgres_drive(options, schema, workload, pids, unsafe=unsafe),
            pids,
            options,
        )
        totals = await postgres.postgres_totals(options.pg_url, schema, balance)
    _add(
        report,
        _result(
            "postgres", layout, "pool", f"1 statement/op, pool of {options.pg_pool}",
            workload, window, totals, durability,
            notes="server CPU: our backends only" + ("; UNSAFE" if unsafe else ""),
        ),
    )  # fmt: skip


async def _postgres_drive(
    options: Options, schema: str, workload: Workload, pids: list[int], *, unsafe: bool
) -> None:
    def started(backends: list[int]) -> None:
        pids.extend(backends)

    await postgres.drive_postgres(
        options.pg_url, schema, workload, pool=options.pg_pool, unsafe=unsafe, started=started
    )


async def run_redis(
    report: Report, layout: str, options: Options, system: str, url: str, *, unsafe: bool = False
) -> None:
    accounts, balance = _accounts(layout, options)
    durability = await redis_design.durability(url)
    pid = await redis_design.server_pid(url)
    modes: list[tuple[str, str]] = [
        ("single", f"single: 1 EVALSHA at a time, {options.redis_clients} connections"),
        ("pipelined", f"pipelined: <=1,000 EVALSHA, {options.redis_pipelines} connections"),
    ]
    for mode, label in modes:
        async with redis_design.redis_accounts(url, accounts, balance, unsafe=unsafe) as run:
            workload = _workload(accounts, options)
            drive: Awaitable[None]
            if mode == "single":
                drive = redis_design.drive_single(run, workload, clients=options.redis_clients)
            else:
                drive = redis_design.drive_pipelined(
                    run, workload, connections=options.redis_pipelines
                )
            window = await measure(workload, drive, [pid] if pid else [], options)
            totals = await redis_design.redis_totals(run, accounts, balance)
        _add(
            report,
            _result(
                system, layout, mode, label, workload, window, totals, durability,
                notes="UNSAFE (no balance check)" if unsafe else "",
            ),
        )  # fmt: skip


def _add(report: Report, result: Result) -> None:
    report.results.append(result)
    if not report.options.quiet:
        print(_line(result), flush=True)


# -- the run --------------------------------------------------------------------------


def _machine() -> dict[str, str]:
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = os.getloadavg()
    return {
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "loadavg_at_start": " ".join(f"{value:.2f}" for value in load),
        "platform": platform.platform(),
    }


async def run(options: Options) -> Report:
    """Every selected system on every layout; results in the order they ran."""
    report = Report(
        options=options,
        started=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=_machine(),
    )
    redis_up = await redis_design.ping(options.redis_url) if "redis" in options.only else False
    for renews in options.renews:
        one_workload = dataclasses.replace(options, renews=(renews,))
        for layout in options.layouts:
            for system in options.only:
                try:
                    await _run_system(report, layout, system, one_workload, redis_up)
                except Exception as exc:  # one broken system must not lose the others' results
                    if options.raise_errors:
                        raise
                    message = f"{system} on {layout}, {_workload_name(renews)}: {exc!r}"
                    report.failures.append(message)
                    print(f"FAILED: {message}", file=sys.stderr, flush=True)
    return report


async def _run_system(
    report: Report, layout: str, system: str, options: Options, redis_up: bool
) -> None:
    if system == "callcredit":
        await run_callcredit(report, layout, options, system, "")
    elif system == "callcredit-pg":
        if options.database_url:
            await run_callcredit(report, layout, options, system, options.database_url)
        else:
            _skip(report, "callcredit-pg: no --database-url")
    elif system == "postgres":
        await run_postgres(report, layout, options, unsafe=options.unsafe)
    elif system == "redis":
        if redis_up:
            await run_redis(
                report, layout, options, system, options.redis_url, unsafe=options.unsafe
            )
        else:
            _skip(report, f"redis: {options.redis_url} does not answer")
    elif system == "redis-aof":
        if shutil.which("redis-server") is None:
            _skip(report, "redis-aof: no redis-server installed")
            return
        with ExitStack() as stack:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="bc-redis-"))
            _, port = stack.enter_context(procs.private_redis(Path(workdir)))
            url = f"redis://127.0.0.1:{port}/0"
            await run_redis(report, layout, options, system, url, unsafe=options.unsafe)
    elif system == "echo":
        await run_echo(report, layout, options)
    else:
        raise ValueError(f"unknown system {system!r}")


def _skip(report: Report, message: str) -> None:
    if message not in report.skipped:
        report.skipped.append(message)
        if not report.options.quiet:
            print(f"skipped: {message}", flush=True)


# -- output ---------------------------------------------------------------------------

_COLUMNS = (
    "system", "layout", "workload", "mode", "ops/s", "p50 ms", "p99 ms", "client CPU",
    "client µs/op", "server CPU", "server µs/op", "machine CPU", "calls", "refused", "check",
)  # fmt: skip


def _server_cpu(result: Result) -> str:
    """The servers' CPU, with its children's part when they have one (the projector)."""
    if result.server_cpu_pct is None:
        return "-"
    children = result.server_children_cpu_pct
    if children is None or round(children) == 0:
        return f"{result.server_cpu_pct:.0f}%"
    return f"{result.server_cpu_pct:.0f}% ({children:.0f}% children)"


def _cells(result: Result, options: Options) -> list[str]:
    server = _server_cpu(result)
    server_op = "-" if result.server_us_per_op is None else f"{result.server_us_per_op:.0f}"
    return [
        result.system,
        _layout_name(result.layout, options),
        _workload_name(result.renews),
        result.mode,
        f"{result.ops_per_second:,.0f}",
        f"{result.p50_ms:.2f}",
        f"{result.p99_ms:.2f}",
        f"{result.client_cpu_pct:.0f}%",
        f"{result.client_us_per_op:.0f}",
        server,
        server_op,
        f"{result.machine_cpu_pct:.0f}%",
        f"{result.calls:,}",
        f"{result.refused:,}",
        "ok" if result.check_ok else "FAILED: " + "; ".join(result.problems),
    ]


def _line(result: Result) -> str:
    check_text = "ok" if result.check_ok else "FAILED: " + "; ".join(result.problems)
    server = _server_cpu(result)
    return (
        f"{result.system:<14} {result.layout:<5} R={result.renews} {result.mode:<52} "
        f"{result.ops_per_second:>9,.0f} ops/s  p50 {result.p50_ms:7.2f} ms  "
        f"p99 {result.p99_ms:7.2f} ms  cpu client {result.client_cpu_pct:3.0f}% "
        f"server {server:>4}  machine {result.machine_cpu_pct:3.0f}%  check {check_text}"
    )


def text_table(report: Report) -> str:
    rows = [list(_COLUMNS)] + [_cells(r, report.options) for r in report.results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    numeric = set(range(4, 14))
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i in numeric and n else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _settings_text(report: Report) -> list[str]:
    o = report.options
    m = report.machine
    durabilities = sorted({f"{r.system}: {r.durability}" for r in report.results})
    return (
        [
            f"- {o.calls:,} concurrent calls; workloads: "
            + ", ".join(_workload_name(r) for r in o.renews)
            + "; "
            f"{o.seconds:g} s measured per variant after {o.warmup:g} s of warm-up; layouts: "
            + ", ".join(_layout_name(layout, o) for layout in o.layouts),
            f"- balances: hot account {o.hot_balance:,}, others {o.balance:,} each"
            + (
                ": no call is refused for funds (the refused column stays 0)"
                if (o.hot_balance, o.balance) == (HOT_BALANCE, ACCOUNT_BALANCE)
                else ": sized by hand, refusals expected"
            ),
            f"- machine: {m['cpus']} CPUs ({m['cpu_model']}), Python {m['python']}, grpcio "
            f"{m['grpcio']}, load average at start {m['loadavg_at_start']}",
            f"- client event loop: {'uvloop' if o.use_uvloop else 'asyncio'}. {SHARED_NOTE} "
            "ops/s, latency and CPU cover the measured window; calls counts every call released "
            "(warm-up and drain included).",
            "- durability: " + "; ".join(durabilities),
        ]
        + [f"- skipped: {s}" for s in report.skipped]
        + [f"- FAILED: {f}" for f in report.failures]
    )


def markdown(report: Report, command: str) -> str:
    lines = [
        f"# bench_compare, {report.started}",
        "",
        "```sh",
        command,
        "```",
        "",
        *_settings_text(report),
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" if i < 4 else "---:" for i in range(len(_COLUMNS) - 1)) + "|---|",
    ]
    for result in report.results:
        lines.append("| " + " | ".join(_cells(result, report.options)) + " |")
    ratios = report.ratios()
    if ratios:
        lines += ["", "| layout | workload | ratio (ops/s) | |", "|---|---|---|---:|"]
        for layout, renews, label, value in ratios:
            lines.append(
                f"| {_layout_name(layout, report.options)} | {_workload_name(renews)} "
                f"| {label} | {value:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def as_json(report: Report, command: str) -> str:
    return json.dumps(
        {
            "command": command,
            "started": report.started,
            "machine": report.machine,
            "options": asdict(report.options),
            "results": [asdict(r) for r in report.results],
            "ratios": [
                {"layout": layout, "renews": renews, "label": label, "ratio": value}
                for layout, renews, label, value in report.ratios()
            ],
            "skipped": report.skipped,
            "failures": report.failures,
            "note": SHARED_NOTE,
        },
        indent=2,
    )


def _parse(argv: list[str] | None) -> tuple[Options, Path]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per variant")
    parser.add_argument("--warmup", type=float, default=2.0, help="before each measurement")
    parser.add_argument("--calls", type=int, default=1_000, help="concurrent calls")
    parser.add_argument(
        "--renews", default="2,0", help="renews per call of each workload, comma-separated"
    )
    parser.add_argument(
        "--accounts", type=int, default=10_000, help="accounts of the spread layout"
    )
    parser.add_argument(
        "--only", default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)} (callcredit-pg needs --database-url)",
    )  # fmt: skip
    parser.add_argument("--layouts", default="hot,many", help="hot, many, or both")
    parser.add_argument(
        "--modes", default=",".join(MODES),
        help=f"comma-separated subset of {','.join(MODES)}: the gRPC systems' modes",
    )  # fmt: skip
    parser.add_argument(
        "--database-url", default="",
        help="also run callcredit on this PostgreSQL journal (each variant in a fresh schema)",
    )  # fmt: skip
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL, help="the PostgreSQL design's database")
    parser.add_argument(
        "--pg-pool", type=int, default=16, help="connections of the PostgreSQL design"
    )
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--redis-clients", type=int, default=64, help="connections, single mode")
    parser.add_argument(
        "--redis-pipelines", type=int, default=4, help="connections, pipelined mode"
    )
    parser.add_argument(
        "--streams", type=int, default=0, help="Control streams, single mode (0: calls/64)"
    )
    parser.add_argument(
        "--hot-balance", type=int, default=HOT_BALANCE,
        help="the hot account's balance (small: INSUFFICIENT_FUNDS refusals happen)",
    )  # fmt: skip
    parser.add_argument("--balance", type=int, default=ACCOUNT_BALANCE, help="each other account's")
    parser.add_argument("--batch", type=int, default=100, help="most ops/message, raw batched")
    parser.add_argument("--batch-streams", type=int, default=1, help="streams, raw batched")
    parser.add_argument("--dialers", type=int, default=1, help="DialerClients, library mode")
    parser.add_argument("--no-uvloop", action="store_true", help="the default asyncio loop")
    parser.add_argument(
        "--old-server", default="", metavar="DIR",
        help="also run the callcredit_server package in DIR (callcredit-old), e.g. from "
        "`git worktree add /tmp/old 8852747`: DIR = /tmp/old/server",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None,
        help="Markdown file (JSON beside it); default loadtest/results/bench_compare-<date>.md",
    )  # fmt: skip
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    layouts = tuple(s.strip() for s in args.layouts.split(",") if s.strip())
    if not layouts or any(layout not in ("hot", "many") for layout in layouts):
        parser.error("--layouts takes hot, many or hot,many")
    modes = tuple(s.strip() for s in args.modes.split(",") if s.strip())
    if not modes or any(mode not in MODES for mode in modes):
        parser.error(f"--modes takes a comma-separated subset of {','.join(MODES)}")
    try:
        renews = tuple(int(r) for r in args.renews.split(","))
    except ValueError:
        parser.error("--renews takes comma-separated integers, e.g. 2,0")
    if args.calls < 1 or min(renews) < 0 or args.accounts < 1 or args.seconds <= 0:
        parser.error("--calls and --accounts must be >= 1, --renews >= 0, --seconds > 0")
    options = Options(
        seconds=args.seconds,
        warmup=args.warmup,
        calls=args.calls,
        renews=renews,
        accounts=args.accounts,
        only=only,
        database_url=args.database_url,
        pg_url=args.pg_url,
        pg_pool=args.pg_pool,
        redis_url=args.redis_url,
        redis_clients=args.redis_clients,
        redis_pipelines=args.redis_pipelines,
        streams=args.streams,
        batch=args.batch,
        batch_streams=args.batch_streams,
        dialers=args.dialers,
        layouts=layouts,
        modes=modes,
        use_uvloop=not args.no_uvloop,
        hot_balance=args.hot_balance,
        balance=args.balance,
        old_server=args.old_server,
    )
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    out = args.out or procs.REPO / "loadtest" / "results" / f"bench_compare-{stamp}.md"
    return options, out


def _run_loop(options: Options) -> Report:
    if options.use_uvloop:
        import uvloop

        return uvloop.run(run(options))
    return asyncio.run(run(options))


def main(argv: list[str] | None = None) -> int:
    options, out = _parse(argv)
    command = "python loadtest/bench_compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(SHARED_NOTE, flush=True)
    report = _run_loop(options)
    print()
    print(text_table(report))
    for layout, renews, label, value in report.ratios():
        print(f"{_layout_name(layout, options)}, {_workload_name(renews)}: {label}: {value:.2f}x")
    for skipped in report.skipped:
        print(f"skipped: {skipped}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(report, command.strip()))
    out.with_suffix(".json").write_text(as_json(report, command.strip()))
    print(f"\nwrote {out} and {out.with_suffix('.json')}")
    for failure in report.failures:
        print(f"FAILED: {failure}")
    return 0 if all(r.check_ok for r in report.results) and not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
