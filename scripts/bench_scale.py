"""Scale: many open calls on many accounts held by one server, renewed at their steady rate.

Issue 4's target: 100,000 open calls on 1,000,000 accounts held by one server, with its
memory stated, the renewals at their steady rate, and the renew p99 unchanged from a small
state. The script:

1. builds two SQLite journals offline, the way scripts/bench_recovery.py does (the real
   state machine and `Journal.append` in group commits): a big one of `--accounts`
   accounts and a small one of `--small-accounts`, each account created and topped up,
   plus a snapshot at the journal's end (as a running server leaves one every 100,000
   records), each in a child process;
2. for each state, small first, starts `callcredit-server` on it (`--grant-seconds G`,
   every other setting at its default) and states its start time and memory (/proc
   VmRSS, VmHWM); opens the calls over raw Control streams (`--streams` streams, at most
   `--batch` operations per message); holds them open and renews them at the big state's
   steady rate, calls / (G - 5) renewals per second, for `--seconds` (the small state's
   fewer calls renew more often to keep the same rate), with /metrics scraped every
   `--scrape-seconds` (15) as a Prometheus server would; then releases every call;
3. checks every call reserved and released, the server's open-call gauge back to 0, each
   charge equal to the tariff's cost of its used seconds, and, on a sample of accounts,
   balance == balance before - the run's charges == the sum of the ledger entries, nothing
   reserved, no call active; runs `callcredit-server verify` on the small journal (and on
   the big one with --verify: a full replay and a ledger query per account, slow);
4. prints one table, small beside big, and the p99 ratio.

Renew latency is measured at the client from the moment the renewal is due (the schedule
is fixed: renewal j of the run is due at t0 + j / rate) to its answer.

    python scripts/bench_scale.py --workdir /tmp/bench-scale                 # the issue's size
    python scripts/bench_scale.py --accounts 2000 --calls 200 --seconds 3 \\
        --small-accounts 200 --small-calls 20 --grant-seconds 10 --workdir /tmp/bs-tiny

With --start-from journal the server starts with no snapshot and replays the whole journal
(the slow start, and the memory of the state without a snapshot's decoding peak).
With --reuse the journals in --workdir are served again (their accounts, plus what earlier
runs did to them; call ids are new per run).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from callcredit.errors import CallcreditError
from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc
from callcredit_server import launch
from callcredit_server.clock import wall_clock_ms
from callcredit_server.core import Command, CreateAccount, PutTariff, Rate, StateMachine, Tariff
from callcredit_server.core import TopUp as TopUpCommand
from callcredit_server.journal import Journal, JournalRecord
from callcredit_server.projector import Projector
from callcredit_server.snapshot import write_snapshot
from loadtest.baselines.procs import (
    free_port,
    machine_cpu_seconds,
    process_cpu_seconds,
    self_cpu_seconds,
)
from loadtest.baselines.workload import (
    CONNECT_FEE,
    DESTINATION,
    FIRST_INCREMENT_SECONDS,
    NEXT_INCREMENT_SECONDS,
    PRICE_PER_MINUTE_MICROS,
    Histogram,
    cost,
)
from loadtest.lanes import Lane

REPO = Path(__file__).resolve().parent.parent
TARIFF_ID = "scale"
TOP_UP = 10**12  # per account: no call is ever cut short by funds
BATCH_RECORDS = 20_000  # journal records per transaction while building
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
WINDOW_MESSAGES = 32  # per stream; the server reads at most 64 unanswered messages ahead
SCHEDULER_TICK_SECONDS = 0.002
RENEW_MARGIN_SECONDS = 5  # a call renews G - 5 s after its last grant
START_TIMEOUT_SECONDS = 3_600.0
PROJECTOR_READY = "projector: rows stored through seq"  # its log line once its state is built
STOP_TIMEOUT_SECONDS = 120.0  # SIGTERM: the drain, then the last flush
ADMIN_CONCURRENCY = 32
ERRORS_KEPT = 5
RESERVE, RENEW, RELEASE = 0, 1, 2
KINDS = ("reserve", "renew", "release")
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


def account_id(n: int) -> str:
    return f"acc-{n}"


# ------------------------------------------------------------------ building


def _build_commands(accounts: int) -> Iterator[Command]:
    rate = Rate(
        "", PRICE_PER_MINUTE_MICROS, FIRST_INCREMENT_SECONDS, NEXT_INCREMENT_SECONDS, CONNECT_FEE
    )
    yield PutTariff(Tariff(TARIFF_ID, "VND", (rate,)))
    for n in range(accounts):
        yield CreateAccount(account_id(n), "VND", TARIFF_ID, 0, 0)
    for n in range(accounts):
        yield TopUpCommand(account_id(n), TOP_UP, "seed", "")


def build(url: str, accounts: int, snapshot_root: Path) -> None:
    """Runs in a child process: the journal (and a snapshot at its end) of `accounts`
    accounts, each created and topped up, through the real state machine and journal.
    Records carry the wall-clock time of the build (a millisecond per 1,000 records), so
    the top-ups' idempotency keys are inside the 24 h window when the server starts."""
    started = time.perf_counter()
    journal = Journal(url)
    if journal.last_seq():
        raise SystemExit(f"{url} already holds a journal; use --reuse or a new --workdir")
    machine = StateMachine()
    base_ms = wall_clock_ms()
    batch: list[JournalRecord] = []
    seq = 0
    for n, command in enumerate(_build_commands(accounts)):
        at_ms = base_ms + n // 1_000
        step = machine.apply(command, at_ms)
        if not step.changed:
            raise SystemExit(f"command {n} changed nothing: {command}")
        seq += 1
        batch.append(JournalRecord(seq, at_ms, command))
        if len(batch) == BATCH_RECORDS:
            journal.append(batch)
            batch = []
    journal.append(batch)
    built_seconds = time.perf_counter() - started
    directory = snapshot_root / journal.journal_id
    journal.close()
    # The history and events, as the projector of a server that wrote this journal would
    # have stored them: else the server's own projector would derive them all after the
    # start, and the checks' history reads (and the measures) would wait for it.
    with Journal(url, durable=False) as projecting:
        projection = Projector(projecting, StateMachine(), 0)
        while projection.step():
            pass
    projected_seconds = time.perf_counter() - started - built_seconds
    write_snapshot(directory, seq, machine.image(), machine.now_ms)
    print(json.dumps({
        "records": seq,
        "build_seconds": round(built_seconds, 1),
        "projection_seconds": round(projected_seconds, 1),
        "snapshot_seconds": round(
            time.perf_counter() - started - built_seconds - projected_seconds, 1
        ),
    }))  # fmt: skip


