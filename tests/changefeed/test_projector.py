"""The projector: the events derived from the durable journal, off the writer's path."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from callcredit.v1 import admin_pb2
from callcredit_server import cli, projector, service
from callcredit_server import journal as journal_module
from callcredit_server.core import Command, CreateAccount, PutTariff, Release, StateMachine, TopUp
from callcredit_server.core.events import Event
from callcredit_server.core.model import Tariff
from callcredit_server.journal import HISTORY_SUFFIX, Journal, JournalError, JournalRecord
from callcredit_server.recovery import recover
from callcredit_server.snapshot import discard_older, list_snapshots, read_snapshot, write_snapshot
from tests.changefeed.test_watch import collect, top_ups, watch
from tests.core.helpers import fingerprint_of, rate, reserve
from tests.service.conftest import Harness
from tests.service.processes import server_process
from tests.service.streams import RawStream, release_op, reserve_op


def workload(count: int) -> list[tuple[int, Command]]:
    """(at_ms, command): a tariff, an account with a threshold, then calls and top-ups."""
    rng = random.Random(13)
    now_ms = 1_000
    commands: list[tuple[int, Command]] = [
        (now_ms, PutTariff(Tariff("T", "VND", (rate(),)))),
        (now_ms, CreateAccount("A", "VND", "T", 0, 0, 1_900)),
        (now_ms, TopUp("A", 2_000, "seed", "")),
    ]
    open_calls: list[str] = []
    for i in range(count):
        now_ms += rng.randrange(0, 3_000)
        if rng.random() < 0.45 or not open_calls:
            commands.append((now_ms, reserve(f"c{i}")))
            open_calls.append(f"c{i}")
        elif rng.random() < 0.8:
            call_id = open_calls.pop(rng.randrange(len(open_calls)))
            commands.append((now_ms, Release(call_id, rng.randrange(30))))
        else:
            commands.append((now_ms, TopUp("A", rng.randrange(1, 120), f"k{i}", "")))
    return commands


def write_journal(journal: Journal, commands: list[tuple[int, Command]]) -> list[list[Event]]:
    """Append `commands` as the writer does (events off); the events of each record, as a
    machine with events on makes them."""
    writer, reference = StateMachine(events=False), StateMachine()
    records: list[JournalRecord] = []
    expected: list[list[Event]] = []
    for at_ms, command in commands:
        step = writer.apply(command, at_ms)
        assert step.events == []
        if step.changed:
            records.append(JournalRecord(len(records) + 1, at_ms, command))
            expected.append(reference.apply(command, at_ms).events)
    assert fingerprint_of(writer) == fingerprint_of(reference)  # the same state either way
    for start in range(0, len(records), 10):  # group commits of 10: a row each
        journal.append(records[start : start + 10])
    return expected


def stored(journal: Journal) -> list[list[Event]]:
    """Every stored event, grouped by record, with [] for a record without events."""
    by_seq: dict[int, list[Event]] = {}
    seq, index, more = 0, 0, True
    while more:
        events, last, more = journal.read_events(seq, index, journal.last_seq())
        for e in events:
            by_seq.setdefault(e.seq, []).append(e.event)
        if last is None:
            break
        seq, index = last, 2**31 - 1
    return [by_seq.get(s, []) for s in range(1, journal.last_seq() + 1)]


def test_the_projection_resumes_from_its_watermark_and_is_idempotent(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(projector, "MAX_RECORDS_PER_STEP", 70)
    with Journal(database_url) as journal:
        expected = write_journal(journal, workload(300))
        assert sum(map(len, expected)) > 300
        first = projector.open_projector(journal, tmp_path / "snapshots")
        assert (first.step(), first.step()) == (70, 70)
        assert journal.projected_through() == 140
        # A restart: the state rebuilt at the watermark, then on from there.
        again = projector.open_projector(journal, tmp_path / "snapshots")
        assert again.applied_seq == 140
        while again.step():
            pass
        assert journal.projected_through() == journal.last_seq() == len(expected)
        assert stored(journal) == expected
        # Redoing records (a second projector, or one behind): nothing twice, and the
        # watermark does not go back.
        late = projector.Projector(journal, StateMachine(), 0)
        late.step()
        assert journal.projected_through() == len(expected)
        assert stored(journal) == expected


def test_on_sqlite_a_step_goes_on_while_the_writer_holds_the_journals_lock(
    tmp_path: Path,
) -> None:
    """SQLite has one write lock per file: a step reads the journal's file and writes
    the history's, so an append in flight (holding the journal's lock) never stalls it,
    nor it the append."""
    path = tmp_path / "journal.db"
    with Journal(f"sqlite:///{path}") as journal:
        write_journal(journal, workload(600))
        first = projector.open_projector(journal, None)
        appending = sqlite3.connect(path, isolation_level=None)
        try:
            appending.execute("BEGIN IMMEDIATE")  # as the writer's append holds it
            started = time.monotonic()
            assert first.step() == journal.last_seq()
            assert time.monotonic() - started < 5.0  # not SQLITE_BUSY_TIMEOUT_MS (10 s)
        finally:
            appending.execute("ROLLBACK")
            appending.close()
        assert journal.projected_through() == journal.last_seq()


def test_the_projector_refuses_a_machine_without_events(database_url: str) -> None:
    with Journal(database_url) as journal, pytest.raises(ValueError, match="events"):
        projector.Projector(journal, StateMachine(events=False), 0)


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone but for its exit status.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def test_a_server_killed_with_sigkill_leaves_no_projector_running(tmp_path: Path) -> None:
    with server_process(f"sqlite:///{tmp_path / 'journal.db'}") as (process, _):
        (child,) = children(process.pid)
        assert "callcredit_server.projector" in Path(f"/proc/{child}/cmdline").read_text()
        process.send_signal(signal.SIGKILL)
        process.wait()
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(child)


def test_a_projector_whose_server_died_before_handing_its_settings_exits_quietly() -> None:
    """The crash campaign killed a server between starting the child and writing its
    settings: the child read an empty line and died with a traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "callcredit_server.projector"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, b"")


