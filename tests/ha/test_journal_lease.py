"""The lease row, the epoch fence and session ending in journal.py, on real PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from sqlalchemy import text

from callcredit_server import projector
from callcredit_server.core import (
    Command,
    CreateAccount,
    PutTariff,
    Rate,
    Release,
    Renew,
    Reserve,
    StateMachine,
    Takeover,
    Tariff,
    Tick,
    TopUp,
)
from callcredit_server.journal import (
    POSTGRES_COPY_MIN_ROWS,
    POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_MS,
    POSTGRES_LOCK_TIMEOUT_MS,
    Fenced,
    Journal,
    JournalError,
    JournalRecord,
    _insert,
    entries_table,
)

LEASE_MS = 5_000


def record(seq: int) -> JournalRecord:
    return JournalRecord(seq, 1_000 * seq, Tick(retention_ms=1))


def expire(journal: Journal) -> None:
    """Stand-in for time passing while the holder is paused, cut off or dead."""
    with journal.engine.begin() as conn:
        conn.execute(text("UPDATE journal_lease SET expires_at = now() - interval '1 ms'"))


@pytest.fixture
def journals(pg_url: str) -> Iterator[tuple[Journal, Journal]]:
    a, b = Journal(pg_url, owner="a"), Journal(pg_url, owner="b")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def test_two_servers_taking_an_empty_journal_at_once_one_wins(
    journals: tuple[Journal, Journal],
) -> None:
    barrier = threading.Barrier(2)
    won: dict[str, bool] = {}

    def take(journal: Journal, owner: str) -> None:
        barrier.wait()
        won[owner] = journal.take_lease(owner, f"{owner}:1", 0, 1, LEASE_MS)

    threads = [
        threading.Thread(target=take, args=(j, o)) for j, o in zip(journals, "ab", strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(won.values()) == [False, True], won
    winner = "a" if won["a"] else "b"
    row = journals[0].lease()
    assert row is not None
    assert (row.owner, row.epoch, row.advertise) == (winner, 1, f"{winner}:1")
    assert LEASE_MS - 1_000 < row.remaining_ms <= LEASE_MS
    # A live lease is not taken, at any epoch.
    loser = journals[1] if winner == "a" else journals[0]
    assert not loser.take_lease("x", "x:1", 1, 2, LEASE_MS)


def test_the_epoch_alone_refuses_a_deposed_primarys_commit(
    journals: tuple[Journal, Journal],
) -> None:
    """The zombie's batch continues the journal (seq 3 collides with nothing): only
    the epoch check stands between it and the journal."""
    a, b = journals
    assert a.take_lease("a", "a:1", 0, 1, LEASE_MS)
    a.fence(1)
    a.append([record(1), record(2)])
    expire(a)
    assert b.take_lease("b", "b:1", 1, 2, LEASE_MS)
    b.fence(2)
    assert b.last_seq() == 2  # the new primary has caught up and writes nothing yet
    with pytest.raises(Fenced, match="the lease is at epoch 2, this primary holds 1"):
        a.append([record(3)])
    assert b.last_seq() == 2
    assert not a.renew_lease("a", 1, LEASE_MS)
    b.append([record(3)])  # the same seq, from the holder of the epoch
    assert [seq for seq, _, _ in b.replay()] == [1, 2, 3]


def test_an_unfenced_append_is_not_checked(journals: tuple[Journal, Journal]) -> None:
    """SQLite and single-server PostgreSQL never call fence(): no lease row needed."""
    a, _ = journals
    a.append([record(1)])
    assert a.lease() is None


def test_renewals_extend_only_the_holders_lease_and_giving_up_frees_it(
    journals: tuple[Journal, Journal],
) -> None:
    a, b = journals
    assert a.take_lease("a", "a:1", 0, 1, LEASE_MS)
    assert not b.renew_lease("b", 1, LEASE_MS)
    assert not a.renew_lease("a", 2, LEASE_MS)
    expire(a)
    assert a.renew_lease("a", 1, LEASE_MS)  # expired but not taken: still ours to renew
    row = a.lease()
    assert row is not None and row.remaining_ms > 0
    assert not b.take_lease("b", "b:1", 1, 2, LEASE_MS)
    a.give_up_lease("a", 1)
    row = b.lease()
    assert row is not None and row.remaining_ms < 0
    assert b.take_lease("b", "b:1", 1, 2, LEASE_MS)


def test_a_paused_commit_holds_the_takeover_until_its_sessions_are_ended(
    pg_url: str, journals: tuple[Journal, Journal]
) -> None:
    """A primary paused inside a commit holds the lease row FOR SHARE: the takeover's
    UPDATE fails on lock_timeout, and succeeds once the old owner's sessions end."""
    a, b = journals
    assert a.take_lease("a", "a:1", 0, 1, LEASE_MS)
    expire(a)
    # The paused commit, on a session named as server a's are.
    conninfo = a.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    paused = psycopg.connect(conninfo, application_name="callcredit:a")
    try:
        paused.execute("SELECT epoch FROM journal_lease WHERE id = 1 FOR SHARE")
        started = time.monotonic()
        with pytest.raises(JournalError, match="lock timeout"):
            b.take_lease("b", "b:1", 1, 2, LEASE_MS)
        assert time.monotonic() - started >= POSTGRES_LOCK_TIMEOUT_MS / 1000 - 0.1
        assert b.end_sessions("a") >= 1
        assert b.take_lease("b", "b:1", 1, 2, LEASE_MS)
        with pytest.raises(psycopg.OperationalError):
            paused.execute("SELECT 1")
    finally:
        paused.close()


