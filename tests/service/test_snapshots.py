"""Snapshots: taken by a forked child while serving; a start uses the newest usable one."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import pytest

from callcredit.v1 import admin_pb2
from callcredit_server.journal import Journal
from callcredit_server.recovery import recover, verify
from callcredit_server.snapshot import (
    SnapshotError,
    list_snapshots,
    read_snapshot,
    snapshot_path,
    write_snapshot,
)
from tests.service.conftest import FakeClock, Harness, open_harness
from tests.service.streams import RawStream, release_op, renew_op, reserve_op


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


async def test_a_start_replays_only_what_follows_the_newest_snapshot(harness: Harness) -> None:
    h = await _restart(harness, snapshot_every_records=25)
    await h.funded_account("acc", 100_000)
    await _campaign(h, 30)
    await h.running.writer.wait_for_snapshot()
    taken = list_snapshots(_directory(h))
    assert taken and taken[0].seq >= 25
    assert h.running.writer.snapshot_stall_seconds_max > 0
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


def test_a_snapshot_file_of_another_format_is_refused_by_name(tmp_path: Path) -> None:
    path = snapshot_path(tmp_path, 7)
    path.write_bytes(gzip.compress(b'{"format": 2, "seq": 7}\n{}'))
    with pytest.raises(
        SnapshotError, match=r"unsupported snapshot file format 2 \(this server reads 1\)"
    ):
        read_snapshot(path)
