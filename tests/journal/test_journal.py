"""The journal's persistence contract: SQLite always, PostgreSQL when a URL is given.

Every test taking the `url` or `journal` fixture runs once per backend. Set
CALLCREDIT_TEST_POSTGRES_URL (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/test)
to run the PostgreSQL half; each PostgreSQL test gets a schema of its own, dropped
afterwards, so runs never see each other's rows.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sqlite3
import threading
import time
import typing
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, delete, event, insert, select, update
from sqlalchemy import inspect as sqlalchemy_inspect
from sqlalchemy.engine import make_url

from callcredit_server import core
from callcredit_server import journal as journal_module
from callcredit_server.codec import KINDS, CodecError, decode_command, encode_command
from callcredit_server.core import (
    AccountStatus,
    Adjust,
    CallRecord,
    CallState,
    Command,
    CreateAccount,
    EntryKind,
    GrantResult,
    LedgerEntry,
    PutTariff,
    Rate,
    Refused,
    Release,
    ReleaseOutcome,
    Renew,
    Reserve,
    StateMachine,
    Step,
    Takeover,
    Tariff,
    Tick,
    TickResult,
    TopUp,
    UpdateAccount,
)
from callcredit_server.journal import (
    MAX_READ_ROWS,
    MAX_RECORDS_PER_APPEND,
    Journal,
    JournalError,
    JournalRecord,
    Projected,
    chain_after,
    engine_url,
    history_metadata,
    history_url,
    journal_table,
    meta_table,
)
from callcredit_server.projector import open_projector

POSTGRES_URL_ENV = "CALLCREDIT_TEST_POSTGRES_URL"
POSTGRES_SKIP = "CALLCREDIT_TEST_POSTGRES_URL not set: PostgreSQL journal tests skipped"

# ---------------------------------------------------------------- fixtures


def _postgres_base_url() -> str:
    base = os.environ.get(POSTGRES_URL_ENV)
    if not base:
        pytest.skip(POSTGRES_SKIP)
    return base


@contextlib.contextmanager
def _postgres_schema(base: str, *options: str) -> Iterator[str]:
    """A URL whose connections live in a fresh schema, dropped on exit."""
    schema = f"callcredit_test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(engine_url(base))
    try:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
        url = engine_url(base).update_query_dict(
            {"options": " ".join([f"-csearch_path={schema}", *options])}
        )
        try:
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.begin() as connection:
                connection.exec_driver_sql(f'DROP SCHEMA "{schema}" CASCADE')
    finally:
        admin.dispose()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    ]
)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A journal URL no other test uses, on each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'journal.db'}"
        return
    with _postgres_schema(_postgres_base_url()) as schema_url:
        yield schema_url


@pytest.fixture
def journal(url: str) -> Iterator[Journal]:
    with Journal(url) as opened:
        yield opened


@pytest.fixture
def sqlite_journal(tmp_path: Path) -> Iterator[Journal]:
    with Journal(f"sqlite:///{tmp_path / 'journal.db'}") as opened:
        yield opened


# ---------------------------------------------------------------- builders

RATE = Rate("", 60_000_000, 1, 1, 0)  # 1 minor unit per second
RATE_84 = Rate("84", 120_000_000, 60, 60, 100)  # 2 per second, per minute, fee 100


def entry(
    entry_id: int,
    account_id: str = "acme",
    *,
    amount: int = 100,
    kind: EntryKind = EntryKind.TOP_UP,
    call_id: str = "",
    at_ms: int = 1_000,
) -> LedgerEntry:
    return LedgerEntry(
        entry_id=entry_id,
        account_id=account_id,
        kind=kind,
        amount=amount,
        balance_after=amount * entry_id,
        call_id=call_id,
        reference=f"ref {entry_id}",
        idempotency_key=f"key-{entry_id}" if kind is EntryKind.TOP_UP else "",
        created_at_ms=at_ms,
    )


def call(
    call_id: str,
    call_seq: int,
    account_id: str = "acme",
    *,
    state: CallState = CallState.ACTIVE,
    used_seconds: int = 0,
    last_sequence: int = 0,
) -> CallRecord:
    active = state is CallState.ACTIVE
    return CallRecord(
        call_id=call_id,
        call_seq=call_seq,
        account_id=account_id,
        destination="84901234567",
        state=state,
        allowed_seconds=120,
        used_seconds=used_seconds,
        held=340 if active else 0,
        charged=0 if active else 340,
        shortfall=0,
        rate=RATE_84,
        started_at_ms=1_000 + call_seq,
        ended_at_ms=None if active else 90_000,
        final=used_seconds > 60,
        expires_at_ms=61_000 if active else None,
        last_sequence=last_sequence,
    )


def record(seq: int, *, at_ms: int | None = None, command: Command | None = None) -> JournalRecord:
    return JournalRecord(
        seq=seq,
        at_ms=1_000 * seq if at_ms is None else at_ms,
        command=Tick(retention_ms=seq) if command is None else command,
    )


def history(
    seq: int, *, entries: Sequence[LedgerEntry] = (), calls: Sequence[CallRecord] = ()
) -> Projected:
    """What a projector derived from record `seq` (written here, not derived: the rows
    are the test's)."""
    return Projected(seq, 1_000 * seq, (), tuple(entries), tuple(calls))


def store(journal: Journal, projected: Sequence[Projected]) -> None:
    """Append a record for each, then project them, as the writer and projector do."""
    journal.append([record(p.seq) for p in projected])
    journal.project(projected, projected[-1].seq)


def replayed(journal: Journal, after_seq: int = 0) -> list[tuple[int, int, Command]]:
    return list(journal.replay(after_seq))


def all_calls(journal: Journal, account_id: str) -> list[CallRecord]:
    return journal.list_calls(
        account_id, active_only=False, before_call_seq=None, limit=MAX_READ_ROWS
    )


# ---------------------------------------------------------------- codec

TARIFF = Tariff("vn-std", "VND", (RATE, RATE_84, Rate("8490", 0, 30, 6, 1_000_000_000)))

CODEC_CASES = [
    pytest.param(CreateAccount("acme", "VND", "vn-std", 0, 0), id="create-account"),
    pytest.param(CreateAccount("b", "USD", "t", 10**15, 1_000_000), id="create-account-limits"),
    pytest.param(UpdateAccount("acme"), id="update-account-nothing"),
    pytest.param(UpdateAccount("acme", status=AccountStatus.SUSPENDED), id="update-status"),
    pytest.param(
        UpdateAccount("acme", AccountStatus.CLOSED, "vn-2", 0, 0), id="update-account-everything"
    ),
    pytest.param(UpdateAccount("acme", credit_limit=0), id="update-credit-limit-zero"),
    pytest.param(TopUp("acme", 500_000, "inv-1", "invoice 2024-001"), id="top-up"),
    pytest.param(TopUp("acme", 1, "k", 'nul\x00 é 🎉 "quoted" \\'), id="top-up-odd-text"),
    pytest.param(Adjust("acme", -(10**15), "adj-1", "goodwill"), id="adjust-negative"),
    pytest.param(PutTariff(TARIFF), id="put-tariff"),
    pytest.param(PutTariff(Tariff("empty", "VND", ())), id="put-tariff-no-rates"),
    pytest.param(Reserve("c1", "acme", "+84901234567", 0, 60, 120), id="reserve"),
    pytest.param(Renew("c1", 2**63 - 1, 86_400, 600, 600, 120), id="renew-max-sequence"),
    # A distinct value in every field: a decoder that swapped two of them fails.
    pytest.param(Reserve("c2", "acme", "84", 1, 2, 3), id="reserve-distinct-fields"),
    pytest.param(Renew("c2", 1, 2, 3, 4, 5), id="renew-distinct-fields"),
    pytest.param(Release("c1", 95), id="release"),
    pytest.param(Tick(retention_ms=86_400_000), id="tick"),
    # Refused commands are journaled when expiries happened in their step.
    pytest.param(TopUp("", -5, "", ""), id="invalid-top-up"),
    pytest.param(Reserve("bad id!", "x" * 500, "abc", -1, 10**30, 0), id="invalid-reserve"),
]


@pytest.mark.parametrize("command", CODEC_CASES)
def test_codec_round_trips_each_kind(command: Command) -> None:
    kind, body = encode_command(command)
    assert kind == KINDS[type(command)]
    assert body.isascii()
    assert body == json.dumps(json.loads(body), separators=(",", ":"))  # compact
    assert decode_command(kind, body) == command


def test_codec_covers_every_command_type() -> None:
    assert set(KINDS) == set(typing.get_args(Command))
    assert len(set(KINDS.values())) == len(KINDS)


def test_codec_kind_names_never_change() -> None:
    """Journals on disk hold these names: renaming one makes old journals unreadable."""
    assert sorted(KINDS.values()) == [
        "Adjust",
        "CreateAccount",
        "PutTariff",
        "Release",
        "Renew",
        "Reserve",
        "Takeover",
        "Tick",
        "TopUp",
        "UpdateAccount",
    ]


_texts = st.text(st.characters(exclude_categories=()), max_size=20)  # surrogates too
_ints = st.integers()
_rates = st.builds(Rate, _texts, _ints, _ints, _ints, _ints)
_tariffs = st.builds(
    Tariff, tariff_id=_texts, currency=_texts, rates=st.lists(_rates, max_size=4).map(tuple)
)
_commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(CreateAccount, _texts, _texts, _texts, _ints, _ints),
    st.builds(
        UpdateAccount,
        _texts,
        st.none() | st.sampled_from(AccountStatus),
        st.none() | _texts,
        st.none() | _ints,
        st.none() | _ints,
    ),
    st.builds(TopUp, _texts, _ints, _texts, _texts),
    st.builds(Adjust, _texts, _ints, _texts, _texts),
    st.builds(PutTariff, _tariffs),
    st.builds(Reserve, _texts, _texts, _texts, _ints, _ints, _ints),
    st.builds(Renew, _texts, _ints, _ints, _ints, _ints, _ints),
    st.builds(Release, _texts, _ints),
    st.builds(Tick, _ints),
    st.builds(Takeover, _ints),
)


