"""Snapshots at scale (docs/benchmarks.md, "Start-up and the snapshot's tail, again").

- The state a start builds from a snapshot is frozen out of the cyclic garbage
  collector (snapshot.load_snapshot), so no collection walks it afterwards. Built with
  the collector off, its objects would otherwise sit in the youngest generation, and the
  first allocation after the build would run a collection over all of them (1.3 s at 1M
  accounts), the next generation another.
- The child that writes a snapshot runs at the lowest priority (snapshot.NICENESS): at
  1M accounts it works for seconds, on the cores the writer needs.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from callcredit_server import snapshot
from callcredit_server.core import CreateAccount, PutTariff, StateMachine, Tariff, TopUp
from callcredit_server.snapshot import SnapshotError, load_snapshot, write_snapshot
from tests.core.helpers import rate

ACCOUNTS = 3_000


@pytest.fixture
def snapshot_file(tmp_path: Path) -> Path:
    machine = StateMachine()
    machine.apply(PutTariff(Tariff("T", "VND", (rate(),))), 1_000)
    for n in range(ACCOUNTS):
        machine.apply(CreateAccount(f"a{n}", "VND", "T", 0, 0), 1_000)
        machine.apply(TopUp(f"a{n}", 10**6, f"k{n}", ""), 1_000)
    return write_snapshot(tmp_path, 7, machine.image(), 1_000)


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    """What a test froze goes back to the collector; the collector is left on."""
    yield
    gc.unfreeze()
    gc.enable()


def _tracked() -> set[int]:
    return {id(o) for generation in range(3) for o in gc.get_objects(generation)}


def test_the_state_a_snapshot_builds_is_frozen_out_of_the_collector(snapshot_file: Path) -> None:
    frozen = gc.get_freeze_count()
    seq, machine = load_snapshot(snapshot_file)
    assert seq == 7 and len(machine.accounts) == ACCOUNTS and gc.isenabled()
    # accounts, their idle mappings shared, a key record and its tuple key each
    assert gc.get_freeze_count() - frozen >= 2 * ACCOUNTS
    tracked = _tracked()
    assert not any(id(a) in tracked for a in machine.accounts.values())
    assert not any(id(r) in tracked for r in machine._keys.values())
    assert gc.get_count()[0] < ACCOUNTS  # not left in the youngest generation either


def test_a_load_leaves_a_disabled_collector_disabled(snapshot_file: Path) -> None:
    gc.disable()
    load_snapshot(snapshot_file)
    assert not gc.isenabled()


def test_a_damaged_snapshot_freezes_nothing(snapshot_file: Path) -> None:
    snapshot_file.write_bytes(snapshot_file.read_bytes()[:-40])  # the gzip trailer cut
    frozen = gc.get_freeze_count()
    with pytest.raises(SnapshotError):
        load_snapshot(snapshot_file)
    assert gc.get_freeze_count() == frozen and gc.isenabled()


def test_the_snapshot_child_runs_at_the_lowest_priority(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def note_priority(directory: Path, seq: int, *_: Any, **__: Any) -> Path:
        (directory / f"niceness-{seq}").write_text(str(os.nice(0)))
        return directory

    monkeypatch.setattr(snapshot, "write_snapshot", note_priority)
    parent = os.nice(0)
    pid = snapshot.fork_snapshot(StateMachine(), 3, tmp_path, 0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert (
        int((tmp_path / "niceness-3").read_text()) == min(19, parent + snapshot.NICENESS) > parent
    )
    assert os.nice(0) == parent
