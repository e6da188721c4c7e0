"""The projector: the history tables and the changefeed's events, off the writer's path.

The journal is deterministic: re-applying its commands to a state machine reproduces
every step, its ledger entries, call snapshots and events included. So the primary's
writer stores its commands only (and builds no events: its state machine runs with
`events=False`); the projector, a separate process (`python -m
callcredit_server.projector`, started by `callcredit-server` as its child), tails the
journal every `POLL_SECONDS` (at most `MAX_RECORDS_PER_STEP` records per read),
applies the records to its own state machine with events on (the standby's own
`apply_record`), and stores their entries, calls and events (journal.project) with its
watermark, `projected_through`, in one transaction of its own per read. Its CPU is not
the writer's, its commits do not wait for the disk (`Journal(durable=False)`): they
can be derived again, and on SQLite they lock the history's file, not the journal's
(journal.history_url).

Snapshots are the projector's too (snapshot.py): every `--snapshot-every-records`
records it applied, it forks a child that writes its state at that seq. Its state is
the committed journal's, so a snapshot never holds a record a crash could take back,
and the writer never forks or pauses for one (a fork of a 1 GiB writer paused it and
then slowed it with copy-on-write faults while the child worked). A snapshot follows
the projection: a projector behind takes it late, and a start then replays more.

Restart: it rebuilds its state at its watermark as a start does (the newest snapshot
at or before it, then the journal: recovery.recover) and goes on from there. Writes
are idempotent and the watermark only moves forward, so a projector that redoes
records, or two at once (each server of a hot-standby pair runs one), store each
record's rows once. Nothing acknowledged, and no recovery, depends on it: if it dies or
lags, the feed lags (`callcredit_changefeed_lag_records`) and history reads wait for it
(at most service.PROJECTION_WAIT_SECONDS, then UNAVAILABLE), nothing else. A prune
never passes its watermark (journal.prune).

The child dies with the server: a server that stops kills it (at once: it may still be
starting up, and nothing is lost), and one that dies (even by SIGKILL) closes the pipe
the child read its settings from, whose end it waits for, and exits at once. The server
restarts a child that exited, after RESTART_SECONDS.

The server's side (`FeedPoller`): one task per server reads the watermark every
`FEED_POLL_SECONDS` (Changefeed.projected_seq: history reads wait on it) and, while
streams follow, the events up to it, and hands them to the changefeed (changefeed.py)
once for every follower.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import orjson

from callcredit_server import logs
from callcredit_server.changefeed import END_OF_RECORD, Changefeed, FeedEvent
from callcredit_server.core import InvariantViolation, StateMachine
from callcredit_server.journal import Journal, JournalError, Projected
from callcredit_server.recovery import apply_record, recover, settle_heap
from callcredit_server.snapshot import discard_older, fork_snapshot

# By name: the child runs this module as __main__, and its lines must say whose they are.
log = logging.getLogger("callcredit_server.projector")

POLL_SECONDS = 0.05  # the projector reads new journal records this often (at once while behind)
MAX_RECORDS_PER_STEP = 2_000  # records applied and stored per transaction
ERROR_PAUSE_SECONDS = 1.0  # after a database error, the projector waits this long
FEED_POLL_SECONDS = 0.05  # the server reads the watermark (and new events) this often
RESTART_SECONDS = 1.0  # a projector child that exited is started again after this
# The projector yields the cores to the writer (and, on a shared machine, to its
# clients): it catches up when they leave CPU free, and the feed lags meanwhile.
NICENESS = 10


@dataclass(frozen=True, slots=True)
class SnapshotPolicy:
    """Write a snapshot to `directory` every `every_records` journal records."""

    directory: Path
    every_records: int


class Projector:
    """The journal's records after `applied_seq`, applied to `machine`, what they did
    stored; with `snapshots`, the state written every so many records by a forked child
    (`snapshot_seq`: the newest one taken, or the one the state was rebuilt from)."""

    def __init__(
        self,
        journal: Journal,
        machine: StateMachine,
        applied_seq: int,
        snapshots: SnapshotPolicy | None = None,
        snapshot_seq: int = 0,
    ) -> None:
        if not machine.events:
            raise ValueError("the projector's state machine must build events")
        self._journal = journal
        self._machine = machine
        self.applied_seq = applied_seq  # the last record applied, and its rows stored
        self._snapshots = snapshots
        self.snapshot_seq = snapshot_seq
        self._child: tuple[int, int] | None = None  # (pid, seq) of the snapshot at work

    def step(self) -> int:
        """Project the records after applied_seq: one bounded read (MAX_RECORDS_PER_STEP),
        one transaction; how many there were. Then a snapshot child is reaped, or
        started if one is due."""
        self.reap_snapshot()
        records = self._journal.tail(self.applied_seq, MAX_RECORDS_PER_STEP)
        if not records:
            return 0
        machine = self._machine
        calls_before = machine.last_call_seq
        projected: list[Projected] = []
        for seq, at_ms, command in records:
            step = apply_record(machine, seq, at_ms, command)
            projected.append(Projected(seq, at_ms, step.events, step.entries, step.calls))
        self._journal.project(projected, records[-1][0], calls_before)
        self.applied_seq = records[-1][0]
        self._maybe_snapshot()
        return len(records)

    def _maybe_snapshot(self) -> None:
        """Fork a child to write the state at applied_seq, if one is due and none is at
        work. The fork is the projector's only pause; the writer's is none."""
        policy = self._snapshots
        if policy is None or self._child is not None:
            return
        if self.applied_seq - self.snapshot_seq < policy.every_records:
            return
        seq = self.applied_seq
        started = time.perf_counter()
        pid = fork_snapshot(self._machine, seq, policy.directory, self._machine.now_ms)
        log.info(
            "snapshot at seq %d: child %d started, projector paused %.1f ms",
            seq,
            pid,
            (time.perf_counter() - started) * 1e3,
        )
        self._child = (pid, seq)
        self.snapshot_seq = seq

    def reap_snapshot(self, *, wait: bool = False) -> None:
        """If the snapshot child exited (with `wait`: once it does), say how; after a
        snapshot written, delete the ones no start and no projector restart needs (all
        kept if the watermark cannot be read or made durable: the next snapshot tries
        again)."""
        if self._child is None or self._snapshots is None:
            return
        pid, seq = self._child
        done, status = os.waitpid(pid, 0 if wait else os.WNOHANG)
        if not done:
            return
        self._child = None
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
            log.error("snapshot at seq %d failed (child %s)", seq, how)
            return
        log.info("snapshot at seq %d written", seq)
        try:
            projected = self._journal.durable_projected_through()
        except JournalError as exc:
            log.warning("older snapshots kept: %s", exc)
            return
        discard_older(self._snapshots.directory, projected)


def open_projector(
    journal: Journal, snapshot_dir: Path | None, snapshot_every_records: int = 0
) -> Projector:
    """The projector at its watermark: the state rebuilt as it was at that seq; it
    writes a snapshot to `snapshot_dir` every `snapshot_every_records` records (0: never).

    If it cannot be (the journal was pruned, and the snapshots between the prune and the
    watermark are gone: the server keeps the newest one at or before the watermark, so
    only a snapshot folder damaged or trimmed by hand gets here),
    JournalError: the projection stops there rather than leave a hole in the ledger's
    history, and history reads answer UNAVAILABLE until a snapshot is restored."""
    watermark = journal.projected_through()
    try:
        recovered = recover(journal, snapshot_dir, through_seq=watermark)
    except JournalError as exc:
        raise JournalError(
            f"the projection cannot resume at seq {watermark}: {exc} (restore a snapshot "
            f"taken at or before seq {watermark}, after the prune, to {snapshot_dir})"
        ) from exc
    applied = recovered.snapshot_seq + recovered.replayed
    log.info("projector: rows stored through seq %d, state rebuilt at %d", watermark, applied)
    snapshots = None
    if snapshot_dir is not None and snapshot_every_records:
        snapshots = SnapshotPolicy(snapshot_dir, snapshot_every_records)
    return Projector(journal, recovered.machine, applied, snapshots, recovered.snapshot_seq)


def run(
    journal: Journal,
    snapshot_dir: Path | None,
    snapshot_every_records: int,
    stop: threading.Event,
) -> None:
    """Project until `stop` is set. A database error pauses it; a broken state ends it."""
    projector = open_projector(journal, snapshot_dir, snapshot_every_records)
    settle_heap()
    while not stop.is_set():
        try:
            applied = projector.step()
        except JournalError as exc:
            log.warning("projector: %s", exc)
            stop.wait(ERROR_PAUSE_SECONDS)
            continue
        if applied < MAX_RECORDS_PER_STEP:
            stop.wait(POLL_SECONDS)


def main() -> None:
    """The child process: settings on stdin as one JSON line, then project until the
    pipe ends (the server closed it, or died). A pipe that ends before the line (the
    server was killed right after starting it) ends the child at once, quietly."""
    line = sys.stdin.buffer.readline()
    if not line:
        sys.exit(0)
    settings = orjson.loads(line)
    logs.configure(settings["log_level"], settings["log_format"])
    os.nice(NICENESS)
    stop = threading.Event()

    def watch_pipe() -> None:
        sys.stdin.buffer.read()  # returns at the pipe's end
        os._exit(0)  # a transaction in flight is rolled back; it is redone on restart

    threading.Thread(target=watch_pipe, name="parent-pipe", daemon=True).start()
    snapshot_dir = Path(settings["snapshot_dir"]) if settings["snapshot_dir"] else None
    try:
        with Journal(settings["database_url"], durable=False) as journal:
            run(journal, snapshot_dir, settings["snapshot_every_records"], stop)
    except (JournalError, InvariantViolation) as exc:
        log.critical("projector stopped: %s", exc)
        sys.exit(1)


# ------------------------------------------------------------ the server's side


class ProjectorProcess:
    """The projector child of one server: started, restarted if it exits, stopped."""

    def __init__(
        self,
        database_url: str,
        snapshot_dir: Path,
        snapshot_every_records: int,
        log_level: str,
        log_format: str,
    ) -> None:
        self._settings = orjson.dumps(
            {
                "database_url": database_url,
                "snapshot_dir": str(snapshot_dir),
                "snapshot_every_records": snapshot_every_records,
                "log_level": log_level,
                "log_format": log_format,
            }
        )
        self._child: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        child = subprocess.Popen(
            [sys.executable, "-m", "callcredit_server.projector"], stdin=subprocess.PIPE
        )
        if child.stdin is None:
            raise RuntimeError("the projector's stdin is not a pipe")
        child.stdin.write(self._settings + b"\n")  # the URL stays out of the process list
        child.stdin.flush()
        self._child = child

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    def exited(self) -> int | None:
        """The child's exit code if it exited (None while it runs)."""
        return None if self._child is None else self._child.poll()

    def restart(self) -> None:
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        """Kill the child and reap it. Blocking, briefly. Killing loses nothing: its
        end of pipe does the same (os._exit), a transaction in flight is rolled back and
        redone by the next projector, and a child still starting up is not waited for."""
        child, self._child = self._child, None
        if child is None:
            return
        child.kill()
        child.wait()
        if child.stdin is not None:
            child.stdin.close()