@given(_commands)
def test_codec_round_trips_any_command(command: Command) -> None:
    kind, body = encode_command(command)
    assert body.isascii()
    assert decode_command(kind, body) == command


def test_codec_reads_a_body_it_did_not_write_byte_for_byte() -> None:
    """The fast path takes only the exact text the encoder writes; other spacing, key
    orders and escapes go through the strict decoder, to the same command."""
    command = TopUp("acme", 5, "k", "caf\u00e9 \u0000")
    kind, body = encode_command(command)
    fields = json.loads(body)
    spaced = json.dumps(fields, indent=1)
    reordered = json.dumps(dict(reversed(fields.items())), separators=(",", ":"))
    utf8 = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
    assert len({body, spaced, reordered, utf8}) == 4
    for text in (body, spaced, reordered, utf8):
        assert decode_command(kind, text) == command


@pytest.mark.parametrize(
    ("kind", "body", "message"),
    [
        pytest.param("Frobnicate", "{}", "unknown command kind", id="unknown-kind"),
        pytest.param("Tick", "{not json", "not JSON", id="not-json"),
        pytest.param("Tick", "[1]", "expected an object", id="not-an-object"),
        pytest.param("Tick", "{}", "retention_ms: missing", id="missing-key"),
        pytest.param("Tick", '{"retention_ms":1,"x":2}', "unexpected keys", id="extra-key"),
        pytest.param("Tick", '{"retention_ms":"1"}', "expected an integer", id="string-for-int"),
        pytest.param("Tick", '{"retention_ms":true}', "expected an integer", id="bool-for-int"),
        pytest.param("Tick", '{"retention_ms":1.0}', "expected an integer", id="float-for-int"),
        pytest.param("Tick", '{"retention_ms":NaN}', "not a JSON number", id="nan"),
        pytest.param(
            "Tick", '{"retention_ms":1,"retention_ms":2}', "duplicate key", id="duplicate-key"
        ),
        pytest.param(
            "PutTariff",
            '{"tariff":{"tariff_id":"t","tariff_id":"u","currency":"VND","rates":[]}}',
            "duplicate key",
            id="nested-duplicate-key",
        ),
        pytest.param(
            "Release", '{"call_id":7,"used_seconds":1}', "expected a string", id="int-for-string"
        ),
        pytest.param(
            "UpdateAccount",
            '{"account_id":"a","status":"ASLEEP"}',
            "unknown status",
            id="unknown-status",
        ),
        pytest.param(
            "UpdateAccount", '{"account_id":"a","credit_limit":null}', "integer", id="null-optional"
        ),
        pytest.param(
            "PutTariff",
            '{"tariff":{"tariff_id":"t","currency":"VND","rates":{}}}',
            "expected a list",
            id="rates-not-a-list",
        ),
        pytest.param(
            "PutTariff",
            '{"tariff":{"tariff_id":"t","currency":"VND","rates":[{"prefix":""}]}}',
            "tariff.rates[0].price_per_minute_micros: missing",
            id="rate-incomplete",
        ),
    ],
)
def test_codec_refuses_malformed_bodies(kind: str, body: str, message: str) -> None:
    with pytest.raises(CodecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode_command(kind, body)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: TopUp("acme", True, "k", ""), id="bool-amount"),
        pytest.param(lambda: Tick(retention_ms=1.5), id="float-retention"),  # type: ignore[arg-type]
        pytest.param(lambda: UpdateAccount("a", status="ACTIVE"), id="plain-str-status"),  # type: ignore[arg-type]
        pytest.param(lambda: PutTariff(Tariff("t", "VND", [RATE])), id="rates-not-a-tuple"),  # type: ignore[arg-type]
    ],
)
def test_codec_refuses_to_encode_what_it_could_not_decode(build: Callable[[], Command]) -> None:
    """Pure Python keeps what a command was built with, and the codec refuses it. The
    compiled core checks each field's type as a command is built: it refuses most such
    commands outright, and stores a bool given for an int as that int, which the codec
    then writes and reads back as it is."""
    try:
        command = build()
    except TypeError:
        assert core.COMPILED
        return
    try:
        kind, body = encode_command(command)
    except CodecError:
        return
    assert core.COMPILED and decode_command(kind, body) == command


