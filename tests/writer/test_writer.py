"""The writer's asyncio shell (writer.py) on a real SQLite journal: what its waiters get
when the journal fails."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from callcredit_server import writer
from callcredit_server.core import PutTariff, StateMachine, Tariff
from callcredit_server.journal import Journal
from callcredit_server.writer import Unavailable, Writer
from tests.core.helpers import rate


async def test_a_round_waiting_for_room_is_refused_when_the_journal_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_UNCOMMITTED_RECORDS the apply task waits for a commit before its next
    round. If that commit fails instead, the round's callers are answered UNAVAILABLE
    like every other waiter, not left waiting for an answer that never comes."""
    monkeypatch.setattr(writer, "MAX_UNCOMMITTED_RECORDS", 1)
    monkeypatch.setattr(writer, "COMMIT_TIMEOUT_SECONDS", 2.0)  # V is queued well before
    path = tmp_path / "journal.db"
    journal = Journal(f"sqlite:///{path}")
    held = Writer(StateMachine(events=False), journal, clock_ms=lambda: 1_000, retention_ms=0)
    held.start()
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the writer's first commit waits, then times out
    try:
        # T's record is taken by the commit that waits; U's is applied and left for the
        # next commit (1 uncommitted: no room); V's round waits for room.
        answers = []
        for name in "TUV":
            answers.append(await held.submit([PutTariff(Tariff(name, "VND", (rate(),)))]))
            await asyncio.sleep(0.05)  # a round of its own
        for answer in answers:
            with pytest.raises(Unavailable, match="journal unavailable"):
                await asyncio.wait_for(answer, 5)
        with pytest.raises(Unavailable):
            await held.submit([PutTariff(Tariff("W", "VND", (rate(),)))])
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        await held.stop()
        journal.close()
    assert Journal(f"sqlite:///{path}").last_seq() == 0  # nothing was journaled