def build_in_child(url: str, accounts: int, snapshot_root: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--build", url, "--build-accounts", str(accounts),
         "--build-snapshots", str(snapshot_root)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# ------------------------------------------------------------------ the server


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB; (0, 0) once it is gone."""
    rss = hwm = 0.0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
    return rss, hwm


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path
    start_seconds: float

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """One scrape: each sample without labels, by name (a histogram's _sum, _count)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=60) as response:
            text: str = response.read().decode()
        return {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if not sample.labels
        }


@contextlib.contextmanager
def serving(url: str, snapshot_root: Path, grant_seconds: int, log: Path) -> Iterator[Server]:
    """`callcredit-server` on the journal, default settings but --grant-seconds; INFO logs
    to a file (start-up and snapshot lines). Stopped with SIGTERM (drain, then exit)."""
    metrics_port = free_port()
    args = ["--listen", "127.0.0.1:0", "--database-url", url, "--snapshot-dir", str(snapshot_root),
            "--grant-seconds", str(grant_seconds),
            "--metrics-listen", f"127.0.0.1:{metrics_port}", "--log-level", "INFO"]  # fmt: skip
    started = time.perf_counter()
    with launch.serving(
        args,
        log,
        env={
            "PYTHONPATH": os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(REPO))))
        },
        cwd=REPO,
        start_timeout_seconds=START_TIMEOUT_SECONDS,
        stop_timeout_seconds=STOP_TIMEOUT_SECONDS,
    ) as server:
        took = time.perf_counter() - started
        yield Server(server.process, server.port, metrics_port, log, took)


# ------------------------------------------------------------------ the dialer side


@dataclass
class Counts:
    ok: list[int] = field(default_factory=lambda: [0, 0, 0])
    errors: list[int] = field(default_factory=lambda: [0, 0, 0])
    error_samples: list[str] = field(default_factory=list)
    cost_mismatches: int = 0
    final_grants: int = 0