@pytest.mark.parametrize(
    ("given", "drivername"),
    [
        pytest.param("postgresql://u@h/db", "postgresql+psycopg", id="bare-postgresql"),
        pytest.param("postgres://u@h/db", "postgresql+psycopg", id="postgres-alias"),
        pytest.param("postgresql+psycopg://u@h/db", "postgresql+psycopg", id="psycopg-kept"),
        pytest.param("sqlite:///x.db", "sqlite", id="sqlite-kept"),
    ],
)
def test_engine_url_takes_postgresql_to_mean_psycopg(given: str, drivername: str) -> None:
    assert engine_url(given).drivername == drivername


# ---------------------------------------------------------------- append / replay


def test_append_then_replay_gives_commands_in_order(journal: Journal) -> None:
    commands: list[Command] = [
        PutTariff(TARIFF),
        CreateAccount("acme", "VND", "vn-std", 0, 0),
        TopUp("acme", 500, "k1", "first"),
        Reserve("c1", "acme", "84901", 0, 60, 120),
        Renew("c1", 1, 10, 0, 60, 120),
        Release("c1", 20),
        UpdateAccount("acme", status=AccountStatus.SUSPENDED),
        Adjust("acme", -10, "k2", "fix"),
        Tick(retention_ms=86_400_000),
    ]
    records = [record(i + 1, at_ms=5_000 + i, command=c) for i, c in enumerate(commands)]
    assert journal.last_seq() == 0
    assert replayed(journal) == []
    journal.append(records[:4])
    journal.append(records[4:5])
    journal.append(records[5:])
    assert journal.last_seq() == len(commands)
    assert replayed(journal) == [(r.seq, r.at_ms, r.command) for r in records]
    assert replayed(journal, after_seq=6) == [(r.seq, r.at_ms, r.command) for r in records[6:]]
    assert replayed(journal, after_seq=len(commands)) == []


def test_empty_append_changes_nothing(journal: Journal) -> None:
    journal.append([])
    assert journal.last_seq() == 0


def test_replay_reads_page_by_page(journal: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "REPLAY_PAGE_SIZE", 7)
    for seq in range(1, 31):
        journal.append([record(seq)])  # a row each
    selects: list[str] = []

    def count(*args: object) -> None:
        statement = str(args[2]).upper()
        page = "ORDER BY" in statement and "DESC" not in statement  # not a lookup of one row
        if statement.lstrip().startswith("SELECT") and page:
            selects.append(statement)

    event.listen(journal.engine, "before_cursor_execute", count)
    stream = journal.replay(after_seq=2)
    assert next(stream)[0] == 3
    assert len(selects) == 1  # one page read, not the whole journal
    assert [seq for seq, _, _ in stream] == list(range(4, 31))
    assert len(selects) == 5  # 28 records: 4 full pages of 7, then one that finds none


def test_reopening_sees_everything(url: str) -> None:
    projected = [
        history(1, entries=[entry(1)], calls=[call("c1", 1)]),
        history(2, entries=[entry(2, "beta")], calls=[call("c1", 1, state=CallState.RELEASED)]),
    ]
    with Journal(url) as first:
        store(first, projected)
    with Journal(url) as second:  # a new engine, a new pool: only the database remembers
        assert second.last_seq() == second.projected_through() == 2
        assert replayed(second) == [(r.seq, r.at_ms, r.command) for r in map(record, (1, 2))]
        assert second.list_entries("acme", 0, 10) == [entry(1)]
        assert second.list_entries("beta", 0, 10) == [entry(2, "beta")]
        assert second.get_call("c1") == call("c1", 1, state=CallState.RELEASED)
        second.append([record(3)])
    with Journal(url) as third:
        assert third.last_seq() == 3


# ---------------------------------------------------------------- atomicity

STORED = [
    history(1, entries=[entry(1)], calls=[call("c1", 1)]),
    history(2, entries=[entry(2)], calls=[call("c2", 2)]),
]
GOOD = record(3)
GOOD_HISTORY = history(3, entries=[entry(3)], calls=[call("c3", 3), call("c1", 1, used_seconds=30)])