async def test_a_killed_projector_is_restarted_and_the_feed_goes_on(harness: Harness) -> None:
    h = harness
    await h.funded_account("acme", 100)
    feed = watch(h)
    await collect(feed, 2)
    process = h.running.projector
    assert process is not None and process.pid is not None
    old = process.pid
    os.kill(old, signal.SIGKILL)
    live = asyncio.ensure_future(collect(feed, 3))
    await top_ups(h, "acme", 0, 3)
    more, _ = await live
    feed.cancel()
    assert [e.account.balance for e in more] == [101, 102, 103]
    assert process.pid not in (None, old) and process.restarts == 1


async def test_a_replay_waits_for_the_projector_then_says_it_is_behind(harness: Harness) -> None:
    h = harness
    await h.funded_account("acme", 100)
    process = h.running.projector
    assert process is not None
    await asyncio.to_thread(process.stop)  # not restarted: it was stopped, not lost
    await top_ups(h, "acme", 0, 1)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async with asyncio.timeout(20):
            async for _ in watch(h):
                pass
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "projector" in (caught.value.details() or "")
    assert time.monotonic() - started >= 4.5
    # Following from the end needs no replay: it is accepted (its position comes at
    # once), and waits for events.
    tail = watch(h, from_end=True)
    async with asyncio.timeout(5):
        position = await tail.read()
    assert isinstance(position, admin_pb2.WatchEventsResponse) and not position.events
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await tail.read()
    tail.cancel()


async def test_a_history_read_sees_every_answer_given_before_it(harness: Harness) -> None:
    """Read-your-writes: the history tables are the projector's, written after the
    writer's commit, and a history read waits until they cover every change already
    acknowledged (without the wait, each read here would race the projector's poll)."""
    h = harness
    await h.funded_account("acme", 100)
    dialer = RawStream(h.dialer)
    newest = admin_pb2.ListEntriesRequest(account_id="acme", limit=1, newest_first=True)
    balance = 100
    for i in range(15):
        await top_ups(h, "acme", i, 1)
        balance += 1
        entries = (await h.admin.ListEntries(newest)).entries
        assert [(e.balance_after, e.call_id) for e in entries] == [(balance, "")]
        (granted,) = await dialer.ask(reserve_op(f"r{i}", f"c{i}", "acme"))
        assert granted.reserve.HasField("grant")
        listed = await h.admin.ListCalls(admin_pb2.ListCallsRequest(account_id="acme", limit=1))
        assert [c.call_id for c in listed.calls] == [f"c{i}"]
        (released,) = await dialer.ask(release_op(f"e{i}", f"c{i}", 5))
        assert released.HasField("release")
        balance -= 5  # one unit a second
        entries = (await h.admin.ListEntries(newest)).entries
        assert [(e.balance_after, e.call_id) for e in entries] == [(balance, f"c{i}")]


