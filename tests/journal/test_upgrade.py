"""`callcredit-server upgrade-journal`: a version-2 journal, written by the release that
wrote version 2 (commit OLD_RELEASE, run in a process of its own), converted to
version 3 and served by this release with the same state; a corrupt one refused, and a
conversion cut short before its swap leaving version 2 working.

Every test runs on SQLite and, where CALLCREDIT_TEST_POSTGRES_URL is set, PostgreSQL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text, update
from typer.testing import CliRunner

from callcredit_server import cli
from callcredit_server import journal as journal_module
from callcredit_server.codec import encode_command
from callcredit_server.core import TopUp
from callcredit_server.journal import (
    Journal,
    JournalError,
    JournalRecord,
    engine_url,
    history_url,
)
from callcredit_server.projector import open_projector
from callcredit_server.recovery import recover
from tests.conftest import postgres_schema_url

OLD_RELEASE = "cc29d1b"  # the last commit writing schema version 2
REPO = Path(__file__).resolve().parents[2]
ROWS = 50  # UPGRADE_RECORDS_PER_ROW in these tests: several version-3 rows
SUBPROCESS_TIMEOUT_SECONDS = 120

# Run by the old release: its own random workload (tests/journal/test_journal.py of
# OLD_RELEASE), appended by its Journal in group commits of varied sizes, its events
# projected through seq `projected` (as its projector would have), pruned through
# `pruned`; prints what its memory held.
OLD_WRITER = r"""
import itertools, json, sys
import test_journal as old
from callcredit_server.codec import encode_command
from callcredit_server.core import StateMachine
from callcredit_server.journal import Journal

url, seed, projected, pruned = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
run = old.random_run(seed, 800)
with Journal(url) as journal:
    old.append_in_batches(journal, run.records, itertools.cycle([1, 7, 3, 50, 2]))
    machine = StateMachine()
    events = [
        (r.seq, r.at_ms, machine.apply(r.command, r.at_ms).events)
        for r in run.records[:projected]
    ]
    journal.project_events(events, projected)
    if pruned:
        journal.prune(pruned)
print(json.dumps({
    "records": [[r.seq, r.at_ms, *encode_command(r.command)] for r in run.records],
    "accounts": {a.account_id: [a.balance, a.reserved] for a in run.machine.accounts.values()},
    "calls": {
        c.call_id: [c.state.value, c.allowed_seconds, c.used_seconds, c.held, c.charged,
                    c.last_sequence]
        for c in run.machine.calls.values()
    },
}))
"""

# Run by the old release: replay the journal (checking every chain value), append one
# more record, and print how many records it holds.
OLD_READER = r"""
import sys
from callcredit_server.core import TopUp
from callcredit_server.journal import Journal, JournalRecord

with Journal(sys.argv[1]) as journal:
    replayed = list(journal.replay())
    seq, at_ms = replayed[-1][0] + 1, replayed[-1][1]
    journal.append([JournalRecord(seq, at_ms, TopUp("a0", 5, "after-crash", ""), (), ())])
    print(len(list(journal.replay())))
"""

# Run by this release: a conversion that dies (as if killed) just before its swap.
CRASHING_UPGRADE = r"""
import os, sys
from callcredit_server import journal
journal._swap = lambda *args: os._exit(9)
journal.upgrade_journal(sys.argv[1])
"""


@pytest.fixture(scope="module")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The old release's server package and journal tests, unpacked from git."""
    root = tmp_path_factory.mktemp("old-release")
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", OLD_RELEASE, "server", "tests/journal"],
        capture_output=True,
        check=True,
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
    )
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    return root