FAILING_BATCHES = [
    pytest.param([record(4)], False, id="gap-after-stored"),
    pytest.param([GOOD, record(5)], False, id="gap-inside-batch"),
    pytest.param([record(2), GOOD], False, id="seq-repeated"),
    pytest.param([record(3, at_ms=1_999), record(4)], False, id="time-back-from-stored"),
    pytest.param([GOOD, record(4, at_ms=2_500)], False, id="time-back-inside-batch"),
    # Not a command (pure Python or compiled, nothing the codec can write).
    pytest.param([GOOD, record(4, command=object())], True, id="cannot-encode"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("batch", "has_cause"), FAILING_BATCHES)
def test_a_failed_batch_leaves_nothing_of_itself(
    journal: Journal, batch: list[JournalRecord], has_cause: bool
) -> None:
    store(journal, STORED)
    before = replayed(journal)
    with pytest.raises(JournalError) as raised:
        journal.append(batch)
    assert (raised.value.__cause__ is not None) == has_cause
    assert journal.last_seq() == 2
    assert replayed(journal) == before
    # The failed transaction is gone entirely: the right next batch goes through.
    journal.append([GOOD])
    assert journal.last_seq() == 3


FAILING_PROJECTIONS = [
    pytest.param(history(4, calls=[call("other", 1)]), id="call-seq-taken"),
    pytest.param(history(4, entries=[entry(4, amount=2**63)]), id="beyond-int64"),
]


@pytest.mark.parametrize("bad", FAILING_PROJECTIONS)
def test_a_failed_projection_leaves_nothing_of_itself(journal: Journal, bad: Projected) -> None:
    store(journal, STORED)
    journal.append([GOOD, record(4)])
    before = (journal.list_entries("acme", 0, 100), all_calls(journal, "acme"))
    with pytest.raises(JournalError) as raised:
        journal.project([GOOD_HISTORY, bad], 4)
    assert raised.value.__cause__ is not None
    assert journal.projected_through() == 2
    assert (journal.list_entries("acme", 0, 100), all_calls(journal, "acme")) == before
    assert journal.get_call("c3") is None
    # The failed transaction is gone entirely: the right projection goes through.
    journal.project([GOOD_HISTORY], 3)
    assert journal.projected_through() == 3
    assert journal.get_call("c1") == call("c1", 1, used_seconds=30)


def test_a_projection_done_twice_or_late_stores_each_row_once(journal: Journal) -> None:
    """Two projectors (a primary's and a standby's), or one redoing records after a
    restart: entries are kept once, a call row only moves to a later snapshot, and the
    watermark never goes back."""
    store(journal, [*STORED, GOOD_HISTORY])
    rows = (journal.list_entries("acme", 0, 100), all_calls(journal, "acme"))
    journal.project([*STORED, GOOD_HISTORY], 3)  # the same again
    journal.project(STORED, 2)  # a projector behind: c1's older snapshot, watermark 2
    assert (journal.list_entries("acme", 0, 100), all_calls(journal, "acme")) == rows
    assert journal.get_call("c1") == call("c1", 1, used_seconds=30)
    assert journal.projected_through() == 3


def test_an_open_calls_row_waits_for_its_end_and_a_reused_id_replaces_it(
    journal: Journal,
) -> None:
    """`calls_before` (the projector's last call_seq before the records) says which calls
    were stored by an earlier projection. While such a call is open, its later
    snapshots (renewals) stay in memory; once it ends, its row moves to its last
    snapshot but for call_seq and account, which a call never changes. A call created
    in the records replaces a row whole, even one an ended call left under the same id."""
    store(journal, STORED)  # c1 and c2 open, as their reserves left them
    journal.append([GOOD, record(4), record(5)])
    renewed = call("c1", 1, used_seconds=30, last_sequence=1)
    journal.project([history(3, calls=[renewed])], 3, calls_before=2)
    assert journal.get_call("c1") == call("c1", 1)
    ended = call("c1", 1, state=CallState.RELEASED, used_seconds=61, last_sequence=2)
    journal.project([history(4, calls=[ended])], 4, calls_before=2)
    assert journal.get_call("c1") == ended
    # A (wrong) last snapshot of c2 under another account and call_seq: those two stay.
    moved = call("c2", 9, "other", state=CallState.EXPIRED)
    journal.project([history(5, calls=[moved])], 5, calls_before=9)
    assert journal.get_call("c2") == moved._replace(call_seq=2, account_id="acme")
    # The id c1 used again, long after, by a new call of another account.
    journal.append([record(6)])
    reused = call("c1", 10, "other")
    journal.project([history(6, calls=[reused])], 6, calls_before=9)
    assert journal.get_call("c1") == reused
    assert [c.call_id for c in all_calls(journal, "other")] == ["c1"]
    assert [c.call_id for c in all_calls(journal, "acme")] == ["c2"]


def test_a_prune_never_passes_the_projection(journal: Journal) -> None:
    """The records the projector has not derived its rows from yet must stay."""
    store(journal, STORED)
    journal.append([record(3), record(4)])
    with pytest.raises(JournalError, match=r"projection .* is at seq 2"):
        journal.prune(3)
    assert journal.pruned_through() == 0
    assert journal.prune(2) == 2


def test_seqs_must_start_at_one(journal: Journal) -> None:
    with pytest.raises(JournalError, match="ends at seq 0"):
        journal.append([record(2)])
    assert journal.last_seq() == 0


# ---------------------------------------------------------------- history reads


def test_list_entries_pages_one_account_in_increasing_order(journal: Journal) -> None:
    entries = [entry(i, "acme" if i % 3 else "beta", at_ms=i) for i in range(1, 61)]
    store(journal, [history(1, entries=entries[:30]), history(2, entries=entries[30:])])
    acme = [e for e in entries if e.account_id == "acme"]
    pages: list[list[LedgerEntry]] = []
    after = 0
    while page := journal.list_entries("acme", after, 15):
        pages.append(page)
        after = page[-1].entry_id
    assert [len(p) for p in pages] == [15, 15, 10]
    assert [e for p in pages for e in p] == acme
    assert journal.list_entries("acme", 0, MAX_READ_ROWS) == acme
    assert journal.list_entries("acme", 7, 2) == [acme[5], acme[6]]  # ids 8, 10
    assert journal.list_entries("beta", 0, 100) == [e for e in entries if e.account_id == "beta"]
    assert journal.list_entries("acme", 60, 10) == []
    assert journal.list_entries("nobody", 0, 10) == []


def test_list_entries_newest_first_pages_back_from_the_newest(journal: Journal) -> None:
    entries = [entry(i, "acme" if i % 3 else "beta", at_ms=i) for i in range(1, 31)]
    store(journal, [history(1, entries=entries)])
    newest_first = [e for e in entries if e.account_id == "acme"][::-1]
    pages: list[list[LedgerEntry]] = []
    after = 0
    while page := journal.list_entries("acme", after, 8, newest_first=True):
        pages.append(page)
        after = page[-1].entry_id
    assert [len(p) for p in pages] == [8, 8, 4]
    assert [e for p in pages for e in p] == newest_first
    assert journal.list_entries("acme", 10, 2, newest_first=True) == newest_first[-6:-4]  # 8, 7
    assert journal.list_entries("acme", 1, 10, newest_first=True) == []


def test_list_calls_newest_first_active_only_and_paged(journal: Journal) -> None:
    states = [CallState.ACTIVE, CallState.RELEASED, CallState.EXPIRED]
    acme = [call(f"a{i}", i, state=states[i % 3]) for i in range(1, 11)]  # call_seq 1..10
    beta = [call(f"b{i}", 100 + i, "beta") for i in range(3)]
    store(journal, [history(1, calls=acme[:5] + beta), history(2, calls=acme[5:])])
    newest_first = acme[::-1]
    assert all_calls(journal, "acme") == newest_first
    assert (
        journal.list_calls("acme", active_only=False, before_call_seq=None, limit=4)
        == (newest_first[:4])
    )
    assert (
        journal.list_calls("acme", active_only=False, before_call_seq=7, limit=4)
        == (newest_first[4:8])
    )
    assert (
        journal.list_calls("acme", active_only=False, before_call_seq=3, limit=4)
        == (newest_first[8:])
    )
    active = [c for c in newest_first if c.state is CallState.ACTIVE]
    assert [c.call_seq for c in active] == [9, 6, 3]
    assert journal.list_calls("acme", active_only=True, before_call_seq=None, limit=10) == active
    assert journal.list_calls("acme", active_only=True, before_call_seq=9, limit=1) == [active[1]]
    assert all_calls(journal, "beta") == beta[::-1]
    assert all_calls(journal, "nobody") == []


def test_get_call(journal: Journal) -> None:
    ended = call("c1", 1, state=CallState.EXPIRED, used_seconds=61, last_sequence=4)
    store(journal, [history(1, calls=[ended])])
    assert journal.get_call("c1") == ended
    assert journal.get_call("c2") is None


def test_call_upsert_keeps_the_latest_snapshot(journal: Journal) -> None:
    store(
        journal,
        [
            history(1, calls=[call("c1", 1), call("c2", 2)]),
            history(2, calls=[call("c1", 1, used_seconds=10, last_sequence=1)]),
            history(3, calls=[call("c1", 1, used_seconds=20, last_sequence=2)]),
        ],
    )
    assert journal.get_call("c1") == call("c1", 1, used_seconds=20, last_sequence=2)
    released = call("c1", 1, state=CallState.RELEASED, used_seconds=25, last_sequence=2)
    store(journal, [history(4, calls=[released])])
    assert journal.get_call("c1") == released
    assert journal.get_call("c2") == call("c2", 2)
    assert all_calls(journal, "acme") == [call("c2", 2), released]


# ---------------------------------------------------------------- replay of real runs


class Recorder:
    """A state machine run, journaled the way the writer does it."""

    def __init__(self) -> None:
        self.machine = StateMachine()
        self.records: list[JournalRecord] = []
        self.history: list[Projected] = []  # what each record did, as the run saw it

    def apply(self, command: Command, at_ms: int) -> Step:
        step = self.machine.apply(command, at_ms)
        if step.changed:
            seq = len(self.records) + 1
            self.records.append(JournalRecord(seq, at_ms, command))
            self.history.append(Projected(seq, at_ms, (), tuple(step.entries), tuple(step.calls)))
        return step


def append_in_batches(journal: Journal, records: list[JournalRecord], sizes: Iterator[int]) -> None:
    start = 0
    while start < len(records):
        size = next(sizes)
        journal.append(records[start : start + size])
        start += size


def assert_replay_rebuilds(url: str, run: Recorder) -> StateMachine:
    """Reopen, replay into a fresh machine, and compare state and history with the run."""
    original = run.machine
    fresh = StateMachine()
    with Journal(url) as journal:
        replay = list(journal.replay())
        assert [seq for seq, _, _ in replay] == [r.seq for r in run.records]
        for (seq, at_ms, command), expected, did in zip(
            replay, run.records, run.history, strict=True
        ):
            assert (at_ms, command) == (expected.at_ms, expected.command)
            step = fresh.apply(command, at_ms)
            assert step.changed, f"seq {seq} changed nothing on replay"
            assert tuple(step.entries) == did.entries, f"seq {seq}"
            assert tuple(step.calls) == did.calls, f"seq {seq}"
        assert original.audit() == []
        assert fresh.audit() == []
        for account_id in original.accounts:
            assert fresh.account(account_id) == original.account(account_id)
            assert fresh.open_calls(account_id) == original.open_calls(account_id)
        assert fresh.accounts == original.accounts
        assert fresh.tariffs == original.tariffs
        assert fresh.calls == original.calls
        for call_id in original.calls:
            assert fresh.call(call_id) == original.call(call_id)
        # Steps that changed nothing moved the original's clock but are not journaled:
        # the rebuilt clock stands at the last journaled step, which is all state needs.
        assert fresh.now_ms == run.records[-1].at_ms <= original.now_ms
        assert (fresh.last_entry_id, fresh.last_call_seq, fresh.ledger_total) == (
            original.last_entry_id,
            original.last_call_seq,
            original.ledger_total,
        )
        # History, once the projector has derived it from the journal: every entry, and
        # each call's last snapshot, is in the database.
        projector = open_projector(journal, None)
        while projector.step():
            pass
        entries = [e for r in run.history for e in r.entries]
        for account_id in original.accounts:
            mine = [e for e in entries if e.account_id == account_id]
            assert journal.list_entries(account_id, 0, MAX_READ_ROWS) == mine
        latest: dict[str, CallRecord] = {}
        for r in run.history:
            latest.update((c.call_id, c) for c in r.calls)
        for call_id, snapshot in latest.items():
            assert journal.get_call(call_id) == snapshot
            remembered = original.call(call_id)
            if remembered is not None:
                assert snapshot == remembered  # the database is never behind memory
        # (The expiry heaps may differ by stale entries that unjournaled steps popped;
        # next_expiry_ms is a hint. What matters is that both go on identically.) The
        # original goes on itself (nothing reads it after this), the replay on a second
        # one: a machine compiled by mypyc cannot be deep-copied.
        again = StateMachine()
        for _, at_ms, command in journal.replay():
            again.apply(command, at_ms)
    future_ms = original.now_ms + 7 * 86_400_000
    going_on = [m.apply(Tick(86_400_000), future_ms) for m in (original, again)]
    assert going_on[0] == going_on[1]
    return fresh


def test_replay_rebuilds_a_scripted_run(url: str) -> None:
    run = Recorder()
    day_ms = 86_400_000
    tariff = Tariff("std", "VND", (RATE, RATE_84))
    assert not isinstance(run.apply(PutTariff(tariff), 1_000).outcome, Refused)
    run.apply(CreateAccount("acme", "VND", "std", 0, 0), 1_000)
    run.apply(CreateAccount("beta", "VND", "std", 500, 2), 1_000)
    run.apply(TopUp("acme", 10_000, "inv-1", "invoice 1"), 2_000)
    reserved = run.apply(Reserve("c1", "acme", "+84901234567", 120, 120, 60), 3_000).outcome
    assert isinstance(reserved, GrantResult)
    assert reserved.grant.held == 340  # fee 100 + 2 minutes at 120 per minute
    run.apply(Reserve("c2", "acme", "123", 0, 60, 30), 4_000)  # silent: expires at 34 s
    renewed = run.apply(Renew("c1", 1, 20, 120, 120, 60), 30_000).outcome
    assert isinstance(renewed, GrantResult)
    # One grant beyond what was used; held at the per-minute price of 180 seconds.
    assert (renewed.grant.allowed_seconds, renewed.grant.held) == (140, 460)
    released = run.apply(Release("c1", 95), 33_000).outcome
    assert isinstance(released, ReleaseOutcome)
    assert released.result.charged == 340
    ticked = run.apply(Tick(retention_ms=day_ms), 35_000).outcome
    assert ticked == TickResult(expired=1, forgotten=0)
    late = run.apply(Release("c2", 10), 36_000).outcome  # re-rated: refund 60 - 10
    assert isinstance(late, ReleaseOutcome)
    assert late.result.charged == 10
    run.apply(Adjust("acme", -500, "adj-1", "goodwill reversal"), 37_000)
    run.apply(TopUp("beta", 50, "inv-2", ""), 37_500)
    run.apply(UpdateAccount("beta", status=AccountStatus.SUSPENDED), 38_000)
    journaled = len(run.records)
    refused = run.apply(Reserve("c4", "beta", "555", 0, 60, 120), 38_500).outcome
    assert isinstance(refused, Refused)
    repeat = run.apply(TopUp("acme", 10_000, "inv-1", "invoice 1"), 38_600)
    assert not repeat.changed
    assert len(run.records) == journaled  # refusals and repeats are not journaled
    run.apply(UpdateAccount("beta", status=AccountStatus.ACTIVE, credit_limit=1_000), 39_000)
    run.apply(Reserve("c3", "beta", "555", 0, 60, 120), 40_000)  # still open at the end
    forgot = run.apply(Tick(retention_ms=10_000), 60_000).outcome
    assert isinstance(forgot, TickResult)
    assert forgot.forgotten >= 2
    assert run.machine.call("c1") is None  # memory forgot it; history did not
    run.apply(TopUp("acme", 100, "inv-3", "after the window"), 60_500)

    kinds = {e.kind for r in run.history for e in r.entries}
    assert kinds == set(EntryKind)

    with Journal(url) as journal:
        append_in_batches(journal, run.records, iter([3, 1, 5, 2, 100]))
    fresh = assert_replay_rebuilds(url, run)
    with Journal(url) as journal:
        c1 = journal.get_call("c1")
        assert c1 is not None
        assert (c1.state, c1.used_seconds, c1.charged) == (CallState.RELEASED, 95, 340)
        c2 = journal.get_call("c2")
        assert c2 is not None
        assert (c2.state, c2.charged) == (CallState.EXPIRED, 10)
        assert [c.call_id for c in all_calls(journal, "acme")] == ["c2", "c1"]
        active = journal.list_calls("beta", active_only=True, before_call_seq=None, limit=10)
        assert [c.call_id for c in active] == ["c3"]
    # The idempotency keys came back too: a retry after restart is still a repeat.
    retry = fresh.apply(TopUp("acme", 100, "inv-3", "after the window"), 61_000)
    assert not retry.changed


def random_run(seed: int, steps: int) -> Recorder:
    """A seeded workload over three accounts: funds run out, calls expire, keys repeat."""
    rng = random.Random(seed)
    run = Recorder()
    at_ms = 1_000
    run.apply(PutTariff(Tariff("std", "VND", (RATE, RATE_84))), at_ms)
    accounts = ["a0", "a1", "a2"]
    for i, account_id in enumerate(accounts):
        run.apply(CreateAccount(account_id, "VND", "std", 200 * i, i), at_ms)
    for step in range(steps):
        at_ms += rng.choice([0, 0, 10, 1_000, 2_000, 5_000, 15_000, 70_000])
        account_id = rng.choice(accounts)
        open_ids = [c.call_id for c in run.machine.calls.values() if c.state is CallState.ACTIVE]
        if open_ids and rng.random() < 0.8:
            call_id = rng.choice(open_ids)  # mostly talk about live calls
        else:
            call_id = f"c{rng.randrange(step + 1)}"  # new, ended, repeated or unknown
        known = run.machine.calls.get(call_id)
        used = (known.used_seconds if known else 0) + rng.choice([0, 5, 30, 90])
        roll = rng.random()
        command: Command
        if roll < 0.15:
            command = TopUp(account_id, rng.randint(1, 3_000), f"k{rng.randrange(40)}", "")
        elif roll < 0.20:
            amount = rng.randint(1, 800) * rng.choice([-1, 1])
            command = Adjust(account_id, amount, f"k{rng.randrange(40)}", "adjust")
        elif roll < 0.45:
            requested = rng.choice([0, 30, 120])
            command = Reserve(
                f"c{step}" if rng.random() < 0.8 else call_id,
                account_id,
                rng.choice(["84901", "+84902", "123"]),
                requested,
                min(requested or 60, 600),
                rng.choice([10, 30, 60]),
            )
        elif roll < 0.65:
            sequence = (known.last_sequence if known else 0) + rng.choice([0, 1, 1, 1])
            command = Renew(call_id, max(sequence, 1), used, 60, 60, rng.choice([10, 30, 60]))
        elif roll < 0.85:
            command = Release(call_id, used)
        elif roll < 0.92:
            status = rng.choice([None, AccountStatus.ACTIVE, AccountStatus.SUSPENDED])
            credit_limit = rng.choice([None, 0, 500])
            command = UpdateAccount(account_id, status=status, credit_limit=credit_limit)
        else:
            command = Tick(retention_ms=rng.choice([60_000, 600_000]))
        run.apply(command, at_ms)
    return run


@pytest.mark.parametrize("seed", [pytest.param(seed, id=f"seed-{seed}") for seed in (1, 2, 3)])
def test_replay_rebuilds_a_seeded_random_run(url: str, seed: int) -> None:
    run = random_run(seed, steps=400)
    assert len(run.records) > 150, f"seed {seed}: too little happened"
    kinds = {e.kind for r in run.history for e in r.entries}
    assert {EntryKind.CALL_CHARGE, EntryKind.EXPIRY_CHARGE} <= kinds, f"seed {seed}"
    rng = random.Random(seed)
    with Journal(url) as journal:
        append_in_batches(journal, run.records, iter(lambda: rng.randint(1, 40), None))
    assert_replay_rebuilds(url, run)


# ---------------------------------------------------------------- corrupt journals


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        pytest.param("Frobnicate", "{}", id="unknown-kind"),
        pytest.param("TopUp", '{"account_id":"acme"}', id="malformed-body"),
        pytest.param("TopUp", "garbage", id="not-json"),
    ],
)
def test_replay_names_the_seq_of_a_bad_record(journal: Journal, kind: str, body: str) -> None:
    journal.append([record(1)])
    with journal.engine.begin() as connection:  # as if written by another version
        previous = connection.execute(select(journal_table.c.chain)).scalar_one()
        row = json.dumps([[2_000, "Tick", '{"retention_ms":1}'], [2_000, kind, body]])
        chain = chain_after(previous, 2, 3, 2_000, row)
        connection.execute(
            insert(journal_table),
            [{"seq": 2, "last_seq": 3, "at_ms": 2_000, "body": row, "chain": chain}],
        )
    stream = journal.replay()
    assert next(stream) == (1, 1_000, Tick(retention_ms=1))  # streamed up to the bad row
    with pytest.raises(JournalError, match="journal seq 3") as raised:
        next(stream)
    assert isinstance(raised.value.__cause__, CodecError)


