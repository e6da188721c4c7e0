"""Rebuilding the state on start, and verifying a journal without serving it.

Start = the newest usable snapshot + the journal records after it. A snapshot is
usable if the journal reaches its seq and has not been pruned beyond it; a
damaged one is skipped for the one before it (or a full replay) with a warning.
Snapshots beyond the journal's end are deleted first: they hold records that a
crash lost, and the journal is about to reuse those seqs.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from callcredit_server.core import (
    CallRecord,
    CallState,
    Command,
    InvariantViolation,
    StateMachine,
    Step,
)
from callcredit_server.journal import Journal, JournalError
from callcredit_server.snapshot import (
    SnapshotError,
    discard_beyond,
    list_snapshots,
    load_snapshot,
    read_snapshot,
)

log = logging.getLogger(__name__)

AUDIT_EVERY_RECORDS = 100_000  # verify: full audit() this often during the replay
GC_THRESHOLDS = (50_000, 20, 10)  # the collector's generations (defaults: 700, 10, 10)


def settle_heap() -> None:
    """For a process that holds a recovered state until it exits (the server, the
    projector): call once the state is built.

    The state (millions of objects at scale) is moved out of the collector's
    generations, so that the full collections request traffic triggers do not rescan
    it. And since every operation allocates short-lived objects (commands, records,
    messages), collections run less often: with the default thresholds the
    collector's pauses were the p99 of a steady 16,000 ops/s (74 ms -> 15 ms;
    scripts/bench_latency.py), and they cost the projector a quarter of its CPU.
    Not for a test process that starts and stops many servers: their frozen cycles
    would never be collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@dataclass(slots=True)
class Recovered:
    machine: StateMachine
    snapshot_seq: int  # 0: replayed from the first record
    replayed: int  # journal records applied after the snapshot
    seconds: float


def apply_record(machine: StateMachine, seq: int, at_ms: int, command: Command) -> Step:
    """Apply journal record `seq` again: a start's replay, a standby's and the
    projector's tail. A record that changes nothing means memory and journal disagree."""
    step = machine.apply(command, at_ms)
    if not step.changed:
        raise InvariantViolation(f"journal record seq {seq} changed nothing on replay")
    return step


def _apply_all(
    journal: Journal,
    machine: StateMachine,
    after_seq: int,
    each: Callable[[int, StateMachine], None] | None = None,
    through_seq: int | None = None,
) -> int:
    count = 0
    for seq, at_ms, command in journal.replay(after_seq=after_seq):
        if through_seq is not None and seq > through_seq:
            break
        apply_record(machine, seq, at_ms, command)
        count += 1
        if each is not None:
            each(seq, machine)
    return count


def recover(
    journal: Journal, snapshot_dir: Path | None, through_seq: int | None = None
) -> Recovered:
    """The state as the journal (and the newest usable snapshot) says it was; with
    `through_seq`, as it was at that seq (the projector's restart: it only reads, so
    it deletes no snapshot)."""
    started = time.perf_counter()
    last_seq = journal.last_seq()
    pruned = journal.pruned_through()
    machine, snapshot_seq = StateMachine(), 0
    usable_through = last_seq if through_seq is None else min(last_seq, through_seq)
    if snapshot_dir is not None:
        if through_seq is None:
            for path in discard_beyond(snapshot_dir, last_seq):
                log.warning("deleted snapshot %s: the journal ends before it (a crash)", path)
        for found in list_snapshots(snapshot_dir):
            if found.seq > usable_through:
                continue  # past the point wanted, or written since we looked (a primary)
            if found.seq < pruned:
                break
            try:
                snapshot_seq, machine = load_snapshot(found.path)
                break
            except (SnapshotError, InvariantViolation) as exc:
                log.warning("skipping snapshot %s: %s", found.path, exc)
    if snapshot_seq < pruned:
        raise JournalError(
            f"the journal was pruned through seq {pruned} and no usable snapshot at or "
            f"after it is in {snapshot_dir}: the state cannot be rebuilt"
        )
    replayed = _apply_all(journal, machine, snapshot_seq, through_seq=through_seq)
    # A snapshot's state was audited whole as it was built (StateMachine.from_image);
    # with nothing replayed after it, auditing it again would only repeat that
    # (1.4 s at 1M accounts, a sixth of such a start).
    problems = machine.audit() if replayed or not snapshot_seq else []
    if problems:
        raise InvariantViolation("the rebuilt state is broken: " + "; ".join(problems))
    recovered = Recovered(machine, snapshot_seq, replayed, time.perf_counter() - started)
    source = f"snapshot at seq {snapshot_seq} + " if snapshot_seq else "no snapshot, "
    log.info(
        "recovered from %s%d journal records in %.2f s: %d accounts, %d calls in memory",
        source,
        replayed,
        recovered.seconds,
        len(machine.accounts),
        len(machine.calls),
    )
    return recovered