def run_old(old_release: Path, script: str, *args: str) -> str:
    paths = [old_release / "server", old_release / "tests" / "journal"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=old_release,
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def write_v2(old_release: Path, url: str, *, projected: int, pruned: int = 0) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(
        run_old(old_release, OLD_WRITER, url, "1", str(projected), str(pruned))
    )
    assert len(state["records"]) > 300, "too little happened"
    assert schema_version(url) == "2"
    return state


def upgrade(url: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli.app, ["upgrade-journal", "--database-url", url])
    return result.exit_code, result.output


def rows(url: str, table: str) -> list[tuple[Any, ...]]:
    engine = create_engine(engine_url(url))
    try:
        with engine.connect() as connection:
            found = connection.execute(text(f"SELECT * FROM {table} ORDER BY 1"))
            return [tuple(row) for row in found]
    finally:
        engine.dispose()


def history_of(url: str) -> str:
    """Where the server keeps the history once it opened the journal: on SQLite the
    file beside it (it moves the version-2 history there), else the same database."""
    apart = history_url(engine_url(url))
    return url if apart is None else apart.render_as_string(hide_password=False)


def tables(url: str) -> set[str]:
    engine = create_engine(engine_url(url))
    try:
        with engine.connect() as connection:
            return set(inspect(connection).get_table_names())
    finally:
        engine.dispose()


def schema_version(url: str) -> str:
    meta = dict(rows(url, "journal_meta"))
    return str(meta["schema_version"])


@pytest.fixture(autouse=True)
def small_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "UPGRADE_RECORDS_PER_ROW", ROWS)


def test_a_converted_journal_serves_the_old_state(database_url: str, old_release: Path) -> None:
    url = database_url
    projected = 150  # the old projector's events stopped here; entries and calls did not
    old = write_v2(old_release, url, projected=projected)
    last = len(old["records"])
    entries, calls = rows(url, "ledger_entries"), rows(url, "calls")
    events = rows(url, "events")
    assert entries and calls and events

    code, output = upgrade(url)
    assert code == 0, output
    assert f"converted {last} journal records (seq 1..{last})" in output
    assert schema_version(url) == "3"
    assert "journal_upgrade" not in tables(url)
    converted = rows(url, "journal")
    assert len(converted) == -(-last // ROWS)
    assert [(r[0], r[1]) for r in converted] == [
        (seq, min(seq + ROWS - 1, last)) for seq in range(1, last + 1, ROWS)
    ]

    with Journal(url) as journal:
        assert journal.last_seq() == last
        replayed = [[seq, at_ms, *encode_command(c)] for seq, at_ms, c in journal.replay()]
        assert replayed == old["records"]
        machine = recover(journal, None).machine
        accounts = {a.account_id: [a.balance, a.reserved] for a in machine.accounts.values()}
        assert accounts == old["accounts"]
        remembered = {
            c.call_id: [
                c.state.value,
                c.allowed_seconds,
                c.used_seconds,
                c.held,
                c.charged,
                c.last_sequence,
            ]
            for c in machine.calls.values()
        }
        assert remembered == old["calls"]
        # The projector picks up at the old watermark: it adds the events after it,
        # and finds the entries and calls the old writer stored already there.
        assert journal.projected_through() == projected
        projector = open_projector(journal, None)
        while projector.step():
            pass
        assert journal.projected_through() == last
        # The server goes on: the chain continues from the converted rows.
        at_ms = old["records"][-1][1]
        journal.append([JournalRecord(last + 1, at_ms, TopUp("a0", 5, "after-upgrade", ""))])
    history = history_of(url)
    assert rows(history, "ledger_entries") == entries
    assert rows(history, "calls") == calls
    after = rows(history, "events")
    assert after[: len(events)] == events
    assert len(after) > len(events) and after[-1][0] > projected
    with Journal(url) as journal:
        assert len(list(journal.replay())) == last + 1

    journal_rows = rows(url, "journal")
    code, output = upgrade(url)
    assert (code, output.strip()) == (
        0,
        "the journal is already at schema version 3: nothing to do",
    )
    assert rows(url, "journal") == journal_rows


def test_a_pruned_journal_is_chained_on_from_the_pruned_point(
    database_url: str, old_release: Path
) -> None:
    url = database_url
    old = write_v2(old_release, url, projected=0, pruned=123)
    last = len(old["records"])
    code, output = upgrade(url)
    assert code == 0, output
    assert f"converted {last - 123} journal records (seq 124..{last})" in output
    assert rows(url, "journal")[0][:2] == (124, 124 + ROWS - 1)
    with Journal(url) as journal:
        assert journal.pruned_through() == 123
        replayed = [[seq, at_ms, *encode_command(c)] for seq, at_ms, c in journal.replay(123)]
        assert replayed == old["records"][123:]
    # The first row is bound to the pruned point's chain value: with another, it fails.
    engine = create_engine(engine_url(url))
    with engine.begin() as connection:
        connection.execute(
            update(journal_module.meta_table)
            .where(journal_module.meta_table.c.name == "pruned_chain")
            .values(value="1" * 32)
        )
    engine.dispose()
    with Journal(url) as journal, pytest.raises(JournalError, match=r"seq 124\.\.173 are corrupt"):
        list(journal.replay(123))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(
            "UPDATE journal SET body = replace(body, '\"amount\":', '\"amount\": 9') "
            "WHERE seq = (SELECT min(seq) FROM journal WHERE seq > 120 AND kind = 'TopUp')",
            r"journal record seq 1[2-9]\d is corrupt",
            id="altered",
        ),
        pytest.param("DELETE FROM journal WHERE seq = 77", r"journal seq 77 is missing", id="lost"),
    ],
)
def test_a_damaged_v2_journal_is_refused_and_left_as_it_was(
    database_url: str, old_release: Path, damage: str, message: str
) -> None:
    url = database_url
    write_v2(old_release, url, projected=0)
    engine = create_engine(engine_url(url))
    with engine.begin() as connection:
        assert connection.execute(text(damage)).rowcount == 1
    engine.dispose()
    before = {table: rows(url, table) for table in ("journal", "journal_meta", "calls")}

    code, output = upgrade(url)
    assert code == 1
    assert "nothing was converted" in output
    assert re.search(message, output), output
    assert {table: rows(url, table) for table in before} == before
    assert "journal_upgrade" not in tables(url)
    with pytest.raises(JournalError, match=r"schema version 2.*callcredit-server upgrade-journal"):
        Journal(url)