def test_a_tail_in_small_steps_through_a_group_commit_reads_every_record_once(
    journal: Journal,
) -> None:
    """A tail stopping inside one row reads it again on its next call (the projector's
    and the standby's polls); what it returns is the row's records, in order, once."""
    journal.append([record(seq) for seq in range(1, 51)])
    journal.append([record(51)])
    stepped: list[tuple[int, int, Command]] = []
    while batch := journal.tail(stepped[-1][0] if stepped else 0, 7):
        stepped.extend(batch)
    assert stepped == replayed(journal)
    assert [seq for seq, _, _ in stepped] == list(range(1, 52))
    assert journal.tail(30, 3) == replayed(journal, 30)[:3]  # back inside the first row


@pytest.mark.parametrize(
    ("row", "last_seq", "message"),
    [
        pytest.param("garbage", 2, "seq 2..2: the row is not JSON", id="not-json"),
        pytest.param('[[2000,"Tick","{}"]]', 3, "does not hold 2 records", id="too-few"),
        pytest.param('[[2000,"Tick"]]', 2, r"seq 2: not \[at_ms, kind, body\]", id="short"),
        pytest.param('[[1000,"Tick","{\\"retention_ms\\":1}"]]', 2, "not its last", id="time"),
    ],
)
def test_replay_refuses_a_row_that_does_not_hold_its_records(
    journal: Journal, row: str, last_seq: int, message: str
) -> None:
    journal.append([record(1)])
    with journal.engine.begin() as connection:  # checksummed, but not as append writes
        previous = connection.execute(select(journal_table.c.chain)).scalar_one()
        chain = chain_after(previous, 2, last_seq, 2_000, row)
        connection.execute(
            insert(journal_table),
            [{"seq": 2, "last_seq": last_seq, "at_ms": 2_000, "body": row, "chain": chain}],
        )
    with pytest.raises(JournalError, match=message):
        replayed(journal)