class Dialer:
    """`calls` calls over `streams` raw Control streams; each call has at most one
    operation outstanding. Call i is on stream i % streams."""

    def __init__(self, calls: int, accounts: int, tag: str, streams: int, batch: int) -> None:
        self.calls = calls
        self.call_ids = [f"{tag}-{i}" for i in range(calls)]
        self.account_of = [
            (i * accounts // calls) if calls <= accounts else i % accounts for i in range(calls)
        ]
        self.request_ids = [str(i) for i in range(calls)]
        self.streams = streams
        self.batch = batch
        self.kind = [RESERVE] * calls
        self.sequence = [0] * calls
        self.used = [0] * calls
        self.allowed = [0] * calls
        self.charged = [0] * calls
        self.answered_at = [0.0] * calls  # when the reserve was answered (talk starts)
        self.due = [0.0] * calls  # when the outstanding operation became due
        self.busy = [False] * calls
        self.deferred: dict[int, float] = {}  # renewals due while the call was busy
        self.message_of = [0] * calls
        self.outstanding = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.counts = Counts()
        self.renew_latency = Histogram()
        self.renewed: list[tuple[float, float]] = []  # (due, latency) of each renewal
        self.phase_latency = Histogram()
        self.lanes: list[Lane[int]] = []
        self._tasks: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def connected(self, target: str) -> AsyncIterator[Dialer]:
        async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as chan:
            stub = credit_control_pb2_grpc.CreditControlServiceStub(chan)
            self.lanes = [
                Lane(
                    stub.Control(wait_for_ready=True), window=WINDOW_MESSAGES, max_batch=self.batch
                )
                for _ in range(self.streams)
            ]
            self._tasks = [asyncio.create_task(lane.send(self._operation)) for lane in self.lanes]
            self._tasks += [asyncio.create_task(self._receive(lane)) for lane in self.lanes]
            try:
                yield self
            finally:
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- operations

    def _operation(self, i: int, message: int) -> credit_control_pb2.Operation:
        """Call i's next operation, sent in `message`."""
        self.message_of[i] = message
        kind = self.kind[i]
        if kind == RESERVE:
            return credit_control_pb2.Operation(
                request_id=self.request_ids[i],
                reserve=credit_control_pb2.ReserveRequest(
                    call_id=self.call_ids[i],
                    account_id=account_id(self.account_of[i]),
                    destination=DESTINATION,
                    requested_seconds=0,  # the server's --grant-seconds
                ),
            )
        # used_seconds: talk time so far, never beyond the grant (no overrun)
        used = min(int(time.perf_counter() - self.answered_at[i]), self.allowed[i])
        self.used[i] = max(used, self.used[i])
        if kind == RENEW:
            self.sequence[i] += 1
            return credit_control_pb2.Operation(
                request_id=self.request_ids[i],
                renew=credit_control_pb2.RenewRequest(
                    call_id=self.call_ids[i],
                    sequence=self.sequence[i],
                    used_seconds=self.used[i],
                    requested_seconds=0,
                ),
            )
        return credit_control_pb2.Operation(
            request_id=self.request_ids[i],
            release=credit_control_pb2.ReleaseRequest(
                call_id=self.call_ids[i], used_seconds=self.used[i]
            ),
        )

    def submit(self, i: int, kind: int, due: float) -> None:
        if self.busy[i]:
            if kind == RENEW:
                self.deferred.setdefault(i, due)
                return
            raise RuntimeError(f"call {i} is busy")
        self.busy[i] = True
        self.kind[i] = kind
        self.due[i] = due
        self.outstanding += 1
        self.idle.clear()
        self.lanes[i % self.streams].push(i)

    def _answered(self, i: int, outcome: credit_control_pb2.Outcome, now: float) -> None:
        kind = self.kind[i]
        result = outcome.WhichOneof("result")
        counts = self.counts
        if result == "error":
            counts.errors[kind] += 1
            if len(counts.error_samples) < ERRORS_KEPT:
                error = CallcreditError.from_status(outcome.error)
                counts.error_samples.append(f"{KINDS[kind]} {self.call_ids[i]}: {error}")
        elif kind == RESERVE:
            self.answered_at[i] = now
            self.allowed[i] = outcome.reserve.grant.allowed_seconds
            counts.final_grants += outcome.reserve.grant.final
            counts.ok[RESERVE] += 1
        elif kind == RENEW:
            grant = outcome.renew.grant
            self.allowed[i] = grant.allowed_seconds
            counts.final_grants += grant.final
            counts.ok[RENEW] += 1
            self.renew_latency.add(now - self.due[i])
            self.renewed.append((self.due[i], now - self.due[i]))
        else:
            charged = outcome.release.charged
            self.charged[i] = charged
            counts.ok[RELEASE] += 1
            if charged != cost(self.used[i]):
                counts.cost_mismatches += 1
        self.phase_latency.add(now - self.due[i])
        self.busy[i] = False
        self.outstanding -= 1
        due = self.deferred.pop(i, None)
        if due is not None:
            self.submit(i, RENEW, due)
        elif self.outstanding == 0:
            self.idle.set()

    async def _receive(self, lane: Lane[int]) -> None:
        while True:
            response = await lane.call.read()
            if response is grpc.aio.EOF:
                raise RuntimeError("a Control stream ended")
            assert isinstance(response, credit_control_pb2.ControlResponse)
            now = time.perf_counter()
            for outcome in response.outcomes:
                i = int(outcome.request_id)
                lane.answered(self.message_of[i])
                self._answered(i, outcome, now)

    async def wait_idle(self) -> None:
        failed = [t for t in self._tasks if t.done()]
        if failed:
            failed[0].result()
        waiter = asyncio.create_task(self.idle.wait())
        await asyncio.wait([waiter, *self._tasks], return_when=asyncio.FIRST_COMPLETED)
        if not waiter.done():
            waiter.cancel()
            for task in self._tasks:
                if task.done():
                    task.result()
            raise RuntimeError("a Control stream task ended")

    # -- phases

    async def all_once(self, kind: int) -> float:
        """Send `kind` for every call, as fast as the streams go; the seconds it took."""
        self.phase_latency = Histogram()
        started = time.perf_counter()
        for i in range(self.calls):
            self.submit(i, kind, started)
        await self.wait_idle()
        return time.perf_counter() - started

    async def steady(self, rate: float, seconds: float) -> tuple[int, float]:
        """Renew calls round-robin at `rate` per second for `seconds`; renewal j is due at
        t0 + j / rate. Returns (renewals, seconds until the last was answered)."""
        total = int(rate * seconds)
        started = time.perf_counter()
        j = 0
        while j < total:
            now = time.perf_counter()
            target = min(total, int((now - started) * rate) + 1)
            while j < target:
                self.submit(j % self.calls, RENEW, started + j / rate)
                j += 1
            await asyncio.sleep(SCHEDULER_TICK_SECONDS)
        await self.wait_idle()
        return total, time.perf_counter() - started


# ------------------------------------------------------------------ checks


async def read_accounts(
    target: str, accounts: Sequence[int]
) -> dict[int, tuple[admin_pb2.Account, list[admin_pb2.LedgerEntry]]]:
    """Each account and its whole ledger (GetAccount and ListEntries answer only what is
    durable)."""
    found: dict[int, tuple[admin_pb2.Account, list[admin_pb2.LedgerEntry]]] = {}
    queue = collections.deque(accounts)
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as chan:
        admin = admin_pb2_grpc.AdminServiceStub(chan)

        async def worker() -> None:
            while queue:
                n = queue.popleft()
                name = account_id(n)
                got = await admin.GetAccount(admin_pb2.GetAccountRequest(account_id=name))
                entries: list[admin_pb2.LedgerEntry] = []
                while True:
                    after = entries[-1].entry_id if entries else 0
                    page = await admin.ListEntries(
                        admin_pb2.ListEntriesRequest(
                            account_id=name, after_entry_id=after, limit=1000
                        )
                    )
                    entries.extend(page.entries)
                    if len(page.entries) < 1000:
                        break
                found[n] = (got.account, entries)

        await asyncio.gather(*(worker() for _ in range(ADMIN_CONCURRENCY)))
    return found


def sample_accounts(dialer: Dialer, accounts: int, size: int) -> list[int]:
    """Up to `size` accounts that carry calls, spread over them, plus a few that carry none."""
    with_calls = sorted(set(dialer.account_of))
    step = max(1, len(with_calls) // max(size, 1))
    sample = with_calls[::step][:size]
    without = sorted(set(range(min(accounts, 50))) - set(with_calls))[:5]
    return sample + without


def check_accounts(
    dialer: Dialer,
    before: dict[int, tuple[admin_pb2.Account, list[admin_pb2.LedgerEntry]]],
    after: dict[int, tuple[admin_pb2.Account, list[admin_pb2.LedgerEntry]]],
) -> list[str]:
    charged: collections.Counter[int] = collections.Counter()
    charges: collections.Counter[int] = collections.Counter()  # releases that charged
    for i, n in enumerate(dialer.account_of):
        charged[n] += dialer.charged[i]
        charges[n] += dialer.charged[i] > 0
    problems: list[str] = []
    for n, (account, entries) in sorted(after.items()):
        old_account, old_entries = before[n]
        name = account_id(n)
        if account.balance != old_account.balance - charged[n]:
            problems.append(
                f"{name}: balance {account.balance}, expected "
                f"{old_account.balance} - {charged[n]} charged"
            )
        if sum(e.amount for e in entries) != account.balance:
            problems.append(f"{name}: ledger entries do not sum to the balance")
        new = entries[len(old_entries) :]
        if len(new) != charges[n] or any(e.kind != admin_pb2.ENTRY_KIND_CALL_CHARGE for e in new):
            problems.append(f"{name}: {len(new)} new ledger entries for {charges[n]} charges")
        if sum(e.amount for e in new) != -charged[n]:
            problems.append(f"{name}: new entries sum to {sum(e.amount for e in new)}")
        if account.reserved or account.active_calls:
            problems.append(
                f"{name}: reserved {account.reserved}, active_calls {account.active_calls}"
            )
    return problems


def verify_journal(url: str, snapshot_root: Path) -> tuple[bool, float, str]:
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "callcredit_server.cli", "verify", "--database-url", url,
         "--snapshot-dir", str(snapshot_root)],
        cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    text = (out.stdout + out.stderr).strip().splitlines()
    return out.returncode == 0, time.perf_counter() - started, text[-1] if text else ""


def _commits(before: dict[str, float], after: dict[str, float]) -> tuple[float, float]:
    """(seconds, commits) of the journal's commits between two scrapes."""
    name = "callcredit_journal_commit_duration_seconds"
    seconds, commits = (
        after.get(name + s, 0.0) - before.get(name + s, 0.0) for s in ("_sum", "_count")
    )
    return seconds, commits


# ------------------------------------------------------------------ the snapshot's share

# The projector forks the snapshot child; before 2026-12-07 the writer did (either is read,
# so that an older server can be measured with this script).
_LOG_TIME = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO callcredit_server\.(?:writer|projector): "
_CHILD_STARTED = re.compile(
    _LOG_TIME + r"snapshot at seq (\d+): child \d+ started, (?:writer|projector) paused ([\d.]+) ms"
)
_CHILD_DONE = re.compile(_LOG_TIME + r"snapshot at seq (\d+) (?:written|dropped|failed)")


def _log_seconds(stamp: str) -> float:
    """A server log line's time (local, ms) as this process's perf_counter()."""
    wall = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return wall - time.time() + time.perf_counter()


def snapshot_windows(log_text: str) -> list[tuple[float, float]]:
    """(from, to) in perf_counter() seconds of each snapshot: the fork's pause, then the
    child's run until its parent reaped it (a child still running: until now)."""
    done = {m.group(2): _log_seconds(m.group(1)) for m in _CHILD_DONE.finditer(log_text)}
    return [
        (
            _log_seconds(m.group(1)) - float(m.group(3)) / 1e3,
            done.get(m.group(2), time.perf_counter()),
        )
        for m in _CHILD_STARTED.finditer(log_text)
    ]


def split_by_snapshots(
    result: Result, renewed: list[tuple[float, float]], windows: list[tuple[float, float]]
) -> None:
    """Renew p99 of the renewals due while a snapshot was taken, and of the others: what
    the snapshot child costs the tail, under the same background load in the same run."""
    during, other = Histogram(), Histogram()
    first = renewed[0][0] if renewed else 0.0
    for due, latency in renewed:
        hit = any(start <= due <= end for start, end in windows)
        (during if hit else other).add(latency)
    result.renewals_snapshot = during.total
    result.p99_snapshot = during.quantile_ms(0.99) if during.total else 0.0
    result.p99_other = other.quantile_ms(0.99) if other.total else 0.0
    result.snapshot_child_seconds = sum(
        max(0.0, end - max(start, first)) for start, end in windows if end >= first
    )


# ------------------------------------------------------------------ one state


@dataclass
class Result:
    name: str
    accounts: int
    calls: int
    records: int = 0
    build_seconds: float = 0.0
    start_seconds: float = 0.0
    projector_ready_seconds: float = 0.0
    recovery: str = ""
    rss_start: float = 0.0
    rss_open: float = 0.0
    rss_steady_max: float = 0.0
    rss_end: float = 0.0
    hwm: float = 0.0
    open_seconds: float = 0.0
    renew_every_seconds: float = 0.0
    renewals: int = 0
    renewals_per_second: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    p999: float = 0.0
    max_ms: float = 0.0
    ops_per_message: float = 0.0
    server_cpu: float = 0.0
    server_us_per_renewal: float = 0.0
    client_cpu: float = 0.0
    machine_cpu: float = 0.0
    snapshots_steady: int = 0
    snapshot_lines: list[str] = field(default_factory=list)
    snapshot_child_seconds: float = 0.0  # steady phase: how long a snapshot child ran
    p99_snapshot: float = 0.0  # renewals due while a snapshot child ran (or the fork)
    p99_other: float = 0.0  # the rest
    renewals_snapshot: int = 0
    commit_ms: float = 0.0  # steady phase: mean journal commit (the server's histogram)
    commits_per_second: float = 0.0
    release_seconds: float = 0.0
    scrape_ms: float = 0.0
    scrapes_steady: int = 0
    problems: list[str] = field(default_factory=list)
    verified: str = "not run"


async def run_state(
    result: Result, url: str, snapshot_root: Path, log: Path, args: argparse.Namespace, rate: float
) -> None:
    def say(text: str) -> None:
        if not args.quiet:
            print(text, flush=True)

    tag = f"{result.name}{wall_clock_ms() % 10**10}"
    with serving(url, snapshot_root, args.grant_seconds, log) as server:
        pid = server.process.pid
        result.start_seconds = server.start_seconds
        found = re.search(r"recovered from .*", server.log_text())
        result.recovery = found.group(0) if found else ""
        result.rss_start, result.hwm = memory_mib(pid)
        say(
            f"[{result.name}] started in {result.start_seconds:.1f} s, "
            f"RSS {result.rss_start:.0f} MiB (HWM {result.hwm:.0f}): {result.recovery}"
        )
        # The start's other work first: the projector child rebuilds its own state (from
        # the same snapshot, ~10 s of CPU at 1M accounts) beside the writer. Measured
        # during the steady phase, it was the start's cost, not the state's or a snapshot's.
        waited = time.perf_counter()
        while PROJECTOR_READY not in server.log_text():
            if time.perf_counter() - waited > START_TIMEOUT_SECONDS:
                raise SystemExit(f"the projector did not start within {START_TIMEOUT_SECONDS} s")
            await asyncio.sleep(0.2)
        result.projector_ready_seconds = result.start_seconds + time.perf_counter() - waited
        say(f"[{result.name}] projector ready {result.projector_ready_seconds:.1f} s after start")
        dialer = Dialer(result.calls, result.accounts, tag, args.streams, args.batch)
        sample = sample_accounts(dialer, result.accounts, args.check_accounts)
        before = await read_accounts(server.target, sample)
        async with dialer.connected(server.target):
            result.open_seconds = await dialer.all_once(RESERVE)
            result.rss_open = memory_mib(pid)[0]
            say(
                f"[{result.name}] opened {dialer.counts.ok[RESERVE]:,} calls in "
                f"{result.open_seconds:.1f} s, RSS {result.rss_open:.0f} MiB"
            )

            # the steady phase, with the server's memory sampled every second
            log_before = len(server.log_text())
            metrics0 = server.metrics()
            cpu0 = process_cpu_seconds([pid]), self_cpu_seconds(), machine_cpu_seconds()
            sent0 = sum(lane.messages for lane in dialer.lanes)
            sampling = True

            async def sample_memory() -> None:
                while sampling:
                    result.rss_steady_max = max(result.rss_steady_max, memory_mib(pid)[0])
                    await asyncio.sleep(1.0)

            async def scrape() -> None:  # as Prometheus would, every --scrape-seconds
                while sampling and args.scrape_seconds:
                    await asyncio.sleep(args.scrape_seconds)
                    if sampling:
                        await asyncio.to_thread(server.metrics)
                        result.scrapes_steady += 1

            sampler = asyncio.create_task(sample_memory())
            scraper = asyncio.create_task(scrape())
            renewals, took = await dialer.steady(rate, args.seconds)
            sampling = False
            scraper.cancel()
            await asyncio.gather(sampler, scraper, return_exceptions=True)
            commit_seconds, commits = _commits(metrics0, server.metrics())
            result.commit_ms = commit_seconds / max(commits, 1) * 1000
            result.commits_per_second = commits / took
            cpu1 = process_cpu_seconds([pid]), self_cpu_seconds(), machine_cpu_seconds()
            result.renewals = renewals
            messages = sum(lane.messages for lane in dialer.lanes) - sent0
            result.ops_per_message = renewals / max(messages, 1)
            result.renewals_per_second = renewals / took
            result.renew_every_seconds = result.calls / rate
            histogram = dialer.renew_latency
            result.p50 = histogram.quantile_ms(0.5)
            result.p99 = histogram.quantile_ms(0.99)
            result.p999 = histogram.quantile_ms(0.999)
            result.max_ms = histogram.quantile_ms(1.0)
            result.server_cpu = (cpu1[0] - cpu0[0]) / took
            result.server_us_per_renewal = (cpu1[0] - cpu0[0]) / max(renewals, 1) * 1e6
            result.client_cpu = (cpu1[1] - cpu0[1]) / took
            busy = cpu1[2][0] - cpu0[2][0]
            total = cpu1[2][1] - cpu0[2][1]
            result.machine_cpu = busy / total * (os.cpu_count() or 1) if total else 0.0
            steady_log = server.log_text()[log_before:]
            result.snapshot_lines = re.findall(r"snapshot at seq \d+: .*", steady_log)
            result.snapshots_steady = len(result.snapshot_lines)
            split_by_snapshots(result, dialer.renewed, snapshot_windows(server.log_text()))
            say(
                f"[{result.name}] {renewals:,} renewals in {took:.1f} s: p50 {result.p50:.2f} ms, "
                f"p99 {result.p99:.2f} ms, max {result.max_ms:.2f} ms; server CPU "
                f"{result.server_cpu:.0%}, RSS max {result.rss_steady_max:.0f} MiB"
            )

            result.release_seconds = await dialer.all_once(RELEASE)
        counts = dialer.counts
        for kind in (RESERVE, RENEW, RELEASE):
            if counts.errors[kind]:
                result.problems.append(f"{counts.errors[kind]} {KINDS[kind]} errors")
        if counts.error_samples:
            result.problems.append(f"e.g. {counts.error_samples}")
        for kind, expected in ((RESERVE, result.calls), (RELEASE, result.calls)):
            if counts.ok[kind] != expected:
                result.problems.append(f"{counts.ok[kind]} of {expected} {KINDS[kind]}s ok")
        if counts.ok[RENEW] != result.renewals:
            result.problems.append(f"{counts.ok[RENEW]} of {result.renewals} renewals ok")
        if counts.cost_mismatches:
            result.problems.append(f"{counts.cost_mismatches} releases charged != cost(used)")
        if counts.final_grants:
            result.problems.append(f"{counts.final_grants} grants were final (cut short)")
        scraped = time.perf_counter()
        gauges = server.metrics()  # Writer.gauges() runs on the server's event loop
        result.scrape_ms = (time.perf_counter() - scraped) * 1000
        if gauges.get("callcredit_open_calls") != 0:
            result.problems.append(f"open calls at the end: {gauges.get('callcredit_open_calls')}")
        after = await read_accounts(server.target, sample)
        result.problems += check_accounts(dialer, before, after)
        result.rss_end, result.hwm = memory_mib(pid)
    if "Traceback" in server.log_text():
        result.problems.append(f"a traceback in {log}")


# ------------------------------------------------------------------ report


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(results: Sequence[Result], args: argparse.Namespace) -> str:
    lines = [
        _row(["", *(f"{r.accounts:,} accounts, {r.calls:,} calls" for r in results)]),
        _row(["---", *("---:" for _ in results)]),
    ]
    rows: list[tuple[str, list[str]]] = [
        (
            "journal built (records, s)",
            [f"{r.records:,} in {r.build_seconds:.0f} s" for r in results],
        ),
        ("server start (to listening)", [f"{r.start_seconds:.1f} s" for r in results]),
        (
            "its projector ready (after start)",
            [f"{r.projector_ready_seconds:.1f} s" for r in results],
        ),
        ("RSS after start", [f"{r.rss_start:,.0f} MiB" for r in results]),
        (
            "open all calls",
            [
                f"{r.open_seconds:.1f} s ({r.calls / max(r.open_seconds, 1e-9):,.0f}/s)"
                for r in results
            ],
        ),
        ("RSS with the calls open", [f"{r.rss_open:,.0f} MiB" for r in results]),
        ("each call renews every", [f"{r.renew_every_seconds:.2f} s" for r in results]),
        ("renewals (per s)", [f"{r.renewals:,} ({r.renewals_per_second:,.0f}/s)" for r in results]),
        ("operations per message (steady)", [f"{r.ops_per_message:.1f}" for r in results]),
        ("renew p50", [f"{r.p50:.2f} ms" for r in results]),
        ("renew p99", [f"{r.p99:.2f} ms" for r in results]),
        ("renew p99.9", [f"{r.p999:.2f} ms" for r in results]),
        ("renew max", [f"{r.max_ms:.2f} ms" for r in results]),
        ("server CPU (steady)", [f"{r.server_cpu:.0%}" for r in results]),
        ("server CPU per renewal", [f"{r.server_us_per_renewal:.0f} µs" for r in results]),
        (
            "client CPU / machine CPU",
            [f"{r.client_cpu:.0%} / {r.machine_cpu:.0%}" for r in results],
        ),
        (
            "journal commits (steady): mean, per s",
            [f"{r.commit_ms:.2f} ms, {r.commits_per_second:,.0f}/s" for r in results],
        ),
        ("snapshots during steady", [str(r.snapshots_steady) for r in results]),
        (
            "snapshot child running (steady)",
            [f"{r.snapshot_child_seconds:.1f} s" for r in results],
        ),
        (
            "renew p99 with a snapshot running / not (renewals)",
            [
                f"{r.p99_snapshot:.2f} / {r.p99_other:.2f} ms ({r.renewals_snapshot:,})"
                for r in results
            ],
        ),
        ("RSS max during steady", [f"{r.rss_steady_max:,.0f} MiB" for r in results]),
        (
            "RSS at the end / peak (VmHWM)",
            [f"{r.rss_end:,.0f} / {r.hwm:,.0f} MiB" for r in results],
        ),
        ("release all calls", [f"{r.release_seconds:.1f} s" for r in results]),
        ("one /metrics scrape", [f"{r.scrape_ms:.0f} ms" for r in results]),
        ("/metrics scrapes during steady", [str(r.scrapes_steady) for r in results]),
        ("checks", ["ok" if not r.problems else "; ".join(r.problems) for r in results]),
        ("callcredit-server verify", [r.verified for r in results]),
    ]
    lines += [_row([name, *cells]) for name, cells in rows]
    if len(results) == 2 and results[0].p99:
        small, big = results
        per_renewal = big.server_us_per_renewal / max(small.server_us_per_renewal, 1e-9)
        lines.append("")
        lines.append(
            f"renew p99 big / small: {big.p99:.2f} / {small.p99:.2f} ms = "
            f"{big.p99 / small.p99:.2f}x (p50 {big.p50 / max(small.p50, 1e-9):.2f}x, "
            f"server CPU per renewal {per_renewal:.2f}x)"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace, workdir: Path) -> list[Result]:
    rate = args.calls / (args.grant_seconds - RENEW_MARGIN_SECONDS)
    states = [("small", args.small_accounts, args.small_calls), ("big", args.accounts, args.calls)]
    if args.only:
        states = [s for s in states if s[0] == args.only]
    prepared: list[tuple[Result, str, Path]] = []
    for name, accounts, calls in states:
        directory = workdir / name
        directory.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{directory / 'journal.db'}"
        snapshots = directory / "snapshots"
        result = Result(name, accounts, calls)
        if args.reuse and (directory / "journal.db").exists():
            result.build_seconds = 0.0
        else:
            for stale in directory.glob("journal.db*"):
                stale.unlink()
            built = build_in_child(url, accounts, snapshots)
            result.build_seconds = sum(
                built[k] for k in ("build_seconds", "projection_seconds", "snapshot_seconds")
            )
            if not args.quiet:
                print(
                    f"[{name}] built {int(built['records']):,} records in "
                    f"{built['build_seconds']:.0f} s, projected in "
                    f"{built['projection_seconds']:.0f} s, "
                    f"snapshot {built['snapshot_seconds']:.0f} s"
                )
        prepared.append((result, url, snapshots))
    results = []
    for result, url, snapshots in prepared:
        if args.start_from == "journal":  # a folder of no snapshots: replay the whole journal
            snapshots = snapshots.with_name(f"snapshots-{time.time_ns()}")
        journal = Journal(url)
        records = journal.last_seq()
        journal.close()
        await run_state(result, url, snapshots, workdir / result.name / "server.log", args, rate)
        result.records = records
        if result.name == "small" or args.verify:
            ok, took, last = verify_journal(url, snapshots)
            result.verified = f"{'ok' if ok else 'FAILED'} in {took:.0f} s"
            if not ok:
                result.problems.append(f"verify: {last}")
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--small-accounts", type=int, default=10_000)
    parser.add_argument("--small-calls", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=90.0, help="steady phase, each state")
    parser.add_argument("--grant-seconds", type=int, default=60)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--batch", type=int, default=100, help="operations per message, at most")
    parser.add_argument("--check-accounts", type=int, default=1_000, help="accounts sampled")
    parser.add_argument(
        "--scrape-seconds",
        type=float,
        default=15.0,
        help="scrape /metrics this often during the steady phase, as Prometheus would (0: not)",
    )
    parser.add_argument("--workdir", default="bench-scale")
    parser.add_argument(
        "--start-from",
        choices=("snapshot", "journal"),
        default="snapshot",
        help="journal: serve with an empty snapshot folder, so the start replays everything",
    )
    parser.add_argument("--reuse", action="store_true", help="serve the journals already built")
    parser.add_argument("--only", choices=("small", "big"), default=None)
    parser.add_argument("--verify", action="store_true", help="verify the big journal too")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--build", default="", help=argparse.SUPPRESS)
    parser.add_argument("--build-accounts", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--build-snapshots", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.build, args.build_accounts, Path(args.build_snapshots))
        return
    if args.grant_seconds <= RENEW_MARGIN_SECONDS:
        parser.error(f"--grant-seconds must exceed {RENEW_MARGIN_SECONDS}")
    results = asyncio.run(run(args, Path(args.workdir).resolve()))
    print(table(results, args))
    if any(r.problems for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
