"""A takeover at scale (issue 11's target): from the primary's death to the first
acknowledged operation on the new primary, with --accounts accounts and --open-calls open
calls loaded, under --lease-seconds + 2 s.

1. Builds the state into the PostgreSQL journal at --database-url (an empty database or
   schema; with --reuse, one this script built before) the way scripts/bench_recovery.py
   builds it (the real state machine and `Journal.append` in group commits: every
   account created and topped up, one open call on each of the first --open-calls
   accounts, with a day's validity), in a child process, plus a snapshot at its end
   (as a running server leaves one every 100,000 records) that the servers start from.
2. Starts two `callcredit-server --ha` on it (slot 0 first, so it is the primary), waits
   until the standby has started (recovered from the snapshot + the journal after it)
   and tailed for --settle-seconds.
3. --takeovers times: SIGKILLs the primary, and times from the kill to
   - the standby answering health `SERVING` (polled every 20 ms), and
   - the first acknowledged operation: --probes clients (`AdminClient` given both
     targets, so each finds the primary itself, with its own backoff), started at the
     kill, each sending top-ups of 1 to one account, every one retried with its key
     until acknowledged;
   and prints the new primary's own account of its takeover (the phases from the
   lease's expiry it saw to serving). Then restarts the killed server as the standby.
4. Checks the account's balance grew by exactly the acknowledged top-ups (nothing
   lost, nothing twice) and that the first and last open calls are still open.

    python scripts/ha_takeover_scale.py --workdir /tmp/ha-scale --takeovers 5 \\
        --database-url postgresql+psycopg://postgres@127.0.0.1/cc_scale
    python scripts/ha_takeover_scale.py --database-url ... --workdir /tmp/ha-scale --reuse \\
        --takeovers 5 --lease-seconds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_recovery import build

from callcredit.admin import AdminClient
from callcredit.errors import CallcreditError
from callcredit.v1 import admin_pb2
from callcredit_server import launch
from callcredit_server.clock import wall_clock_ms
from callcredit_server.journal import Journal
from callcredit_server.snapshot import write_snapshot
from loadtest.baselines.procs import free_port
from tests.ha.cluster import SERVING, health

PROBED_ACCOUNT = "acc-0"
START_TIMEOUT_SECONDS = 600.0  # a start from a 1M-account snapshot on a loaded machine
HEALTH_POLL_SECONDS = 0.02
PROBE_TIMEOUT_SECONDS = 1.0  # each attempt of a probe's top-up
TAKEOVER_LINE = re.compile(r"primary at epoch \d+ from seq \d+ in .*")


def build_in_child(url: str, accounts: int, open_calls: int, snapshot_root: Path) -> str:
    """Run this script with --build: the journal and a snapshot at its end."""
    out = subprocess.run(
        [sys.executable, __file__, "--build", url, "--accounts", str(accounts),
         "--open-calls", str(open_calls), "--workdir", str(snapshot_root)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return out.stdout.strip()


def build_state(url: str, accounts: int, open_calls: int, snapshot_root: Path) -> None:
    """The child: bench_recovery's state, its records at this wall-clock time (so the
    calls' validity and the top-ups' keys hold when the servers start), and a snapshot."""
    started = time.perf_counter()
    machine = build(url, accounts, open_calls, 0, start_ms=wall_clock_ms())
    with Journal(url) as journal:
        seq, journal_id = journal.last_seq(), journal.journal_id
    write_snapshot(snapshot_root / journal_id, seq, machine.image(), machine.now_ms)
    print(f"{seq:,} records and a snapshot in {time.perf_counter() - started:.0f} s")


@dataclass
class Slot:
    port: int
    log: Path
    server: launch.ServerProcess | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Takeover:
    serving_seconds: float
    first_ack_seconds: float
    phases: str


@dataclass
class Probes:
    """Top-ups of 1 sent through clients that follow the primary; what was acknowledged."""

    targets: list[str]
    acked: int = 0
    first_ack: float = 0.0
    acknowledged: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, count: int) -> None:
        self.acknowledged.clear()
        self.stopping = False
        self.tasks = [asyncio.create_task(self._run()) for _ in range(count)]

    async def stop(self) -> None:
        """Each probe ends once its top-up in flight is acknowledged (none is left
        applied but uncounted)."""
        self.stopping = True
        await asyncio.gather(*self.tasks)

    async def _run(self) -> None:
        async with AdminClient(self.targets, timeout_seconds=PROBE_TIMEOUT_SECONDS) as admin:
            while not self.stopping:
                key = uuid.uuid4().hex
                while True:
                    try:
                        await admin.top_up(PROBED_ACCOUNT, 1, idempotency_key=key)
                        break
                    except CallcreditError:
                        continue  # its attempts spent: the same key again
                self.acked += 1  # counted once acknowledged: the balance must hold it
                if not self.acknowledged.is_set():
                    self.first_ack = time.monotonic()
                    self.acknowledged.set()


def start(slot: Slot, url: str, snapshot_root: Path, options: argparse.Namespace) -> None:
    args = ["--listen", slot.target, "--database-url", url, "--snapshot-dir", str(snapshot_root),
            "--ha", "--lease-seconds", str(options.lease_seconds),
            "--lease-renew-seconds", str(options.lease_seconds / 4),
            "--log-level", "INFO"]  # fmt: skip
    slot.server = launch.spawn(args, slot.log)
    slot.server.wait_ready(START_TIMEOUT_SECONDS)


async def wait_serving(target: str, timeout_seconds: float) -> float:
    """Poll health until SERVING; the time.monotonic() at which it was seen."""
    deadline = time.monotonic() + timeout_seconds
    while await asyncio.to_thread(health, target) != SERVING:
        if time.monotonic() > deadline:
            raise SystemExit(f"{target} is not serving after {timeout_seconds} s")
        await asyncio.sleep(HEALTH_POLL_SECONDS)
    return time.monotonic()


async def take_over(
    primary: Slot, standby: Slot, probes: Probes, options: argparse.Namespace
) -> Takeover:
    assert primary.server is not None
    lines_before = len(TAKEOVER_LINE.findall(standby.log.read_text()))
    killed_at = time.monotonic()
    primary.server.process.send_signal(signal.SIGKILL)
    probes.start(options.probes)
    serving_at = await wait_serving(standby.target, 60 + options.lease_seconds)
    await probes.acknowledged.wait()
    first_ack = probes.first_ack
    await probes.stop()
    primary.server.process.wait()
    lines = TAKEOVER_LINE.findall(standby.log.read_text())
    return Takeover(
        serving_at - killed_at,
        first_ack - killed_at,
        lines[-1] if len(lines) > lines_before else "(no takeover line in its log)",
    )


async def run(options: argparse.Namespace, workdir: Path) -> None:
    """Serve the built journal from two --ha servers and take over --takeovers times."""
    snapshot_root = workdir / "snapshots"
    url = options.database_url
    slots = [Slot(free_port(), workdir / f"server-{n}.log") for n in range(2)]
    probes = Probes([slot.target for slot in slots])
    takeovers: list[Takeover] = []
    try:
        began = time.monotonic()
        start(slots[0], url, snapshot_root, options)
        await wait_serving(slots[0].target, START_TIMEOUT_SECONDS)
        print(f"primary serving in {time.monotonic() - began:.1f} s", flush=True)
        async with AdminClient(probes.targets) as admin:
            balance_before = (await admin.get_account(PROBED_ACCOUNT)).balance
        primary, standby = slots
        for n in range(options.takeovers):
            began = time.monotonic()
            start(standby, url, snapshot_root, options)
            await asyncio.sleep(options.settle_seconds)  # it tails every 0.1 s
            print(f"standby started in {time.monotonic() - began:.1f} s", flush=True)
            took = await take_over(primary, standby, probes, options)
            takeovers.append(took)
            print(f"takeover {n + 1}: serving {took.serving_seconds:.2f} s, first acknowledged "
                  f"operation {took.first_ack_seconds:.2f} s after the kill; "
                  f"{took.phases}", flush=True)  # fmt: skip
            primary, standby = standby, primary
        async with AdminClient(probes.targets) as admin:
            account = await admin.get_account(PROBED_ACCOUNT)
            first = await admin.get_call("call-0")
            last = await admin.get_call(f"call-{options.open_calls - 1}")
        problems = []
        if account.balance != balance_before + probes.acked:
            problems.append(
                f"balance {account.balance} != {balance_before} + {probes.acked} acknowledged"
            )
        if not (first.state == last.state == admin_pb2.CALL_STATE_ACTIVE):
            problems.append(f"open calls ended: {first.state}, {last.state}")
    finally:
        for slot in slots:
            if slot.server is not None:
                slot.server.stop(kill=True)
    serving = [t.serving_seconds for t in takeovers]
    acked = [t.first_ack_seconds for t in takeovers]
    print(json.dumps({"lease_seconds": options.lease_seconds, "takeovers": len(takeovers),
                      "serving_p50": round(statistics.median(serving), 2),
                      "serving_max": round(max(serving), 2),
                      "first_ack_p50": round(statistics.median(acked), 2),
                      "first_ack_max": round(max(acked), 2),
                      "target": options.lease_seconds + 2,
                      "acknowledged_top_ups": probes.acked,
                      "problems": problems}))  # fmt: skip
    if problems:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", default="", help="a PostgreSQL URL")
    parser.add_argument("--workdir", required=True, help="logs, and the servers' snapshots")
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--open-calls", type=int, default=100_000)
    parser.add_argument("--reuse", action="store_true", help="serve the journal built before")
    parser.add_argument("--takeovers", type=int, default=3)
    parser.add_argument("--lease-seconds", type=float, default=5.0, help="renewed every 1/4")
    parser.add_argument("--settle-seconds", type=float, default=3.0)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--build", default="", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.build:
        build_state(options.build, options.accounts, options.open_calls, Path(options.workdir))
        return
    workdir = Path(options.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with Journal(options.database_url) as journal:
        served_before = journal.last_seq() != 0
    if served_before and not options.reuse:
        raise SystemExit("the database already holds a journal: --reuse it, or give an empty one")
    if not options.reuse:
        print(build_in_child(options.database_url, options.accounts, options.open_calls,
                             workdir / "snapshots"), flush=True)  # fmt: skip
    asyncio.run(run(options, workdir))


if __name__ == "__main__":
    main()