def test_append_refuses_to_follow_a_record_another_writer_added(journal: Journal) -> None:
    # The appender knows the tail after its first commit and does not re-read it;
    # a record written behind its back is still caught (seq is the primary key).
    journal.append([record(1)])
    with journal.engine.begin() as connection:
        connection.execute(
            insert(journal_table),
            [{"seq": 2, "last_seq": 2, "at_ms": 2_000, "body": "[]", "chain": "x"}],
        )
    with pytest.raises(JournalError, match=r"append of journal seq 2\.\.2 failed"):
        journal.append([record(2)])
    # After a failure the tail is read again, and the conflict is named.
    with pytest.raises(JournalError, match="does not continue the journal, which ends at seq 2"):
        journal.append([record(2)])


def test_replay_refuses_a_missing_seq(journal: Journal) -> None:
    for seq in range(1, 6):
        journal.append([record(seq)])
    with journal.engine.begin() as connection:
        connection.execute(delete(journal_table).where(journal_table.c.seq == 3))
    with pytest.raises(JournalError, match="seq 3 is missing"):
        replayed(journal)
    with pytest.raises(JournalError, match="seq 3 is missing: cannot verify"):
        replayed(journal, after_seq=3)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        pytest.param("body", '{"retention_ms":2}', id="altered-body"),
        pytest.param("at_ms", 2_500, id="altered-time"),
        pytest.param("chain", "f" * 32, id="altered-checksum"),
        pytest.param("last_seq", 4, id="altered-span"),
    ],
)
def test_replay_stops_at_a_corrupt_record_and_names_it(
    journal: Journal, column: str, value: object
) -> None:
    journal.append([record(1), record(2)])
    journal.append([record(3)])
    journal.append([record(4), record(5)])
    with journal.engine.begin() as connection:
        connection.execute(
            update(journal_table).where(journal_table.c.seq == 3).values({column: value})
        )
    stream = journal.replay()
    assert [next(stream)[0], next(stream)[0]] == [1, 2]
    with pytest.raises(JournalError, match=r"journal records seq 3\.\.\d are corrupt"):
        next(stream)


