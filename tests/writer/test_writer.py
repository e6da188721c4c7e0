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


def tariff(name: str) -> PutTariff:
    return PutTariff(Tariff(name, "VND", (rate(),)))


async def test_a_caller_waiting_for_room_in_the_queue_is_refused_when_the_journal_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full queue holds its callers in `put`. When the writer fails meanwhile, each of
    them is answered UNAVAILABLE once it gets in, not left in a queue no task reads."""
    monkeypatch.setattr(writer, "MAX_UNCOMMITTED_RECORDS", 1)
    monkeypatch.setattr(writer, "MAX_QUEUED_SUBMISSIONS", 1)
    monkeypatch.setattr(writer, "COMMIT_TIMEOUT_SECONDS", 1.0)
    path = tmp_path / "journal.db"
    journal = Journal(f"sqlite:///{path}")
    held = Writer(StateMachine(events=False), journal, clock_ms=lambda: 1_000, retention_ms=0)
    held.start()
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the first commit waits, then times out
    try:
        answers = []
        for name in "TUV":  # T is committing, U uncommitted, V's round waits for room
            answers.append(await held.submit([tariff(name)]))
            await asyncio.sleep(0.05)
        answers.append(await held.submit([tariff("X")]))  # the queue is full now
        blocked = asyncio.ensure_future(held.execute([tariff("Y")]))
        await asyncio.sleep(0.05)
        assert not blocked.done()  # waiting for room in the queue
        for answer in [*answers, blocked]:
            with pytest.raises(Unavailable, match="journal unavailable"):
                await asyncio.wait_for(answer, 5)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
        await held.stop()
        journal.close()


async def test_a_round_that_breaks_an_invariant_refuses_the_rest_of_its_round(
    tmp_path: Path,
) -> None:
    """A step that raises (a broken invariant: a bug) stops the writer. The submissions
    of its round, the one that raised and those after it, are answered UNAVAILABLE."""
    journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    machine = StateMachine(events=False)

    class Breaking:
        """The state machine, whose step raises on tariff B (fault injection)."""

        def __getattr__(self, name: str) -> object:
            return getattr(machine, name)

        def apply(self, command: PutTariff, now_ms: int) -> object:
            if command.tariff.tariff_id == "B":
                raise RuntimeError("an invariant broke")
            return machine.apply(command, now_ms)

    held = Writer(machine, journal, clock_ms=lambda: 1_000, retention_ms=0)
    held._core.machine = Breaking()  # type: ignore[assignment]
    held.start()
    try:
        answers = [await held.submit([tariff(name)]) for name in "ABC"]  # one round
        for answer in answers:
            with pytest.raises(Unavailable, match="an invariant broke"):
                await asyncio.wait_for(answer, 5)
    finally:
        await held.stop()
        journal.close()


async def test_a_round_takes_at_most_max_commands_per_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round holds the event loop, so it is bounded by commands as well as by
    submissions (each may carry thousands): queued together, four submissions of two
    commands each are applied in two rounds under a bound of three."""
    monkeypatch.setattr(writer, "MAX_COMMANDS_PER_ROUND", 3)
    rounds: list[int] = []
    apply_round = Writer._apply_round

    def counted(self: Writer, batch: list[writer._Submission]) -> None:
        rounds.append(sum(len(submission.commands) for submission in batch))
        apply_round(self, batch)

    monkeypatch.setattr(Writer, "_apply_round", counted)
    journal = Journal(f"sqlite:///{tmp_path / 'journal.db'}")
    held = Writer(StateMachine(events=False), journal, clock_ms=lambda: 1_000, retention_ms=0)
    held.start()
    try:
        answers = [await held.submit([tariff(f"{n}a"), tariff(f"{n}b")]) for n in range(4)]
        for answer in answers:
            await asyncio.wait_for(answer, 5)
    finally:
        await held.stop()
        journal.close()
    assert [n for n in rounds if n] == [4, 4]  # (stopping runs a round of no command)
