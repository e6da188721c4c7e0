"""Start-up and snapshot figures at scale: how long a start takes, how much memory,
and how long taking a snapshot pauses the process that forks (the projector, on a server).

Builds a journal of `--accounts` accounts (each created and topped up) and
`--open-calls` open calls, then `--renewals` renewals of those calls (to reach a
journal of a given length), by driving the real state machine and appending the
real records in group-commit batches. Then, each in a fresh process (so peak
memory is that of the start alone):

- recovery from the journal alone;
- a snapshot taken the way the server takes it (fork), timing the fork pause;
- recovery from the snapshot plus the journal after it.

    python scripts/bench_recovery.py --accounts 1000000 --open-calls 100000
    python scripts/bench_recovery.py --accounts 1000 --open-calls 1000 --renewals 10000000

The journal goes to a SQLite file in --workdir (kept, so a rerun can skip building
with --reuse). One measure alone, in this process, on what a run left:

    python scripts/bench_recovery.py --measure sqlite:///DIR/journal.db --snapshots DIR/snapshots
    python scripts/bench_recovery.py --measure sqlite:///DIR/journal.db --snapshots DIR/snapshots \
        --take-snapshot     # then the fork's pause and the snapshot child's CPU time
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from callcredit_server.core import (
    Command,
    CreateAccount,
    PutTariff,
    Rate,
    Renew,
    Reserve,
    StateMachine,
    Tariff,
    TopUp,
)
from callcredit_server.journal import Journal, JournalRecord
from callcredit_server.recovery import recover
from callcredit_server.snapshot import fork_snapshot, list_snapshots

BATCH_RECORDS = 20_000
START_MS = 1_790_000_000_000


def _commands(accounts: int, open_calls: int, renewals: int) -> list[Command]:
    rate = Rate("", 1_179_600_000, 6, 6, 0)
    out: list[Command] = [PutTariff(Tariff("t", "VND", (rate,)))]
    out += [CreateAccount(f"acc-{n}", "VND", "t", 0, 0) for n in range(accounts)]
    out += [TopUp(f"acc-{n}", 10**12, "seed", "") for n in range(accounts)]
    out += [
        Reserve(f"call-{n}", f"acc-{n % accounts}", "84901234567", 60, 60, 86_400)
        for n in range(open_calls)
    ]
    out += [
        Renew(f"call-{n % open_calls}", n // open_calls + 1, n // open_calls, 60, 60, 86_400)
        for n in range(renewals)
    ]
    return out


def build(
    url: str, accounts: int, open_calls: int, renewals: int, *, start_ms: int = START_MS
) -> StateMachine:
    journal = Journal(url)
    machine = StateMachine()
    started = time.perf_counter()
    batch: list[JournalRecord] = []
    seq = journal.last_seq()
    if seq:
        raise SystemExit(f"{url} already holds a journal; use --reuse or a new --workdir")
    commands = _commands(accounts, open_calls, renewals)
    for n, command in enumerate(commands):
        at_ms = start_ms + n // 1_000  # a millisecond per thousand records
        step = machine.apply(command, at_ms)
        if not step.changed:
            raise SystemExit(f"command {n} changed nothing: {command}")
        seq += 1
        batch.append(JournalRecord(seq, at_ms, command))
        if len(batch) == BATCH_RECORDS:
            journal.append(batch)
            batch = []
    journal.append(batch)
    journal.close()
    print(f"built {seq:,} records in {time.perf_counter() - started:.0f} s", flush=True)
    return machine


def _peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries
    ru_maxrss across exec, so a child started by a big parent would report the
    parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_recovery(url: str, snapshots: str) -> None:
    """Runs in its own process: print the start-up figures as one JSON line."""
    journal = Journal(url)
    cpu_started = time.process_time()
    recovered = recover(journal, Path(snapshots) if snapshots else None)
    cpu_recovered = time.process_time()
    # What the server does next, before it listens (cli.py): a full collection, then
    # gc.freeze(). Its cost depends on how much of the state the collector still scans.
    collect_started = time.perf_counter()
    gc.collect()
    print(json.dumps({
        "seconds": round(recovered.seconds, 2),
        # CPU time, steadier than the wall clock on a shared machine
        "cpu_seconds": round(cpu_recovered - cpu_started, 2),
        "collect_seconds": round(time.perf_counter() - collect_started, 2),
        "snapshot_seq": recovered.snapshot_seq,
        "replayed": recovered.replayed,
        "accounts": len(recovered.machine.accounts),
        "calls": len(recovered.machine.calls),
        "peak_rss_mib": round(_peak_rss_mib()),
    }))  # fmt: skip


def measure_snapshot(url: str, snapshots: str) -> None:
    """Runs in its own process: start from the snapshot, then take one the way the
    projector does (fork_snapshot) into a scratch folder; print the fork's pause and what
    the child cost (its CPU time from wait4, steadier than the wall clock) as one line."""
    journal = Journal(url)
    recovered = recover(journal, Path(snapshots))
    seq = journal.last_seq()
    journal.close()
    with tempfile.TemporaryDirectory(dir=Path(snapshots).parent) as scratch:
        started = time.perf_counter()
        pid = fork_snapshot(recovered.machine, seq, Path(scratch), recovered.machine.now_ms)
        paused = time.perf_counter() - started
        _, status, usage = os.wait4(pid, 0)
        took = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit("snapshot child failed")
    print(json.dumps({
        "fork_pause_ms": round(paused * 1e3, 1),
        "child_seconds": round(took, 2),
        "child_cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
        "child_user_seconds": round(usage.ru_utime, 2),
    }))  # fmt: skip


def _recover_in_child(url: str, snapshots: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, __file__, "--measure", url, "--snapshots", snapshots],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--open-calls", type=int, default=100_000)
    parser.add_argument("--renewals", type=int, default=0)
    parser.add_argument("--workdir", default="bench-recovery")
    parser.add_argument("--reuse", action="store_true", help="the journal is already built")
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)
    parser.add_argument("--snapshots", default="", help=argparse.SUPPRESS)
    parser.add_argument("--take-snapshot", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure and args.take_snapshot:
        measure_snapshot(args.measure, args.snapshots)
        return
    if args.measure:
        measure_recovery(args.measure, args.snapshots)
        return
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{workdir / 'journal.db'}"
    snapshots = workdir / "snapshots"
    if args.reuse:
        journal = Journal(url)
        machine = recover(journal, None).machine
        journal.close()
    else:
        machine = build(url, args.accounts, args.open_calls, args.renewals)
    without = _recover_in_child(url, "")
    print(f"start from the journal alone: {without}", flush=True)

    journal = Journal(url)
    seq = journal.last_seq()
    journal.close()
    started = time.perf_counter()
    pid = fork_snapshot(machine, seq, snapshots, machine.now_ms)
    stall_ms = (time.perf_counter() - started) * 1000
    _, status = os.waitpid(pid, 0)
    written_seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("snapshot child failed")
    (newest,) = list_snapshots(snapshots)[:1]
    print(
        f"snapshot at seq {seq:,}: parent paused {stall_ms:.1f} ms (the fork), child wrote "
        f"{newest.path.stat().st_size / 2**20:.0f} MiB in {written_seconds:.1f} s; "
        f"this process's peak RSS {_peak_rss_mib():.0f} MiB",
        flush=True,
    )
    with_snapshot = _recover_in_child(url, str(snapshots))
    print(f"start from the snapshot + journal: {with_snapshot}", flush=True)


if __name__ == "__main__":
    main()
