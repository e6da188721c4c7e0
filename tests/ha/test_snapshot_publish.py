"""A snapshot is published only once the journal holds its seq (snapshot.py, writer.py).

A primary snapshots its state at the last *applied* seq, which may be ahead of the
journal. If it dies before those records commit, a standby takes over and writes other
records under the same seqs; the dead primary's snapshot must never be found then."""

from __future__ import annotations

import os
from pathlib import Path

from callcredit_server.core import CreateAccount, PutTariff, Rate, StateMachine, Tariff
from callcredit_server.snapshot import (
    discard_older,
    fork_snapshot,
    list_snapshots,
    publish_snapshot,
    read_snapshot,
)


def test_a_forked_snapshot_is_found_only_once_published(tmp_path: Path) -> None:
    machine = StateMachine()
    machine.apply(PutTariff(Tariff("t", "VND", (Rate("", 60_000_000, 1, 1, 0),))), 1)
    machine.apply(CreateAccount("a", "VND", "t", 0, 0), 1)
    pid = fork_snapshot(machine, 2, tmp_path, 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert list_snapshots(tmp_path) == []  # written, not published: a crash now leaves none
    publish_snapshot(tmp_path, 2, pid)
    (found,) = list_snapshots(tmp_path)
    assert found.seq == 2
    assert read_snapshot(found.path)[1] == machine.image()


def test_an_unpublished_snapshot_of_a_dead_child_is_cleaned_up(tmp_path: Path) -> None:
    machine = StateMachine()
    pid = fork_snapshot(machine, 7, tmp_path, 1)
    os.waitpid(pid, 0)
    assert [p.name for p in tmp_path.iterdir()] == [f".snapshot-{7:020d}.json.gz.{pid}.tmp"]
    discard_older(tmp_path, 0)  # what the writer runs after each published snapshot
    assert list(tmp_path.iterdir()) == []