class FeedPoller:
    """The server's one poll of the projection's watermark (which history reads wait
    for) and of the events table, shared by every follower."""

    def __init__(
        self,
        journal: Journal,
        feed: Changefeed,
        reads: Executor,
        process: ProjectorProcess | None,
    ) -> None:
        self._journal = journal
        self._feed = feed
        self._reads = reads  # the history threads: database reads off the event loop
        self._process = process

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        restart_at: float | None = None
        while True:
            await asyncio.sleep(FEED_POLL_SECONDS)
            process = self._process
            if process is not None:
                code = process.exited() if restart_at is None else None
                if code is not None:
                    log.error("the projector exited (code %d); restarting it", code)
                    restart_at = loop.time() + RESTART_SECONDS
                if restart_at is not None and loop.time() >= restart_at:
                    restart_at = None
                    process.restart()
            try:
                await self.poll()
            except JournalError as exc:
                log.warning("changefeed: cannot read the events: %s", exc)
                await asyncio.sleep(ERROR_PAUSE_SECONDS)

    async def poll(self) -> None:
        """Publish what the projector stored since the last poll, page by page."""
        loop = asyncio.get_running_loop()
        feed = self._feed
        through = await loop.run_in_executor(self._reads, self._journal.projected_through)
        while feed.projected_seq < through:
            if not feed.followers:
                feed.publish((), through)  # nobody to hand events to: no read
                return
            after = feed.projected_seq
            read = self._journal.read_events
            stored, last, more = await loop.run_in_executor(
                self._reads, read, after, END_OF_RECORD, through
            )
            events = [FeedEvent(e.seq, e.idx, e.at_ms, e.event) for e in stored]
            feed.publish(events, last if more and last is not None else through)


if __name__ == "__main__":
    main()