def test_pruned_records_are_gone_and_the_rest_still_verifies(journal: Journal) -> None:
    for seq in range(1, 11):
        store(journal, [history(seq)])  # a row each
    assert journal.prune(4) == 4
    assert (journal.pruned_through(), journal.last_seq()) == (4, 10)
    assert [seq for seq, _, _ in journal.replay(after_seq=4)] == list(range(5, 11))
    with pytest.raises(JournalError, match="journal seq 1 is missing"):
        replayed(journal)
    store(journal, [history(11), history(12), history(13)])  # appends go on: one row
    assert journal.prune(12) == 6  # whole rows only: 5..10, not into the row 11..13
    assert (journal.pruned_through(), journal.last_seq()) == (10, 13)
    assert [seq for seq, _, _ in journal.replay(after_seq=11)] == [12, 13]  # mid-row
    assert journal.prune(13) == 3  # everything: the journal table is empty now
    assert journal.last_seq() == 13
    journal.append([record(14)])
    assert [seq for seq, _, _ in journal.replay(after_seq=13)] == [14]


def test_a_journal_of_the_previous_format_is_refused_by_name(url: str) -> None:
    with Journal(url) as journal, journal.engine.begin() as connection:
        connection.execute(
            update(meta_table).where(meta_table.c.name == "schema_version").values(value="2")
        )
    with pytest.raises(JournalError, match="schema version 2 \\(one row per record\\)"):
        Journal(url)


# ---------------------------------------------------------------- threads