@dataclass(slots=True)
class Verification:
    records: int = 0
    snapshots_checked: int = 0
    history_checked: bool = False  # False: the projector had not reached the journal's end
    problems: list[str] = field(default_factory=list)


def verify(journal: Journal, snapshot_dir: Path | None) -> Verification:
    """Replay the whole journal without serving and check everything that must hold.

    Every record's checksum and seq (replay), that each record still changes the
    state, audit() at intervals and at the end (holds, available >= 0, money
    conserved), that every snapshot equals the state replayed to its seq, and, if the
    projector has reached the journal's end, that the history tables agree with the
    replayed state (history behind the journal is not wrong, only not there yet).
    """
    result = Verification()
    pruned = journal.pruned_through()
    snapshots = {f.seq: f.path for f in list_snapshots(snapshot_dir)} if snapshot_dir else {}
    machine = StateMachine()
    if pruned:
        usable = [seq for seq in snapshots if seq >= pruned]
        if not usable:
            result.problems.append(f"journal pruned through {pruned} and no snapshot covers it")
            return result
        start = min(usable)  # the oldest usable one: the others are checked against replay
        try:
            machine = load_snapshot(snapshots[start])[1]
        except (SnapshotError, InvariantViolation) as exc:
            result.problems.append(str(exc))
            return result
    else:
        start = 0

    def check(seq: int, state: StateMachine) -> None:
        result.records += 1
        if seq in snapshots:
            result.snapshots_checked += 1
            try:
                image = read_snapshot(snapshots[seq])[1]
            except SnapshotError as exc:
                result.problems.append(str(exc))
                return
            if _comparable(image) != _comparable(state.image()):
                result.problems.append(f"snapshot at seq {seq} differs from the replayed state")
        if result.records % AUDIT_EVERY_RECORDS == 0:
            result.problems.extend(f"after seq {seq}: {p}" for p in state.audit())

    try:
        _apply_all(journal, machine, start, check)
    except (JournalError, InvariantViolation) as exc:
        result.problems.append(str(exc))
        return result
    result.problems.extend(machine.audit())
    last_seq = journal.last_seq()
    projected = journal.projected_through()
    if projected >= last_seq:
        result.history_checked = True
        result.problems.extend(_history_problems(journal, machine))
    else:
        log.warning(
            "history not compared: projected through seq %d, the journal ends at %d",
            projected,
            last_seq,
        )
    return result


def _opening(call: CallRecord) -> tuple[object, ...]:
    """What a call's snapshots share while it is open."""
    return (
        call.call_seq,
        call.account_id,
        call.destination,
        call.rate,
        call.started_at_ms,
        call.state,
    )


def _comparable(image: dict[str, Any]) -> str:
    """An image without its clock: a snapshot's clock may be later than its last record's
    time (ticks, refusals and repeats move it without a record), which changes nothing."""
    return json.dumps({k: v for k, v in image.items() if k != "now_ms"}, sort_keys=True)


def _history_problems(journal: Journal, machine: StateMachine) -> list[str]:
    """The entries table sums to each balance; remembered calls match their rows.

    An open call's row is a snapshot of it taken while it was open: its renewals, and
    the deadline a `Takeover` restarts, stay in memory (journal.project), so only what a
    call never changes is compared. An ended call's row is its last snapshot."""
    problems = []
    for account in machine.accounts.values():
        total, after = 0, 0
        while True:
            page = journal.list_entries(account.account_id, after, 10_000)
            if not page:
                break
            total += sum(e.amount for e in page)
            after = page[-1].entry_id
        if total != account.balance:
            problems.append(
                f"{account.account_id}: entries sum to {total}, balance is {account.balance}"
            )
    for call in machine.calls.values():
        stored = journal.get_call(call.call_id)
        record = call.record()
        if stored is not None and record.state is CallState.ACTIVE:
            matches = _opening(stored) == _opening(record)
        else:
            matches = stored == record
        if not matches:
            problems.append(f"call {call.call_id}: history row differs from the replayed call")
    return problems
