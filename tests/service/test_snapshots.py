"""Snapshots: taken by the projector's forked child while serving; a start uses the newest
usable one."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import os
import subprocess
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path

import orjson
import pytest

from callcredit.v1 import admin_pb2
from callcredit_server import snapshot
from callcredit_server.core import (
    COMPILED,
    Command,
    CreateAccount,
    InvariantViolation,
    PutTariff,
    Reserve,
    StateMachine,
    Tariff,
    TopUp,
)
from callcredit_server.journal import Journal, JournalRecord
from callcredit_server.projector import open_projector
from callcredit_server.recovery import recover, verify
from callcredit_server.snapshot import (
    SnapshotError,
    discard_older,
    list_snapshots,
    load_snapshot,
    read_snapshot,
    snapshot_path,
    write_snapshot,
)
from tests.core.helpers import rate
from tests.service.conftest import FakeClock, Harness, open_harness
from tests.service.streams import RawStream, release_op, renew_op, reserve_op

SNAPSHOT_WAIT_SECONDS = 30.0  # the projector is a child process, at a lower priority


async def _campaign(h: Harness, calls: int) -> None:
    stream = RawStream(h.dialer)
    for n in range(calls):
        await stream.ask(reserve_op(f"r{n}", f"c{n}", "acc"))
        await stream.ask(renew_op(f"n{n}", f"c{n}", 1, 10))
        if n % 3:
            await stream.ask(release_op(f"x{n}", f"c{n}", 12))
    await stream.close()


async def _state(h: Harness) -> tuple[object, ...]:
    account = await h.account("acc")
    entries = await h.admin.ListEntries(admin_pb2.ListEntriesRequest(account_id="acc", limit=1000))
    calls = await h.admin.ListCalls(admin_pb2.ListCallsRequest(account_id="acc", limit=1000))
    return account, list(entries.entries), list(calls.calls)


async def _restart(h: Harness, **changes: object) -> Harness:
    await h.channel.close()
    await h.running.stop(grace_seconds=0.5)
    settings = dataclasses.replace(h.settings, **changes)  # type: ignore[arg-type]
    return await open_harness(settings, FakeClock(h.clock.now_ms))


def _directory(h: Harness) -> Path:
    return h.settings.snapshot_root() / h.running.journal.journal_id


async def _snapshot_at_least(directory: Path, seq: int) -> list[snapshot.SnapshotFile]:
    """The snapshots in `directory` once the projector wrote one at `seq` or later."""
    deadline = asyncio.get_running_loop().time() + SNAPSHOT_WAIT_SECONDS
    while not (taken := list_snapshots(directory)) or taken[0].seq < seq:
        assert asyncio.get_running_loop().time() < deadline, f"no snapshot at {seq}: {taken}"
        await asyncio.sleep(0.05)
    return taken


async def test_a_start_replays_only_what_follows_the_newest_snapshot(harness: Harness) -> None:
    h = await _restart(harness, snapshot_every_records=25)
    await h.funded_account("acc", 100_000)
    await _campaign(h, 30)
    taken = await _snapshot_at_least(_directory(h), 25)
    before = await _state(h)
    h = await _restart(h, snapshot_every_records=0)
    try:
        assert await _state(h) == before
        last = h.running.journal.last_seq()
        recovered = recover(h.running.journal, _directory(h))
        assert recovered.snapshot_seq == taken[0].seq
        assert recovered.replayed == last - taken[0].seq
        checked = verify(h.running.journal, _directory(h))
        assert (checked.problems, checked.records) == ([], last)
        assert checked.snapshots_checked == len(list_snapshots(_directory(h)))
        # The journal before the snapshot can go; the state is rebuilt all the same.
        assert h.running.journal.prune(taken[0].seq) == taken[0].seq
        h = await _restart(h)
        assert await _state(h) == before
        (renewed,) = await RawStream(h.dialer).ask(renew_op("again", "c0", 2, 20))
        assert renewed.renew.grant.allowed_seconds == 80
    finally:
        await h.channel.close()
        await h.running.stop(grace_seconds=0.5)


async def test_a_snapshot_beyond_the_journal_is_discarded_and_a_damaged_one_skipped(
    harness: Harness,
) -> None:
    h = harness
    await h.funded_account("acc", 100_000)
    await _campaign(h, 6)
    directory = _directory(h)
    journal: Journal = h.running.journal
    last = journal.last_seq()
    image = h.running.writer._core.machine.image()
    write_snapshot(directory, last + 5, image, 0)  # as if the journal lost its tail
    write_snapshot(directory, last, image, 0)
    damaged = snapshot_path(directory, last)
    damaged.write_bytes(gzip.compress(b'{"format": 1, "seq": 1}\n{}'))
    before = await _state(h)
    h = await _restart(h)
    try:
        assert await _state(h) == before
        assert [f.seq for f in list_snapshots(directory)] == [last]  # the stale one is gone
        recovered = recover(h.running.journal, directory)
        assert (recovered.snapshot_seq, recovered.replayed) == (0, last)  # damaged: skipped
    finally:
        await h.channel.close()
        await h.running.stop(grace_seconds=0.5)


def test_the_file_a_snapshot_child_left_when_killed_mid_write_is_deleted(tmp_path: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    left = tmp_path / f".snapshot-{7:020d}.json.gz.{gone.pid}.tmp"
    left.write_bytes(b"half a snapshot")
    at_work = tmp_path / f".snapshot-{8:020d}.json.gz.{os.getpid()}.tmp"
    at_work.write_bytes(b"being written")
    discard_older(tmp_path, 0)  # what the projector runs after each snapshot it took
    assert list(tmp_path.iterdir()) == [at_work]


def test_a_snapshot_file_of_another_format_is_refused_by_name(tmp_path: Path) -> None:
    path = snapshot_path(tmp_path, 7)
    path.write_bytes(gzip.compress(b'{"format": 3, "seq": 7}\n{}'))
    with pytest.raises(
        SnapshotError, match=r"unsupported snapshot file format 3 \(this server reads 1, 2\)"
    ):
        read_snapshot(path)


def _image(accounts: int) -> dict[str, object]:
    """A state with `accounts` accounts, each topped up (a remembered key), one call open."""
    machine = StateMachine()
    machine.apply(PutTariff(Tariff("T", "VND", (rate(price=60_000_000),))), 1_000)
    for n in range(accounts):
        machine.apply(CreateAccount(f"a{n}", "VND", "T", 0, 0), 1_000)
        machine.apply(TopUp(f"a{n}", 10**6, f"k{n}", ""), 1_000)
    machine.apply(Reserve("c", "a0", "84901", 0, 60, 120), 1_000)
    return machine.image()


def test_a_snapshot_is_read_as_a_stream_of_bounded_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(snapshot, "ROWS_PER_LINE", 3)  # 7 accounts: lines of 3, 3, 1
    image = _image(7)
    path = write_snapshot(tmp_path, 9, image, 0)
    lines = gzip.decompress(path.read_bytes()).splitlines()
    assert len(lines) == 1 + 1 + 3 + 1 + 3 + 1  # header, head, accounts, calls, keys, sha256
    assert read_snapshot(path) == (9, image)
    seq, machine = load_snapshot(path)
    assert (seq, machine.image()) == (9, image)


def test_a_snapshot_of_format_1_is_still_read(tmp_path: Path) -> None:
    image = _image(3)
    state = orjson.dumps(image)
    header = {"format": 1, "seq": 4, "created_at_ms": 0, "sha256": sha256(state).hexdigest()}
    path = snapshot_path(tmp_path, 4)
    path.write_bytes(gzip.compress(orjson.dumps(header) + b"\n" + state))
    assert read_snapshot(path) == (4, image)
    assert load_snapshot(path)[1].image() == image


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda lines: lines[:-1], "truncated"),
        (lambda lines: [*lines[:2], lines[3], lines[2], *lines[4:]], "checksum"),
        (lambda lines: [*lines, b"[]"], "after its checksum"),
        (lambda lines: [*lines[:2], b'["accounts", [', *lines[3:]], "cannot be read"),
    ],
    ids=["no-checksum-line", "lines-swapped", "trailing-line", "garbled-line"],
)
def test_a_damaged_snapshot_is_refused(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    damage: Callable[[list[bytes]], list[bytes]],
    message: str,
) -> None:
    monkeypatch.setattr(snapshot, "ROWS_PER_LINE", 2)
    path = write_snapshot(tmp_path, 5, _image(4), 0)
    lines = gzip.decompress(path.read_bytes()).splitlines()
    path.write_bytes(gzip.compress(b"\n".join(damage(lines)) + b"\n"))
    with pytest.raises(SnapshotError, match=message):
        read_snapshot(path)
    with pytest.raises((SnapshotError, InvariantViolation)):
        load_snapshot(path)


@pytest.mark.skipif(COMPILED, reason="patches StateMachine.audit: a compiled class is closed")
def test_a_start_audits_a_snapshot_once_and_again_after_records_replayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state a snapshot builds is audited whole as it is built; recover() audits it
    again only if records were replayed after it."""
    audits: list[int] = []
    audit = StateMachine.audit

    def counted(machine: StateMachine) -> list[str]:
        audits.append(len(machine.accounts))
        return audit(machine)

    monkeypatch.setattr(StateMachine, "audit", counted)
    commands: list[Command] = [
        PutTariff(Tariff("T", "VND", (rate(),))),
        CreateAccount("A", "VND", "T", 0, 0),
        TopUp("A", 1_000, "k1", ""),
        TopUp("A", 5, "k2", ""),
    ]
    machine = StateMachine()
    with Journal(f"sqlite:///{tmp_path / 'journal.db'}") as journal:
        for seq, command in enumerate(commands, start=1):
            machine.apply(command, 1_000 * seq)
            journal.append([JournalRecord(seq, 1_000 * seq, command)])
            if seq == 3:
                write_snapshot(tmp_path / "snapshots", seq, machine.image(), 1_000 * seq)
        assert recover(journal, tmp_path / "snapshots").replayed == 1
        assert len(audits) == 2  # the build, then after the record replayed
        projector = open_projector(journal, None)  # a prune never passes the projection
        while projector.step():
            pass
        journal.prune(3)
        del audits[:]
        write_snapshot(tmp_path / "snapshots", 4, machine.image(), 4_000)
        assert recover(journal, tmp_path / "snapshots").replayed == 0
        assert len(audits) == 1  # the build only
