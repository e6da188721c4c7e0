"""The projector's CPU per journal record: what deriving the history costs, off the writer.

Builds a SQLite (or --database-url) journal the way the writer writes it (the real state
machine with events off, `Journal.append` in group commits of `--row` records): a tariff,
`--accounts` accounts created and funded, then `--calls` call lifecycles (reserve, `--renews`
renewals, release) in waves of 500 open calls. A projector (projector.Projector, on a
state machine with events on) first takes the set-up records, untimed; then the collector
is settled as the projector child settles it, and the process CPU of projecting the call
records, step by step as the child does (`Projector.step`), is printed per record.

    python scripts/bench_projector.py                      # reserve -> release, SQLite
    python scripts/bench_projector.py --renews 2 --repeat 3
    python scripts/bench_projector.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench

Timing on a shared machine is noisy; instructions are not. Under valgrind, the
projection's instructions per record are those of a run minus those of the same run
with --build-only, for two sizes (the difference over the records between them leaves
out the set-up both share):

    valgrind --tool=cachegrind --cache-sim=no python scripts/bench_projector.py \
        --accounts 1000 --calls 4000 --repeat 1      # and --build-only; and --calls 2000

Where a record's CPU goes, `--phases`: the same steps, with the functions
`Projector.step` calls wrapped to add up their process CPU: reading and decoding the
journal (`Journal.tail`), applying with events on (`apply_record`), building the rows
(`codec.history_rows`) and storing them (the rest of `Journal.project`). The wrappers
add a call each, about 0.1 µs a record to the apply.

    python scripts/bench_projector.py --renews 2 --phases

Another version side by side: run the same command with PYTHONPATH naming its server
package's parent folder (a version without `Journal(durable=...)` or
`recovery.settle_heap` runs without them, as its projector did).
"""

from __future__ import annotations

import argparse
import functools
import gc
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from callcredit_server import core, projector, recovery
from callcredit_server import journal as journal_module
from callcredit_server.journal import Journal, JournalRecord, history_metadata, metadata

START_MS = 1_790_000_000_000
WAVE = 500  # calls open at once


def commands(accounts: int, calls: int, renews: int) -> tuple[list[core.Command], int]:
    """The journal's commands, and how many of them are the set-up."""
    out: list[core.Command] = [
        core.PutTariff(core.Tariff("t", "VND", (core.Rate("", 1_179_600_000, 6, 6, 0),)))
    ]
    for n in range(accounts):
        out += [
            core.CreateAccount(f"acc-{n}", "VND", "t", 0, 0),
            core.TopUp(f"acc-{n}", 10**13, "s", ""),
        ]
    setup = len(out)
    for wave in range(0, calls, WAVE):
        ids = [(n, f"call-{n}") for n in range(wave, min(wave + WAVE, calls))]
        for n, call_id in ids:
            out.append(
                core.Reserve(call_id, f"acc-{n * 7919 % accounts}", f"+8490{n:07d}", 0, 60, 120)
            )
        for sequence in range(1, renews + 1):
            out += [core.Renew(call_id, sequence, 25 * sequence, 0, 60, 120) for _, call_id in ids]
        out += [core.Release(call_id, 70 + n % 40) for n, call_id in ids]
    return out, setup


def build(url: str, journal_commands: list[core.Command], row: int) -> None:
    machine = core.StateMachine(events=False)
    records: list[JournalRecord] = []
    at_ms = START_MS
    for seq, command in enumerate(journal_commands, 1):
        at_ms += seq % 100 == 0  # 100 commands a millisecond: no call expires
        machine.apply(command, at_ms)
        records.append(JournalRecord(seq, at_ms, command))
    with Journal(url) as journal:
        for start in range(0, len(records), row):
            journal.append(records[start : start + row])


def projector_journal(url: str) -> Journal:
    """The journal as the projector child opens it (durable=False where it exists)."""
    if "durable" in inspect.signature(Journal).parameters:
        return Journal(url, durable=False)  # type: ignore[call-arg, unused-ignore]
    return Journal(url)


PHASES = ("read", "apply", "rows", "store")


def timed_phases() -> dict[str, float]:
    """Wrap what Projector.step calls so that each adds its process CPU to the dict
    returned ("store": Journal.project less the rows it builds)."""
    spent = dict.fromkeys(PHASES, 0.0)

    def timing(phase: str, function: Any) -> Any:
        @functools.wraps(function)
        def timed(*args: Any) -> Any:
            started = time.process_time()
            try:
                return function(*args)
            finally:
                spent[phase] += time.process_time() - started

        return timed

    wrapped = (
        (Journal, "tail", "read"),
        (projector, "apply_record", "apply"),  # as projector.py imported it
        (journal_module, "history_rows", "rows"),  # as journal.py imported it
        (Journal, "project", "store"),
    )
    for owner, name, phase in wrapped:
        setattr(owner, name, timing(phase, getattr(owner, name)))
    return spent


def measure(url: str, setup: int) -> tuple[float, int]:
    """CPU seconds to project the records after the set-up, and how many there were."""
    with projector_journal(url) as journal:
        machine = core.StateMachine()  # the set-up, untimed: what a start rebuilds
        for seq, at_ms, command in journal.replay():
            if seq > setup:
                break
            recovery.apply_record(machine, seq, at_ms, command)
        state = projector.Projector(journal, machine, setup)
        settle = getattr(recovery, "settle_heap", None)
        if settle is not None:
            settle()
        else:
            gc.collect()
        started = time.process_time()
        while state.step():
            pass
        seconds = time.process_time() - started
        if journal.projected_through() != journal.last_seq():
            raise SystemExit(f"projected through {journal.projected_through()} only")
        return seconds, state.applied_seq - setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--renews", type=int, default=0, help="renewals per call")
    parser.add_argument("--row", type=int, default=1_000, help="records per group commit")
    parser.add_argument("--repeat", type=int, default=3, help="fresh journal each time")
    parser.add_argument("--database-url", default="", help="a PostgreSQL database to use")
    parser.add_argument(
        "--build-only", action="store_true", help="build the journal, project nothing"
    )
    parser.add_argument("--phases", action="store_true", help="split each record's CPU")
    args = parser.parse_args()
    spent = timed_phases() if args.phases else {}
    journal_commands, setup = commands(args.accounts, args.calls, args.renews)
    per_record: list[float] = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory() as folder:
            url = args.database_url or f"sqlite:///{folder}/journal.db"
            if args.database_url:
                _reset(url)  # a fresh journal each time
            build(url, journal_commands, args.row)
            if args.build_only:
                continue
            before = dict(spent)
            seconds, count = measure(url, setup)
            per_record.append(seconds / count * 1e6)
            print(f"{count:,} records: {per_record[-1]:.1f} µs CPU per record", flush=True)
            if spent:
                each = {phase: (spent[phase] - before[phase]) / count * 1e6 for phase in PHASES}
                each["store"] -= each["rows"]  # project() builds the rows, then stores them
                print("  " + ", ".join(f"{phase} {each[phase]:.2f}" for phase in PHASES) + " µs")
    if args.build_only:
        return
    print(
        f"projector, {args.renews} renewals per call, rows of {args.row:,}: "
        f"best {min(per_record):.1f}, median {statistics.median(per_record):.1f} µs per record"
    )


def _reset(url: str) -> None:
    """Drop the journal's tables in a database given by URL (a PostgreSQL run)."""
    with Journal(url) as journal:
        metadata.drop_all(journal.engine)
        history_metadata.drop_all(journal.history_engine)


if __name__ == "__main__":
    main()