def test_a_conversion_cut_short_leaves_a_working_v2_journal(
    database_url: str, old_release: Path
) -> None:
    url = database_url
    old = write_v2(old_release, url, projected=0)
    last = len(old["records"])
    before = rows(url, "journal")
    killed = subprocess.run(
        [sys.executable, "-c", CRASHING_UPGRADE, url],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_SECONDS,
    )
    assert killed.returncode == 9, killed.stderr
    assert "journal_upgrade" in tables(url)  # it had written rows when it died
    assert rows(url, "journal") == before
    assert schema_version(url) == "2"

    # The old release still serves it (every chain value checked) and writes to it.
    assert run_old(old_release, OLD_READER, url).strip() == str(last + 1)

    code, output = upgrade(url)
    assert code == 0, output
    assert f"converted {last + 1} journal records" in output
    with Journal(url) as journal:
        replayed = list(journal.replay())
    assert len(replayed) == last + 1
    assert replayed[-1][2] == TopUp("a0", 5, "after-crash", "")


def test_a_journal_whose_lease_is_held_is_refused(old_release: Path) -> None:
    """PostgreSQL only: the lease is the hot standby's, which needs PostgreSQL."""
    with postgres_schema_url("cc_upgrade", "the hot standby's lease needs PostgreSQL") as url:
        _refused_while_leased(old_release, url)


def _refused_while_leased(old_release: Path, url: str) -> None:
    write_v2(old_release, url, projected=0)
    engine = create_engine(engine_url(url))
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO journal_lease (id, owner, epoch, advertise, expires_at) "
                "VALUES (1, 'primary-1', 1, 'h:1', now() + interval '1 minute')"
            )
        )
    engine.dispose()
    code, output = upgrade(url)
    assert code == 1
    assert "server 'primary-1' holds the journal's lease" in output
    assert schema_version(url) == "2"


def test_an_empty_database_is_not_a_journal(tmp_path: Path) -> None:
    code, output = upgrade(f"sqlite:///{tmp_path / 'none.db'}")
    assert code == 1
    assert "there is no journal at this URL" in output
    assert not tables(f"sqlite:///{tmp_path / 'none.db'}")


def test_a_journal_written_during_the_conversion_is_not_swapped(
    database_url: str, old_release: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = database_url
    old = write_v2(old_release, url, projected=0)
    copy = journal_module._copy_v2

    def copy_then_write(*args: Any) -> Any:
        copied = copy(*args)
        run_old(old_release, OLD_READER, url)  # an old server still running appends
        return copied

    monkeypatch.setattr(journal_module, "_copy_v2", copy_then_write)
    code, output = upgrade(url)
    assert code == 1
    assert "the version-2 journal changed during the conversion" in output
    assert schema_version(url) == "2"
    assert len(rows(url, "journal")) == len(old["records"]) + 1
    assert "journal_upgrade" not in tables(url)