def test_readers_run_beside_the_writer(journal: Journal) -> None:
    """One appending and projecting thread, four reading ones: no errors, and no half
    batch is seen."""
    batches = 150
    done = threading.Event()
    errors: list[BaseException] = []

    def guarded(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                work()
            except BaseException as exc:
                errors.append(exc)
                done.set()

        return run

    def write() -> None:
        for seq in range(1, batches + 1):
            calls = [call(f"c{seq % 10}", seq % 10 + 1, used_seconds=seq)]
            store(
                journal, [history(seq, entries=[entry(2 * seq - 1), entry(2 * seq)], calls=calls)]
            )
        done.set()

    def read() -> None:
        seen = 0
        while not done.is_set():
            last = journal.projected_through()
            assert last >= seen
            seen = last
            entries = journal.list_entries("acme", 0, MAX_READ_ROWS)
            assert len(entries) >= 2 * last
            assert len(entries) % 2 == 0  # both entries of a record, or neither
            assert journal.projected_through() * 2 >= len(entries)
            for snapshot in all_calls(journal, "acme"):
                assert snapshot.used_seconds % 10 == snapshot.call_seq - 1

    threads = [threading.Thread(target=guarded(write))]
    threads += [threading.Thread(target=guarded(read)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert journal.last_seq() == batches


# ---------------------------------------------------------------- limits and lifecycle


def test_limits_are_enforced_before_any_io(sqlite_journal: Journal) -> None:
    too_many = [record(seq) for seq in range(1, MAX_RECORDS_PER_APPEND + 2)]
    with pytest.raises(ValueError, match="at most"):
        sqlite_journal.append(too_many)
    for limit in (0, -1, MAX_READ_ROWS + 1):
        with pytest.raises(ValueError, match="limit"):
            sqlite_journal.list_entries("acme", 0, limit)
        with pytest.raises(ValueError, match="limit"):
            sqlite_journal.list_calls("acme", active_only=False, before_call_seq=None, limit=limit)
    with pytest.raises(ValueError, match="after_seq"):
        sqlite_journal.replay(after_seq=-1)  # at the call, not at the first next()
    assert sqlite_journal.last_seq() == 0


def test_a_closed_journal_refuses_everything(url: str) -> None:
    journal = Journal(url)
    journal.close()
    attempts: list[Callable[[], object]] = [
        lambda: journal.append([record(1)]),
        journal.replay,
        journal.last_seq,
        lambda: journal.list_entries("acme", 0, 10),
        lambda: all_calls(journal, "acme"),
        lambda: journal.get_call("c1"),
    ]
    for attempt in attempts:
        with pytest.raises(JournalError, match="closed"):
            attempt()
    journal.close()  # closing twice is harmless


def test_an_unreachable_database_is_a_journal_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(JournalError) as raised:
        Journal(f"sqlite:///{blocker / 'journal.db'}")
    assert raised.value.__cause__ is not None


# ---------------------------------------------------------------- SQLite specifics


def test_sqlite_connections_use_wal_and_synchronous_full(sqlite_journal: Journal) -> None:
    engine = sqlite_journal.engine
    with engine.connect() as first, engine.connect() as second:  # two pooled connections
        for connection in (first, second):
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
            busy_ms = connection.exec_driver_sql("PRAGMA busy_timeout").scalar()
            assert busy_ms == journal_module.SQLITE_BUSY_TIMEOUT_MS


def test_the_projectors_journal_does_not_wait_for_the_disk_and_cannot_append(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    with Journal(url) as journal:
        journal.append([record(1)])
    with Journal(url, durable=False) as projecting:
        with projecting.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        with pytest.raises(JournalError, match="an append on a journal opened with durable"):
            projecting.append([record(2)])
        with pytest.raises(JournalError, match="taking the lease on a journal opened"):
            projecting.take_lease("a", "", 0, 1, 5_000)
        with pytest.raises(JournalError, match="renewing the lease on a journal opened"):
            projecting.renew_lease("a", 1, 5_000)
        assert projecting.last_seq() == 1


def test_sqlite_writer_takes_the_write_lock_first(sqlite_journal: Journal) -> None:
    statements: list[str] = []

    def log(*args: object) -> None:
        statements.append(" ".join(str(args[2]).split()[:2]))

    event.listen(sqlite_journal.engine, "before_cursor_execute", log)
    sqlite_journal.append([record(1)])
    assert statements[0] == "BEGIN IMMEDIATE"
    statements.clear()
    sqlite_journal.last_seq()
    assert statements[0] == "BEGIN"  # readers take no lock (WAL)


def test_sqlite_creates_the_parent_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "journal.db"
    with Journal(f"sqlite:///{path}") as journal:
        journal.append([record(1)])
    assert path.is_file()


def _tables(engine: Engine) -> set[str]:
    with engine.connect() as connection:
        return set(sqlalchemy_inspect(connection).get_table_names())


HISTORY_TABLES = {t.name for t in history_metadata.sorted_tables}


def test_sqlite_the_history_is_a_file_of_its_own_whose_lock_appends_never_take(
    tmp_path: Path,
) -> None:
    """SQLite has one write lock per file: the projector's transactions lock the history
    file, and the writer's appends go on beside one that holds it."""
    with Journal(f"sqlite:///{tmp_path / 'journal.db'}") as journal:
        store(journal, STORED)
        assert (tmp_path / "journal.db-history").is_file()
        assert not HISTORY_TABLES & _tables(journal.engine)
        assert _tables(journal.history_engine) >= HISTORY_TABLES
        projecting = sqlite3.connect(tmp_path / "journal.db-history", isolation_level=None)
        try:
            projecting.execute("BEGIN IMMEDIATE")  # as a projector's step holds it
            projecting.execute("DELETE FROM ledger_entries")
            started = time.monotonic()
            journal.append([record(3), record(4)])  # would wait SQLITE_BUSY_TIMEOUT_MS
            assert time.monotonic() - started < 1.0
        finally:
            projecting.execute("ROLLBACK")
            projecting.close()
        assert journal.last_seq() == 4
        assert [e.entry_id for e in journal.list_entries("acme", 0, 10)] == [1, 2]


def rows_in_the_file(path: Path) -> int:
    """The journal rows in the database file itself, not in its WAL (immutable: SQLite
    then reads no WAL): what checkpoints have copied there."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as raw:
        if not raw.execute("SELECT 1 FROM sqlite_master WHERE name = 'journal'").fetchall():
            return 0
        return int(raw.execute("SELECT count(*) FROM journal").fetchone()[0])


def test_sqlite_a_commit_leaves_the_checkpoint_to_checkpoint(tmp_path: Path) -> None:
    """A checkpoint run by a commit holds every answer waiting for it: commits run one
    only past the backstop, and `checkpoint` (the writer's, off its commit path) copies
    the WAL into the file."""
    path = tmp_path / "journal.db"
    with Journal(f"sqlite:///{path}") as journal:
        with journal.engine.connect() as connection:
            pages = connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar()
        assert pages == journal_module.SQLITE_AUTOCHECKPOINT_PAGES
        for seq in range(1, 51):
            journal.append([record(seq)])
        assert rows_in_the_file(path) == 0
        journal.checkpoint()
        assert rows_in_the_file(path) == 50
        assert journal.last_seq() == 50


def test_history_url_names_the_file_beside_the_journal() -> None:
    assert history_url(make_url("sqlite:////var/lib/cc/journal.db")) == make_url(
        "sqlite:////var/lib/cc/journal.db-history"
    )
    uri = make_url("sqlite:///file:/var/lib/cc/j.db?mode=rwc&uri=true")
    assert history_url(uri) == make_url("sqlite:///file:/var/lib/cc/j.db-history?mode=rwc&uri=true")
    assert history_url(make_url("postgresql+psycopg://h/db")) is None


def test_sqlite_a_history_file_left_by_another_journal_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with Journal(f"sqlite:///{tmp_path / 'a' / 'journal.db'}") as journal:
        store(journal, STORED)
    shutil.copyfile(tmp_path / "a" / "journal.db-history", tmp_path / "b" / "journal.db-history")
    with pytest.raises(JournalError, match=r"derived from another journal .* move it away"):
        Journal(f"sqlite:///{tmp_path / 'b' / 'journal.db'}")
    (tmp_path / "b" / "journal.db-history").unlink()
    with Journal(f"sqlite:///{tmp_path / 'b' / 'journal.db'}") as fresh:
        assert fresh.projected_through() == 0


def _as_an_earlier_release_left_it(tmp_path: Path, keep_history_file: bool) -> str:
    """A SQLite journal whose projection (STORED, GOOD_HISTORY through seq 3) is in the
    journal's own file, as releases before the history file kept it; with
    `keep_history_file`, also (in part) in the history file, as a move cut short
    between its copy and its drop leaves it."""
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    with Journal(url) as journal:
        store(journal, [*STORED, GOOD_HISTORY])
        with journal.history_engine.connect() as source:
            rows = {t.name: source.execute(select(t)).all() for t in history_metadata.sorted_tables}
        with journal.engine.begin() as target:
            for table in history_metadata.sorted_tables:
                if table.name != "history_meta":
                    table.create(target)
                    if rows[table.name]:  # STORED has no events
                        target.execute(insert(table), [row._asdict() for row in rows[table.name]])
    if keep_history_file:  # not through Journal, which would move the history now
        with contextlib.closing(sqlite3.connect(tmp_path / "journal.db-history")) as history:
            history.execute("DELETE FROM calls WHERE call_id = 'c3'")
            history.execute("DELETE FROM projection")
            history.commit()
    else:
        for leftover in tmp_path.glob("journal.db-history*"):
            leftover.unlink()
    return url


@pytest.mark.parametrize("cut_short", [False, True], ids=["first-start", "move-cut-short"])
def test_sqlite_the_history_an_earlier_release_kept_in_the_journal_file_is_moved(
    tmp_path: Path, cut_short: bool
) -> None:
    url = _as_an_earlier_release_left_it(tmp_path, keep_history_file=cut_short)
    with Journal(url) as journal:
        assert not HISTORY_TABLES & _tables(journal.engine)
        assert journal.projected_through() == 3
        assert [e.entry_id for e in journal.list_entries("acme", 0, 10)] == [1, 2, 3]
        assert sorted(c.call_id for c in all_calls(journal, "acme")) == ["c1", "c2", "c3"]
        assert journal.get_call("c1") == call("c1", 1, used_seconds=30)
        assert [seq for seq, _, _ in replayed(journal)] == [1, 2, 3]


def test_sqlite_the_projectors_journal_does_not_move_the_history(tmp_path: Path) -> None:
    """The copy must be on disk before the drop: only a durable journal moves it."""
    url = _as_an_earlier_release_left_it(tmp_path, keep_history_file=False)
    with pytest.raises(JournalError, match="the server moves it into its own file"):
        Journal(url, durable=False)
    with Journal(url) as journal:
        assert journal.projected_through() == 3


@pytest.mark.parametrize(
    "memory_url",
    [pytest.param("sqlite://", id="default"), pytest.param("sqlite:///:memory:", id="memory")],
)
def test_sqlite_in_memory_is_refused(memory_url: str) -> None:
    with pytest.raises(JournalError, match="not durable"):
        Journal(memory_url)


# ---------------------------------------------------------------- PostgreSQL specifics


def test_postgresql_bare_url_opens_with_psycopg() -> None:
    base = _postgres_base_url()
    bare = engine_url(base).set(drivername="postgresql")
    with _postgres_schema(bare.render_as_string(hide_password=False)) as url:
        assert url.startswith("postgresql+psycopg://")
        with Journal(url.replace("postgresql+psycopg://", "postgresql://", 1)) as journal:
            assert journal.engine.dialect.driver == "psycopg"
            journal.append([record(1)])
            assert journal.last_seq() == 1


def test_postgresql_synchronous_commit_off_is_raised_to_on() -> None:
    with (
        _postgres_schema(_postgres_base_url(), "-csynchronous_commit=off") as url,
        Journal(url) as journal,
        journal.engine.connect() as connection,
    ):
        assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"


def test_postgresql_the_projectors_journal_commits_asynchronously() -> None:
    with (
        _postgres_schema(_postgres_base_url()) as url,
        Journal(url, durable=False) as projecting,
        projecting.engine.connect() as connection,
    ):
        assert connection.exec_driver_sql("SHOW synchronous_commit").scalar() == "off"
        with pytest.raises(JournalError, match="an append on a journal opened with durable"):
            projecting.append([record(1)])
