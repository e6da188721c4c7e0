"""Bugs the simulation found in server code, each kept as the smallest case that showed it.

- verify() compared a snapshot's image, clock included, with the state replayed to its
  seq; steps that journal nothing move the clock, so healthy snapshots were reported
  as differing. Fixed: verify compares images without their clock.
"""

from __future__ import annotations

from pathlib import Path

from callcredit_server.core import (
    Command,
    CreateAccount,
    PutTariff,
    Rate,
    StateMachine,
    Tariff,
    Tick,
    TopUp,
)
from callcredit_server.journal import Journal, JournalRecord
from callcredit_server.recovery import recover, verify
from callcredit_server.snapshot import write_snapshot

T0_MS = 1_750_000_000_000
DAY_MS = 86_400_000


def test_verify_accepts_a_snapshot_taken_after_a_step_that_journaled_nothing(
    tmp_path: Path,
) -> None:
    journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    try:
        machine = StateMachine()
        commands: list[Command] = [
            PutTariff(Tariff("T", "VND", (Rate("", 60_000_000, 1, 1, 0),))),
            CreateAccount("A", "VND", "T", 0, 0),
            TopUp("A", 1_000, "k1", "ref"),
        ]
        records = []
        for seq, command in enumerate(commands, start=1):
            machine.apply(command, T0_MS)
            records.append(JournalRecord(seq, T0_MS, command))
        journal.append(records)
        # The writer's tick: nothing expires or leaves the window, so nothing is journaled,
        # but the machine's clock moves on.
        assert machine.apply(Tick(DAY_MS), T0_MS + 250).changed is False
        # What writer._maybe_snapshot() writes after the next commit.
        write_snapshot(tmp_path / "snapshots", len(records), machine.image(), machine.now_ms)

        # Recovery uses the snapshot, and rightly: it holds exactly the journaled state.
        recovered = recover(journal, tmp_path / "snapshots")
        assert recovered.snapshot_seq == len(records)
        assert recovered.machine.account("A") == machine.account("A")
        # ... but verify() calls it damaged.
        assert verify(journal, tmp_path / "snapshots").problems == []
    finally:
        journal.close()