async def test_a_stopped_projector_makes_history_reads_fail_not_answer_stale(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "PROJECTION_WAIT_SECONDS", 1.0)
    h = harness
    await h.funded_account("acme", 100)
    process = h.running.projector
    assert process is not None
    await asyncio.to_thread(process.stop)  # not restarted: it was stopped, not lost
    await top_ups(h, "acme", 0, 1)  # acknowledged, so durable; not projected

    async def refused(read: Callable[[], Awaitable[object]]) -> None:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read()
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "projector" in (caught.value.details() or "")
        assert time.monotonic() - started >= 0.9

    await refused(
        lambda: h.admin.ListEntries(admin_pb2.ListEntriesRequest(account_id="acme", limit=10))
    )
    await refused(
        lambda: h.admin.ListCalls(admin_pb2.ListCallsRequest(account_id="acme", limit=10))
    )
    assert (await h.account("acme")).balance == 101  # memory's answers do not wait
    monkeypatch.undo()  # the usual wait: a new projector process takes a while to start
    process.start()  # back: the history reads are answered, up to date
    entries = await h.admin.ListEntries(admin_pb2.ListEntriesRequest(account_id="acme", limit=10))
    assert [e.balance_after for e in entries.entries] == [100, 101]


def write_snapshots(
    folder: Path,
    commands: list[tuple[int, Command]],
    seqs: tuple[int, ...],
    each: Callable[[], None] = lambda: None,
) -> int:
    """Write the state at each seq of `seqs` to `folder` as a snapshot (calling `each`
    after each one), as the projector's child would; the last seq of the commands."""
    machine, seq = StateMachine(events=False), 0
    for at_ms, command in commands:
        if machine.apply(command, at_ms).changed:  # a refused command is no record
            seq += 1
            if seq in seqs:
                write_snapshot(folder, seq, machine.image(), at_ms)
                each()
    return seq