def test_the_journals_sessions_bound_their_waits(journals: tuple[Journal, Journal]) -> None:
    a, _ = journals
    with a.engine.connect() as conn:
        lock = conn.execute(text("SHOW lock_timeout")).scalar()
        idle = conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar()
        name = conn.execute(text("SHOW application_name")).scalar()
    assert lock == f"{POSTGRES_LOCK_TIMEOUT_MS // 1000}s"
    assert idle == f"{POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_MS // 1000}s"
    assert name == "callcredit:a"


def test_many_ends_rewrite_their_rows_through_copy_and_renewals_and_a_takeover_write_none(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above POSTGRES_COPY_MIN_ROWS the projector's rows go through COPY (call rows
    inserted, then rewritten when the calls end, all but call_seq and account; entries
    and events inserted): the same rows result, and a projector behind takes none back
    and stores no entry or event twice. Renewals of calls open since an earlier read,
    and a Takeover (it restarts every open call's validity in memory: its record is O(1)
    however many calls are open), write no call row."""
    monkeypatch.setattr(projector, "MAX_RECORDS_PER_STEP", 50_000)  # one step, one COPY
    calls = POSTGRES_COPY_MIN_ROWS + 10
    machine = StateMachine()
    commands: list[Command] = [PutTariff(Tariff("t", "VND", (Rate("", 60_000_000, 1, 1, 0),)))]
    for n in range(calls):
        commands += [
            CreateAccount(f"a{n}", "VND", "t", 0, 0),
            TopUp(f"a{n}", 1_000, "seed", ""),
            Reserve(f"c{n}", f"a{n}", "84901234567", 60, 60, 120),
        ]
    records: list[JournalRecord] = []

    def journaled(command: Command, at_ms: int) -> JournalRecord:
        machine.apply(command, at_ms)
        records.append(JournalRecord(len(records) + 1, at_ms, command))
        return records[-1]

    opened = [journaled(command, 1_000) for command in commands]
    renewed = [journaled(Renew(f"c{n}", 1, 1, 60, 60, 120), 9_000) for n in range(calls)]
    takeover = journaled(Takeover(epoch=2), 30_000)
    ended = [journaled(Release(f"c{n}", 45), 40_000) for n in range(calls)]
    with Journal(pg_url) as journal:
        journal.append(opened)
        projecting = projector.open_projector(journal, None)
        assert projecting.step() == len(opened)
        rows_opened = [journal.get_call(f"c{n}") for n in range(calls)]
        assert rows_opened[0] is not None and rows_opened[0].expires_at_ms == 1_000 + 120_000
        for batch in (renewed, [takeover]):
            journal.append(batch)
            assert projecting.step() == len(batch)
            assert [journal.get_call(f"c{n}") for n in range(calls)] == rows_opened
        assert machine.calls["c0"].expires_at_ms == 30_000 + 120_000  # the takeover's, in memory
        journal.append(ended)
        assert projecting.step() == len(ended)
        rows_ended = [journal.get_call(f"c{n}") for n in range(calls)]
        assert rows_ended == [machine.calls[f"c{n}"].record() for n in range(calls)]
        history = "SELECT (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM events)"
        with journal.engine.connect() as conn:
            stored_history = tuple(conn.execute(text(history)).one())
        assert min(stored_history) >= POSTGRES_COPY_MIN_ROWS  # they went through COPY too
        late = projector.Projector(journal, StateMachine(), 0)  # redoes it all
        assert late.step() == len(records)
        with journal.engine.connect() as conn:
            assert tuple(conn.execute(text(history)).one()) == stored_history  # none twice
            rows = conn.execute(text("SELECT count(*), min(seq), max(seq) FROM calls")).one()
        assert [journal.get_call(f"c{n}") for n in range(calls)] == rows_ended
    assert tuple(rows) == (calls, ended[0].seq, ended[-1].seq)


def test_through_copy_an_entry_already_stored_is_kept_as_it_is(pg_url: str) -> None:
    """Entries are inserted once (ON CONFLICT DO NOTHING), through COPY as through
    executemany: a row for the same entry from a later seq (other amounts) does not
    replace it."""
    rows: list[tuple[object, ...]] = [
        (n, "a", "TOP_UP", 5, 5 * n, "", "", f"k{n}", 1_000, 1)
        for n in range(1, POSTGRES_COPY_MIN_ROWS + 1)
    ]
    later: list[tuple[object, ...]] = [(*row[:3], 7, 7, *row[5:9], 2) for row in rows]
    with Journal(pg_url) as journal:
        for batch in (rows, later):
            with journal.engine.begin() as connection:
                _insert(connection, entries_table, batch, key="entry_id")
        with journal.engine.connect() as connection:
            stored = connection.execute(
                text("SELECT amount, seq FROM ledger_entries ORDER BY entry_id")
            ).all()
    assert [tuple(row) for row in stored] == [(5, 1)] * len(rows)


def test_a_copy_leaves_its_staging_table_empty_for_the_next_in_the_same_transaction(
    pg_url: str,
) -> None:
    """A projection may COPY into one table twice in a transaction (its new calls, then
    its ended ones): the second upsert must take its own rows only, not the first's
    again, which are still staged until commit unless emptied."""
    rows: list[tuple[object, ...]] = [
        (n, "a", "TOP_UP", 5, 5 * n, "", "", f"k{n}", 1_000, 1)
        for n in range(1, POSTGRES_COPY_MIN_ROWS + 1)
    ]
    with Journal(pg_url) as journal, journal.engine.begin() as connection:
        _insert(connection, entries_table, rows, key="entry_id")
        staged = connection.execute(text("SELECT count(*) FROM _staging_ledger_entries"))
        assert staged.scalar() == 0