def test_prune_never_goes_past_the_projection(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot beyond the projector's watermark does not count for `prune`: the
    records the projector has yet to read must stay."""
    monkeypatch.setattr(projector, "MAX_RECORDS_PER_STEP", 70)
    commands = workload(300)
    root = tmp_path / "snapshots"
    with Journal(database_url) as journal:
        expected = write_journal(journal, commands)
        snapshots = root / journal.journal_id  # the server's folder for this journal
        seq = write_snapshots(snapshots, commands, (100, 200))
        assert journal.last_seq() == seq > 200
        first = projector.open_projector(journal, snapshots)
        while journal.projected_through() < 140:
            first.step()
        assert journal.projected_through() < 200

        def prune() -> str:
            args = ["prune", "--yes", "--database-url", database_url]
            result = CliRunner().invoke(cli.app, [*args, "--snapshot-dir", str(root)])
            assert result.exit_code == 0, result.output
            return result.output

        assert "pruned 100 journal records through seq 100" in prune()
        assert "changefeed's projection" in prune()  # 200 is beyond it: nothing more
        while first.step():
            pass
        assert "pruned 100 journal records through seq 200" in prune()
        assert stored(journal) == expected


def test_the_projector_snapshots_the_journals_state_every_so_many_records(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every `snapshot_every_records` records it applied, a forked child writes the
    projector's state at that seq: exactly the committed journal's there (its clock
    included: nothing unjournaled moves it). The newest two are kept."""
    monkeypatch.setattr(projector, "MAX_RECORDS_PER_STEP", 70)
    snapshots = tmp_path / "snapshots"
    with Journal(database_url) as journal:
        write_journal(journal, workload(300))
        assert journal.last_seq() > 280
        projecting = projector.open_projector(journal, snapshots, 100)
        taken = []
        while projecting.step():
            projecting.reap_snapshot(wait=True)
            taken.append(projecting.snapshot_seq)
        assert sorted(set(taken)) == [0, 140, 280]  # due at 100 and 240, taken at the step's end
        assert [found.seq for found in list_snapshots(snapshots)] == [280, 140]
        for found in list_snapshots(snapshots):
            rebuilt = recover(journal, None, through_seq=found.seq).machine
            assert read_snapshot(found.path) == (found.seq, rebuilt.image())
        assert recover(journal, snapshots).snapshot_seq == 280
        # A projector opened again counts from the snapshot it was rebuilt from.
        assert projector.open_projector(journal, snapshots, 100).snapshot_seq == 280


def test_the_snapshot_a_projector_behind_resumes_from_outlives_newer_ones(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's clean-up after each snapshot (discard_older, given the watermark)
    keeps the newest snapshot at or before the projection, beside the newest two: a
    projector behind them resumes after a prune instead of stopping (the case below)."""
    monkeypatch.setattr(projector, "MAX_RECORDS_PER_STEP", 150)
    commands = workload(300)
    snapshots = tmp_path / "snapshots"
    with Journal(database_url) as journal:
        write_journal(journal, commands)
        assert projector.open_projector(journal, snapshots).step() == 150
        write_snapshots(
            snapshots,
            commands,
            (100, 200, 250, 300),
            lambda: discard_older(snapshots, journal.projected_through()),
        )
        assert [found.seq for found in list_snapshots(snapshots)] == [300, 250, 100]
        assert journal.prune(100) == 100
        resumed = projector.open_projector(journal, snapshots)
        assert resumed.applied_seq == 150
        assert resumed.step() == 150
        assert journal.projected_through() == 300


def test_a_projection_that_cannot_resume_stops_rather_than_skip(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pruned through a snapshot that was deleted since (only the newest KEEP_SNAPSHOTS
    stay) and none left between the prune and the watermark: the history after the
    watermark cannot be derived, and the projector says so instead of leaving a hole."""
    monkeypatch.setattr(projector, "MAX_RECORDS_PER_STEP", 150)
    commands = workload(300)
    snapshots = tmp_path / "snapshots"
    with Journal(database_url) as journal:
        write_journal(journal, commands)
        write_snapshots(snapshots, commands, (100, 200))
        assert projector.open_projector(journal, snapshots).step() == 150
        assert journal.prune(100) == 100
        oldest = list_snapshots(snapshots)[-1]
        assert oldest.seq == 100
        oldest.path.unlink()  # as discard_older does once two newer ones are written
        with pytest.raises(JournalError, match="cannot resume at seq 150"):
            projector.open_projector(journal, snapshots)
        assert journal.projected_through() == 150


def test_a_power_loss_after_a_prune_cannot_take_the_projection_behind_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: the projector commits to the history's file without waiting for the disk,
    and the writer never commits to that file, so nothing else syncs it. A prune (and a
    snapshot's clean-up) must not trust a watermark a power loss could take back: with
    the journal pruned through seq 100, a history back at seq 0 could never be derived
    again. Modelled here as the loss of every history WAL frame not checkpointed: the
    history's file as it was just after the prune, without its WAL."""
    monkeypatch.setattr(projector, "MAX_RECORDS_PER_STEP", 150)
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    history = tmp_path / f"journal.db{HISTORY_SUFFIX}"
    commands = workload(300)
    snapshots = tmp_path / "snapshots"
    with Journal(url) as journal, Journal(url, durable=False) as projecting:
        write_journal(journal, commands)
        write_snapshots(snapshots, commands, (100,))
        assert projector.open_projector(projecting, snapshots).step() == 150
        assert journal.prune(100) == 100
        shutil.copy(history, tmp_path / "on-disk")
    for name in (f"{history}-wal", f"{history}-shm"):
        Path(name).unlink(missing_ok=True)
    shutil.copy(tmp_path / "on-disk", history)
    with Journal(url, durable=False) as projecting:
        assert projecting.projected_through() == 150
        assert projector.open_projector(projecting, snapshots).applied_seq == 150


def test_a_watermark_that_cannot_be_made_durable_deletes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: a reader holding an older state of the history keeps its WAL checkpoint
    from finishing: a prune then refuses (nothing deleted), naming the reason."""
    monkeypatch.setattr(journal_module, "SQLITE_BUSY_TIMEOUT_MS", 200)
    monkeypatch.setattr(projector, "MAX_RECORDS_PER_STEP", 150)
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    with Journal(url) as journal:
        write_journal(journal, workload(300))
        projecting = projector.open_projector(journal, None)
        assert projecting.step() == 150
        reader = sqlite3.connect(f"{tmp_path / 'journal.db'}{HISTORY_SUFFIX}")
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT count(*) FROM events").fetchone()  # holds this state
            assert projecting.step() > 0  # the projection moves on past it
            with pytest.raises(JournalError, match="could not be made durable"):
                journal.prune(100)
        finally:
            reader.close()
        assert journal.pruned_through() == 0
        assert journal.prune(100) == 100
