"""The write-ahead journal: every state change, in order, and its projections.

The journal is command-sourced. Each command that changed state (`Step.changed`)
is a record with a gap-free `seq` and the time the state machine was given
(`at_ms`); replaying them in order through a fresh `StateMachine` rebuilds the
identical state, because the machine reads no clock of its own. A group commit
(`append`) stores its records as ONE row, keyed by its first seq and holding the
records' times and commands, with one checksum; the seqs stay per record (cursors,
the projection's watermark and a standby's tail count records, not rows). A reply is
released only after `append` returns. `append` writes nothing else: the writer's path
is that one row.

Memory does not keep history. What history reads need (the ledger entries of each
step, the latest snapshot of every call) and the changefeed's events are derived
from the durable journal by the projector (projector.py), a process of its own that
re-applies the records, and stored by `project` in its transactions, each with its
watermark (`projected_through`). A history read first waits until the watermark
covers what it must see (service.py); nothing acknowledged, and no recovery, reads
these tables. On SQLite they are in a file of their own beside the journal's
(`history_url`: journal.db -> journal.db-history): SQLite has one write lock per file,
and the projector's transactions must not hold the one the writer's appends take. A
journal file from an earlier release, which held them itself, has them moved there
when the server opens it (`_move_history`).

The interface is narrow on purpose (exchange-core's journal is the model):
`append` (one transaction per batch: group commit), `replay`, `last_seq`, `project`,
and the reads of the projection. It runs on any SQLAlchemy database; SQLite (the
default) and PostgreSQL (production) are tuned and tested.

Threads: one writer thread calls `append`, other threads call the reads. Each
checkout gets its own connection from the pool. On SQLite, WAL lets readers run
beside the writer, and the writer takes the write lock when it begins
(`BEGIN IMMEDIATE`), so "seq continues the journal" is checked and acted on
atomically even if a second process opened the same file. On PostgreSQL the
primary key fences a second writer the same way: its batch fails on the seq.

Exceptions::

    Exception
     +-- JournalError   opening, writing or reading failed. Whatever the cause
     |                  (database, codec, a seq gap), the server must fail-stop:
     |                  it can no longer prove what is durable. The cause is chained.
     +-- ValueError     a caller bug (batch too large, limit out of range), raised
                        before any I/O.

Limits (TigerStyle: a bound on everything):

- `MAX_RECORDS_PER_APPEND` records in one transaction (writer.py commits at most
  MAX_RECORDS_PER_COMMIT = 20,000, well inside it);
- `REPLAY_PAGE_SIZE` seqs per replay query (the rows starting in them: at most that
  many records plus one row's), so replay memory does not grow with the journal and no
  connection is held while the caller works;
- `MAX_READ_ROWS` rows per history read (`limit` must be 1..MAX_READ_ROWS);
- the pool: `POOL_SIZE` + `POOL_MAX_OVERFLOW` connections, a checkout waits at most
  `POOL_TIMEOUT_SECONDS`; SQLite waits at most `SQLITE_BUSY_TIMEOUT_MS` for a lock;
  PostgreSQL at most `POSTGRES_LOCK_TIMEOUT_MS`, and ends a session left idle in a
  transaction after `POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_MS` (a paused process
  must not hold the journal's locks for ever).

Hot standby (PostgreSQL only, docs/operations.md): the `journal_lease` row says
which server is primary, at which epoch, until when (the database's clock). Once
`fence(epoch)` is called, every `append` first reads that row FOR SHARE in its own
transaction and writes nothing unless the epoch is still `epoch` (`Fenced`): a
deposed primary can never commit again, and a takeover (an UPDATE of the row)
waits for a commit in flight, so commits are totally ordered around it. The
decisions (when to take, renew, step down) are lease.py's; this module runs the
statements.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import inspect as sqlalchemy_inspect
from sqlalchemy.engine import URL, Dialect, make_url

from callcredit_server.codec import (
    CodecError,
    Projected,
    Rows,
    decode_command,
    decode_row,
    encode_command,
    history_rows,
)
from callcredit_server.core.commands import Command
from callcredit_server.core.events import Event, EventImageError, event_from_image
from callcredit_server.core.model import (
    CallRecord,
    CallState,
    EntryKind,
    LedgerEntry,
    Rate,
)
from callcredit_server.lease import LeaseRow

__all__ = [
    "MAX_READ_ROWS",
    "MAX_RECORDS_PER_APPEND",
    "REPLAY_PAGE_SIZE",
    "UPGRADE_RECORDS_PER_ROW",
    "Fenced",
    "Journal",
    "JournalError",
    "JournalRecord",
    "Projected",
    "StoredEvent",
    "Upgraded",
    "calls_table",
    "engine_url",
    "entries_table",
    "events_table",
    "history_metadata",
    "history_url",
    "journal_table",
    "metadata",
    "projection_table",
    "upgrade_journal",
    "v2_chain_after",
]

MAX_RECORDS_PER_APPEND = 50_000  # one transaction; bounds the memory of one append
REPLAY_PAGE_SIZE = 1_000  # seqs per replay query: flat memory, short connections
MAX_READ_ROWS = 10_000  # rows per history read (the API pages at 1,000, asks limit + 1)
POOL_SIZE = 5  # connections kept: the writer plus a few history readers
POOL_MAX_OVERFLOW = 10  # more under a burst of reads, closed when returned
POOL_TIMEOUT_SECONDS = 30.0  # a checkout waits this long, then fails (JournalError)
SQLITE_BUSY_TIMEOUT_MS = 10_000  # a locked SQLite file is retried this long
# A durable connection's commit checkpoints the WAL itself only past this many pages
# (4 KiB each): a backstop that bounds the WAL. The writer checkpoints it off its commit
# path (`checkpoint`, writer.py) long before, since a checkpoint run by a commit holds
# every answer that waits for that commit.
SQLITE_AUTOCHECKPOINT_PAGES = 10_000
POSTGRES_CONNECT_TIMEOUT_SECONDS = 10  # libpq's connect_timeout
POSTGRES_TCP_USER_TIMEOUT_MS = 15_000  # unacknowledged data this old fails the connection
POSTGRES_LOCK_TIMEOUT_MS = 2_000  # a statement waiting this long for a lock fails
POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_MS = 10_000  # the server ends such a session
_SCHEMA_LOCK = 0x63616C6C  # PostgreSQL advisory lock key ("call") around table creation
APPLICATION_NAME_PREFIX = "callcredit:"  # + the server's owner id: whose sessions to end
POSTGRES_TERMINATE_WAIT_MS = 1_000  # end_sessions waits this long for each to be gone
# PostgreSQL: an upsert of this many rows or more goes through COPY into a temporary
# table, then one INSERT ... SELECT (several times faster than executemany, whose
# client side cost the projector ~30 µs a row): the projector's reads of a busy
# journal, and a new primary's Takeover, which rewrites the history row of every open
# call (100,000 of them at scale) in one projection.
POSTGRES_COPY_MIN_ROWS = 100

# Dialects whose INSERT ... ON CONFLICT is used: the projection runs on these only.
_NATIVE_UPSERT = frozenset({"sqlite", "postgresql"})

# Execution option marking the writer's connections: on SQLite they BEGIN IMMEDIATE.
_WRITE_OPTION = "callcredit_journal_write"


class JournalError(Exception):
    """The journal could not be opened, written or read. The server must fail-stop."""


class Fenced(JournalError):
    """A commit was refused: the lease has moved to another epoch (a takeover)."""


class JournalRecord(NamedTuple):
    """One applied command, as the writer hands it over.

    A NamedTuple: the writer builds one per operation, and a tuple is the cheapest
    immutable record Python has."""

    seq: int  # 1, 2, 3, ... gap-free, assigned by the writer
    at_ms: int  # the time the state machine was given
    command: Command


class StoredEvent(NamedTuple):
    """An event read back from events_table, with its place and its record's time."""

    seq: int
    idx: int  # the place among the record's events, from 0
    at_ms: int
    event: Event


# ------------------------------------------------------------------ schema

# The journal: what the writer writes, and recovery reads.
metadata = MetaData()
# The projection (history and changefeed): written by the projector only, derived from
# the journal. On SQLite it is a database file of its own beside the journal's
# (`history_url`), so that the projector's transactions never hold the journal file's
# one write lock, which the writer's appends need; elsewhere the same database.
history_metadata = MetaData()

# INTEGER PRIMARY KEY on SQLite is the rowid itself: the table is stored in key
# order with no second index. Elsewhere a plain BIGINT, never auto-generated.
_Key = BigInteger().with_variant(Integer(), "sqlite")
_Id = String(128)  # the contract's id limit: 1-128 characters

journal_table = Table(
    "journal",
    metadata,
    Column("seq", _Key, primary_key=True, autoincrement=False),  # its first record's
    Column("last_seq", BigInteger, nullable=False),  # its last record's
    Column("at_ms", BigInteger, nullable=False),  # its last record's time
    # The records, in seq order: a JSON list of [at_ms, kind, body], body being the
    # command as codec.py writes it (compact JSON).
    Column("body", Text, nullable=False),
    # Hash chain: blake2b-128 of the previous row's chain and this row's seq,
    # last_seq, at_ms and body. Any altered, lost or reordered row breaks every
    # chain value after it; replay recomputes and compares each.
    Column("chain", String(32), nullable=False),
)

meta_table = Table(
    "journal_meta",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
# 2: records carry a hash chain; pruning is recorded in journal_meta.
# 3: one row per group commit (its records' commands), one chain value per row.
SCHEMA_VERSION = "3"
GENESIS_CHAIN = "0" * 32  # the chain value "before" seq 1

entries_table = Table(
    "ledger_entries",
    history_metadata,
    Column("entry_id", _Key, primary_key=True, autoincrement=False),
    Column("account_id", _Id, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("balance_after", BigInteger, nullable=False),
    Column("call_id", _Id, nullable=False),  # "" when the entry is not a call's
    Column("reference", Text, nullable=False),
    Column("idempotency_key", _Id, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=False),  # the journal record that posted it
    Index("ix_ledger_entries_account", "account_id", "entry_id"),
    # Written by the projector (`project`), not the writer, like calls and events.
)

calls_table = Table(
    "calls",
    history_metadata,
    Column("call_id", _Id, primary_key=True),
    Column("call_seq", BigInteger, nullable=False, unique=True),
    Column("account_id", _Id, nullable=False),
    Column("destination", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("allowed_seconds", Integer, nullable=False),
    Column("used_seconds", Integer, nullable=False),
    Column("held", BigInteger, nullable=False),
    Column("charged", BigInteger, nullable=False),
    Column("shortfall", BigInteger, nullable=False),
    Column("rate_prefix", String(16), nullable=False),
    Column("rate_price_per_minute_micros", BigInteger, nullable=False),
    Column("rate_first_increment_seconds", Integer, nullable=False),
    Column("rate_next_increment_seconds", Integer, nullable=False),
    Column("rate_connect_fee", BigInteger, nullable=False),
    Column("started_at_ms", BigInteger, nullable=False),
    Column("ended_at_ms", BigInteger, nullable=True),
    Column("final", Boolean, nullable=False),
    Column("expires_at_ms", BigInteger, nullable=True),
    Column("last_sequence", BigInteger, nullable=False),
    Column("seq", BigInteger, nullable=False),  # the journal record of this snapshot
    Index("ix_calls_account", "account_id", "call_seq"),
)

# Partial: only open calls, so active_only pages stay quick on an account with
# millions of ended calls. (Dialects without partial indexes get a full one.)
Index(
    "ix_calls_account_active",
    calls_table.c.account_id,
    calls_table.c.call_seq,
    sqlite_where=calls_table.c.state == CallState.ACTIVE.value,
    postgresql_where=calls_table.c.state == CallState.ACTIVE.value,
)

# One row (id 1) once a hot standby setup has run; see the module docstring.
lease_table = Table(
    "journal_lease",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("owner", String(128), nullable=False),  # the primary's owner id
    Column("epoch", BigInteger, nullable=False),  # raised by every takeover
    Column("advertise", String(256), nullable=False),  # where clients find it
    Column("expires_at", DateTime(timezone=True), nullable=False),  # database clock
)

# The changefeed (changefeed.py): the events a record produced, as one row per record
# with events (a JSON list of core.events images, in order). Like entries and calls,
# written by the projector (projector.py), not the writer: derived from the journal
# after it is durable, in the projector's own transactions, each with its watermark
# (projection_table). Written idempotently (entries and events: a row per key, ON
# CONFLICT DO NOTHING; calls: replaced only by a snapshot of a later seq), so two
# projectors, or one redoing records after a restart, store the same rows once. All
# three are kept when the journal is pruned.
events_table = Table(
    "events",
    history_metadata,
    Column("seq", _Key, primary_key=True, autoincrement=False),
    Column("at_ms", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
)

# How far the projection has gone: the journal seq up to which its rows (events,
# entries, calls) are written. One row, named "events" since the projection began with
# the changefeed alone. Only moves forward.
projection_table = Table(
    "projection",
    history_metadata,
    Column("name", String(64), primary_key=True),
    Column("seq", BigInteger, nullable=False),
)
PROJECTION = "events"

# The journal the projection was derived from: its journal_id, stamped when the tables
# are created (journal_meta's twin). A history file left beside another journal is
# refused, not mixed in.
history_meta_table = meta_table.to_metadata(history_metadata, name="history_meta")
EVENT_RECORDS_PER_READ = 100  # records per read_events query (each may hold many events)

_CALL_COLUMNS = [c for c in calls_table.c if c.name != "seq"]
_ENTRY_COLUMNS = [c for c in entries_table.c if c.name != "seq"]


# ------------------------------------------------------------------ engine


def engine_url(url: str) -> URL:
    """`url` as SQLAlchemy will open it: a bare PostgreSQL URL means psycopg 3.

    SQLAlchemy's default PostgreSQL driver is psycopg2, which is not installed;
    "postgresql://" (what most tools print) is taken to mean psycopg 3.
    """
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


HISTORY_SUFFIX = "-history"  # a SQLite journal's history file: the journal file's name + this
MOVE_ROWS_PER_INSERT = 10_000  # rows per executemany when the history moves to its file


def history_url(url: URL) -> URL | None:
    """Where the projection is stored when it has a database of its own: for a SQLite
    journal, the file beside the journal's named as it is plus HISTORY_SUFFIX
    (journal.db -> journal.db-history, the way SQLite names its -wal and -shm files);
    None when it shares the journal's database (PostgreSQL, and any other)."""
    if url.get_backend_name() != "sqlite":
        return None
    path, sep, parameters = (url.database or "").partition("?")  # a URI filename's (uri=true)
    return url.set(database=path + HISTORY_SUFFIX + sep + parameters)


def _sqlite_on_connect(durable: bool, dbapi_connection: Any, _record: Any) -> None:
    """Make every SQLite connection durable, patient, and ours to BEGIN.

    synchronous=FULL: in WAL mode NORMAL may lose the last commits on power loss,
    and a reply must never outlive its record. A journal opened with durable=False
    (the projector's) takes NORMAL: its commits do not wait for the disk while they
    hold SQLite's one write lock, which the writer's next append waits for; the WAL
    stays consistent, and a later durable commit to the same file syncs them too. The
    history has a file of its own, which the writer does not commit to: what deletes
    on the strength of its watermark reads it with `durable_projected_through`.

    `isolation_level = None` stops the sqlite3 module from issuing its own BEGIN (it
    skips SELECTs and DDL); SQLAlchemy's "begin" event issues it instead
    (`_sqlite_on_begin`), as its SQLite docs advise.
    """
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        mode = cursor.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            # e.g. a file system without shared memory: readers would block the writer.
            raise JournalError(f"SQLite would not use WAL (journal_mode is {mode!r})")
        cursor.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
        if durable:
            cursor.execute(f"PRAGMA wal_autocheckpoint = {SQLITE_AUTOCHECKPOINT_PAGES}")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    """BEGIN IMMEDIATE for the writer (take the write lock first), BEGIN for readers."""
    write = connection.get_execution_options().get(_WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def _postgresql_on_connect(durable: bool, dbapi_connection: Any, _record: Any) -> None:
    """Refuse to run with synchronous_commit=off: a commit must be on disk; bound waits.

    Only "off" is raised (to "on"); stronger settings a DBA chose for replication
    (remote_write, remote_apply) are kept. A journal opened with durable=False (the
    projector's) sets it off instead: a crash may lose its last commits, never mix
    them up, and what it wrote it writes again. No statement waits for a lock longer
    than POSTGRES_LOCK_TIMEOUT_MS, and a session of a paused process that sits in
    a transaction is ended by the database (a standby taking over ends it sooner).
    """
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True
    try:
        with dbapi_connection.cursor() as cursor:
            if durable:
                cursor.execute("SHOW synchronous_commit")
                row = cursor.fetchone()
                if row is not None and row[0] == "off":
                    cursor.execute("SET synchronous_commit TO on")
            else:
                cursor.execute("SET synchronous_commit TO off")
            cursor.execute(f"SET lock_timeout = {POSTGRES_LOCK_TIMEOUT_MS}")
            cursor.execute(
                "SET idle_in_transaction_session_timeout = "
                f"{POSTGRES_IDLE_IN_TRANSACTION_TIMEOUT_MS}"
            )
    finally:
        dbapi_connection.autocommit = autocommit


def _open_engine(url: URL, owner: str, durable: bool = True) -> Engine:
    pool: dict[str, Any] = {
        "pool_size": POOL_SIZE,
        "max_overflow": POOL_MAX_OVERFLOW,
        "pool_timeout": POOL_TIMEOUT_SECONDS,
    }
    backend = url.get_backend_name()
    if backend == "sqlite":
        database = url.database or ""
        uri = str(url.query.get("uri", "")).lower() in ("true", "1")
        if database in ("", ":memory:") or "mode=memory" in database:
            raise JournalError("an in-memory SQLite journal is not durable; give a file")
        if not uri:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # A file database gets a QueuePool; connections move between threads.
        engine = create_engine(url, connect_args={"check_same_thread": False}, **pool)
        event.listen(engine, "connect", functools.partial(_sqlite_on_connect, durable))
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    # pre_ping: a connection the database dropped while idle (restart, failover)
    # is replaced instead of failing a commit and stopping the server.
    connect_args: dict[str, Any] = {}
    if backend == "postgresql":
        # A network that drops packets must not hang a commit forever: libpq gives
        # up connecting, and the kernel gives up on unacknowledged data, in bounded time.
        connect_args = {
            "connect_timeout": POSTGRES_CONNECT_TIMEOUT_SECONDS,
            "tcp_user_timeout": POSTGRES_TCP_USER_TIMEOUT_MS,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        if owner:
            connect_args["application_name"] = APPLICATION_NAME_PREFIX + owner
    engine = create_engine(url, pool_pre_ping=True, connect_args=connect_args, **pool)
    if backend == "postgresql":
        event.listen(engine, "connect", functools.partial(_postgresql_on_connect, durable))
    return engine


@contextlib.contextmanager
def _failing_as(what: str) -> Iterator[None]:
    """Translate any failure into JournalError, once, at this boundary."""
    try:
        yield
    except JournalError:
        raise
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0]
        raise JournalError(f"{what} failed: {type(exc).__name__}: {first_line}") from exc


# ------------------------------------------------------------------ rows


# The projector's rows are tuples in their table's column order (codec.py builds them;
# the order is checked here, at import).

_ENTRY_ROW = (
    "entry_id", "account_id", "kind", "amount", "balance_after", "call_id", "reference",
    "idempotency_key", "created_at_ms", "seq",
)  # fmt: skip
_CALL_ROW = (
    "call_id", "call_seq", "account_id", "destination", "state", "allowed_seconds",
    "used_seconds", "held", "charged", "shortfall", "rate_prefix",
    "rate_price_per_minute_micros", "rate_first_increment_seconds",
    "rate_next_increment_seconds", "rate_connect_fee", "started_at_ms", "ended_at_ms", "final",
    "expires_at_ms", "last_sequence", "seq",
)  # fmt: skip
if tuple(entries_table.c.keys()) != _ENTRY_ROW or tuple(calls_table.c.keys()) != _CALL_ROW:
    raise ImportError("journal row tuples do not follow their tables' column order")
# The indexed columns of a call row that no later snapshot of the call changes.
_CALL_FIXED = ("call_seq", "account_id")


def _insert_sql(
    connection: Connection,
    table: Table,
    key: str = "",
    newer: bool = False,
    fixed: tuple[str, ...] = (),
) -> str:
    """INSERT in driver SQL; with `key`, a row with that key already there is kept
    (ON CONFLICT DO NOTHING) or, with `newer`, replaced by one of a later seq, all but
    its `fixed` columns."""
    return _driver_sql(connection.dialect, table, key, newer, fixed)


@functools.cache
def _driver_sql(
    dialect: Dialect, table: Table, key: str, newer: bool, fixed: tuple[str, ...]
) -> str:
    quote = dialect.identifier_preparer.quote
    mark = "?" if dialect.paramstyle == "qmark" else "%s"
    names = [quote(c.name) for c in table.c]
    sql = (
        f"INSERT INTO {quote(table.name)} ({', '.join(names)}) "
        f"VALUES ({', '.join([mark] * len(names))})"
    )
    if key and newer:
        kept = {quote(name) for name in (key, *fixed)}
        updates = ", ".join(f"{n} = excluded.{n}" for n in names if n not in kept)
        sql += (
            f" ON CONFLICT ({quote(key)}) DO UPDATE SET {updates} "
            f"WHERE {quote(table.name)}.seq < excluded.seq"
        )
    elif key:
        sql += f" ON CONFLICT ({quote(key)}) DO NOTHING"
    return sql


def _entry(row: Row[Any]) -> LedgerEntry:
    return LedgerEntry(
        entry_id=row.entry_id,
        account_id=row.account_id,
        kind=EntryKind(row.kind),
        amount=row.amount,
        balance_after=row.balance_after,
        call_id=row.call_id,
        reference=row.reference,
        idempotency_key=row.idempotency_key,
        created_at_ms=row.created_at_ms,
    )


def _call(row: Row[Any]) -> CallRecord:
    return CallRecord(
        call_id=row.call_id,
        call_seq=row.call_seq,
        account_id=row.account_id,
        destination=row.destination,
        state=CallState(row.state),
        allowed_seconds=row.allowed_seconds,
        used_seconds=row.used_seconds,
        held=row.held,
        charged=row.charged,
        shortfall=row.shortfall,
        rate=Rate(
            prefix=row.rate_prefix,
            price_per_minute_micros=row.rate_price_per_minute_micros,
            first_increment_seconds=row.rate_first_increment_seconds,
            next_increment_seconds=row.rate_next_increment_seconds,
            connect_fee=row.rate_connect_fee,
        ),
        started_at_ms=row.started_at_ms,
        ended_at_ms=row.ended_at_ms,
        final=bool(row.final),
        expires_at_ms=row.expires_at_ms,
        last_sequence=row.last_sequence,
    )


def chain_after(previous: str, seq: int, last_seq: int, at_ms: int, body: str) -> str:
    """The chain value of a row: binds it to its place and to all before it."""
    # One update of the joined text hashes the same bytes as updating part by part.
    text = f"{previous}|{seq}|{last_seq}|{at_ms}|{body}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _body(records: Sequence[JournalRecord], span: str) -> str:
    """The body of a batch's row, checked before any I/O: seqs must run on without a
    gap and times must not go back."""
    items: list[tuple[int, str, str]] = []
    previous: JournalRecord | None = None
    for record in records:
        if previous is not None:
            if record.seq != previous.seq + 1:
                raise JournalError(
                    f"{span}: seq {record.seq} follows {previous.seq}; seqs must be gap-free"
                )
            if record.at_ms < previous.at_ms:
                raise JournalError(
                    f"{span}: seq {record.seq} at {record.at_ms} ms is earlier than "
                    f"seq {previous.seq} at {previous.at_ms} ms"
                )
        try:
            kind, body = encode_command(record.command)
        except CodecError as exc:
            raise JournalError(f"journal seq {record.seq}: cannot encode: {exc}") from exc
        items.append((record.at_ms, kind, body))
        previous = record
    return orjson.dumps(items).decode()


def _records(seq: int, last_seq: int, at_ms: int, body: str) -> list[tuple[int, int, Command]]:
    """The (seq, at_ms, command) records of a row whose checksum matched."""
    try:
        return decode_row(seq, last_seq, at_ms, body)
    except CodecError as exc:
        raise JournalError(str(exc)) from exc


def _insert(
    connection: Connection,
    table: Table,
    rows: Rows,
    key: str = "",
    newer: bool = False,
    fixed: tuple[str, ...] = (),
) -> None:
    """Insert `rows` (tuples in column order); with `key`, as `_insert_sql` says.

    SQLite and PostgreSQL take the driver's own executemany, on the transaction's
    connection: per commit this saves SQLAlchemy's statement handling, which cost
    more than the database did for small group commits. Other databases (the journal
    rows only: the projection needs ON CONFLICT) go through SQLAlchemy Core.
    """
    if connection.dialect.name == "postgresql" and key and len(rows) >= POSTGRES_COPY_MIN_ROWS:
        _copy_upsert(connection, table, rows, key, newer, fixed)
        return
    if connection.dialect.name in _NATIVE_UPSERT:
        cursor = connection.connection.cursor()
        try:
            cursor.executemany(_insert_sql(connection, table, key, newer, fixed), rows)
        finally:
            cursor.close()
        return
    if key:
        raise JournalError(f"no ON CONFLICT on {connection.dialect.name}")
    names = table.c.keys()
    connection.execute(insert(table), [dict(zip(names, row, strict=True)) for row in rows])


def _copy_upsert(
    connection: Connection, table: Table, rows: Rows, key: str, newer: bool, fixed: tuple[str, ...]
) -> None:
    """PostgreSQL: COPY `rows` into a temporary twin of `table`, then one INSERT ...
    SELECT with `_insert_sql`'s ON CONFLICT: the same rows as executemany. The twin is
    emptied after its INSERT, as a transaction may COPY into it again (a projection's
    new calls, then its ended ones), and at commit."""
    quote = connection.dialect.identifier_preparer.quote
    names = ", ".join(quote(c.name) for c in table.c)
    staging = quote(f"_staging_{table.name}")
    upsert = _insert_sql(connection, table, key, newer, fixed)
    conflict = upsert[upsert.index(" ON CONFLICT") :]
    cursor = connection.connection.cursor()
    try:
        cursor.execute(
            f"CREATE TEMPORARY TABLE IF NOT EXISTS {staging} "
            f"(LIKE {quote(table.name)}) ON COMMIT DELETE ROWS"
        )
        with cursor.copy(f"COPY {staging} ({names}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cursor.execute(
            f"INSERT INTO {quote(table.name)} ({names}) SELECT {names} FROM {staging}{conflict}"
        )
        cursor.execute(f"TRUNCATE {staging}")
    finally:
        cursor.close()


def _meta(connection: Connection) -> dict[str, str]:
    return {row.name: row.value for row in connection.execute(select(meta_table))}


def _set_meta(connection: Connection, name: str, value: str) -> None:
    connection.execute(delete(meta_table).where(meta_table.c.name == name))
    connection.execute(insert(meta_table).values(name=name, value=value))


def _check_schema(connection: Connection) -> None:
    """Refuse a journal written in another format; stamp a new one."""
    version = _meta(connection).get("schema_version")
    if version == SCHEMA_VERSION:
        return
    if version == "2":
        raise JournalError(
            f"the journal has schema version 2 (one row per record); this server reads "
            f"{SCHEMA_VERSION} (one row per group commit): stop every server and convert it "
            "with `callcredit-server upgrade-journal --database-url URL` "
            "(docs/durability.md, 'Journal format')"
        )
    if version is not None:
        raise JournalError(
            f"the journal has schema version {version}; this server reads {SCHEMA_VERSION}"
        )
    if connection.execute(select(func.count()).select_from(journal_table)).scalar():
        raise JournalError(
            f"the journal has records but no schema version; this server reads {SCHEMA_VERSION}"
        )
    _set_meta(connection, "schema_version", SCHEMA_VERSION)
    _set_meta(connection, "journal_id", uuid.uuid4().hex)


def _check_history(connection: Connection, journal_id: str, where: str) -> None:
    """Stamp new history tables with the journal they derive from; refuse another's."""
    stamp = history_meta_table.c
    found = connection.execute(select(stamp.value).where(stamp.name == "journal_id")).scalar()
    if found is None:
        connection.execute(insert(history_meta_table).values(name="journal_id", value=journal_id))
    elif found != journal_id:
        raise JournalError(
            f"the history in {where} was derived from another journal ({found}), not from "
            f"this one ({journal_id}): move it away, and the projector derives this "
            "journal's history again"
        )


def _tail(connection: Connection) -> tuple[int, int, str]:
    """(seq, at_ms, chain) of the last record; the pruned point if none is left."""
    last = connection.execute(
        select(journal_table.c.last_seq, journal_table.c.at_ms, journal_table.c.chain)
        .order_by(journal_table.c.seq.desc())
        .limit(1)
    ).first()
    if last is not None:
        return int(last.last_seq), int(last.at_ms), str(last.chain)
    meta = _meta(connection)
    return int(meta.get("pruned_through_seq", "0")), 0, meta.get("pruned_chain", GENESIS_CHAIN)


def _chain_before(connection: Connection, seq: int) -> str:
    """The chain value that the row starting at record `seq` must extend."""
    if seq <= 1:
        return GENESIS_CHAIN
    previous = connection.execute(
        select(journal_table.c.last_seq, journal_table.c.chain)
        .where(journal_table.c.seq < seq)
        .order_by(journal_table.c.seq.desc())
        .limit(1)
    ).first()
    if previous is not None and previous.last_seq == seq - 1:
        return str(previous.chain)
    meta = _meta(connection)
    if int(meta.get("pruned_through_seq", "0")) == seq - 1:
        return meta["pruned_chain"]
    raise JournalError(f"journal seq {seq - 1} is missing: cannot verify the records after it")


def _row_holding(connection: Connection, seq: int) -> int:
    """The first seq of the row holding record `seq` (`seq` itself if none does: the
    journal ends, or was pruned, before it)."""
    found = connection.execute(
        select(journal_table.c.seq, journal_table.c.last_seq)
        .where(journal_table.c.seq <= seq)
        .order_by(journal_table.c.seq.desc())
        .limit(1)
    ).first()
    return int(found.seq) if found is not None and found.last_seq >= seq else seq


def _checkpoint(engine: Engine, mode: str) -> tuple[int, int, int]:
    """SQLite: `PRAGMA wal_checkpoint(mode)` on a connection of its own, outside any
    transaction (a raw connection is in autocommit); its (busy, WAL frames, frames
    checkpointed)."""
    connection = engine.raw_connection()
    try:
        cursor = connection.cursor()
        busy, frames, copied = cursor.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        cursor.close()
    finally:
        connection.close()
    return int(busy), int(frames), int(copied)


def _projected_through(connection: Connection) -> int:
    query = select(projection_table.c.seq).where(projection_table.c.name == PROJECTION)
    found = connection.execute(query).scalar()
    return 0 if found is None else int(found)


def _check_epoch(connection: Connection, epoch: int) -> None:
    """First statement of a fenced append: hold the lease row FOR SHARE (a takeover's
    UPDATE waits for this transaction; FOR KEY SHARE would not, tests/scaling) and
    refuse unless the lease is still at `epoch`."""
    current = connection.execute(
        text("SELECT epoch FROM journal_lease WHERE id = 1 FOR SHARE")
    ).scalar()
    if current != epoch:
        raise Fenced(f"fenced: the lease is at epoch {current}, this primary holds {epoch}")


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_READ_ROWS:
        raise ValueError(f"limit must be 1..{MAX_READ_ROWS}, got {limit}")


# ------------------------------------------------------------------ journal


class Journal:
    """The journal on one database. Safe to share between threads (one appender)."""

    def __init__(self, url: str, *, owner: str = "", durable: bool = True) -> None:
        """Open the database at `url` (any SQLAlchemy URL) and create missing tables.

        `owner` names this server's PostgreSQL sessions (application_name), so that a
        standby taking over from it can end them (`end_sessions`). `durable=False` is
        for the projector, which writes nothing that it cannot derive again from the
        journal: its commits do not wait for the disk (`_sqlite_on_connect`,
        `_postgresql_on_connect`), and `append` refuses to run on it.
        """
        self._closed = False
        self.durable = durable
        self._tail: tuple[int, int, str] | None = None  # (seq, at_ms, chain) once known
        self._epoch: int | None = None  # set by fence(): every append checks it
        # The last row replay checked and decoded: (its seq, the chain value before it,
        # its own, its records). A tail that stops inside a group commit's row (up to
        # MAX_RECORDS_PER_APPEND records) reads that row again on its next poll: the
        # same place between the same chain values is the row already checked, so it is
        # hashed and decoded once, not on every poll, and its records come from here.
        self._decoded: tuple[int, str, str, list[tuple[int, int, Command]]] | None = None
        with _failing_as("opening the journal"):
            parsed = engine_url(url)
            self._engine = _open_engine(parsed, owner, durable)
        # Same pool and events; marks connections as the writer's (BEGIN IMMEDIATE).
        self._writer = self._engine.execution_options(**{_WRITE_OPTION: True})
        # The projection's database: the journal's, or on SQLite a file of its own.
        self._history = self._engine
        self._history_writer = self._writer
        apart = history_url(parsed)
        try:
            with _failing_as("creating the journal tables"), self._writer.begin() as connection:
                if connection.dialect.name == "postgresql":
                    # Servers starting at once on an empty database (a primary and its
                    # standbys) would race to create the same tables and types.
                    connection.execute(text(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})"))
                metadata.create_all(connection)
                _check_schema(connection)
                journal_id = _meta(connection)["journal_id"]
                if apart is None:
                    history_metadata.create_all(connection)
                    _check_history(connection, journal_id, "the history tables")
            if apart is not None:
                self._open_history_file(apart, owner, journal_id)
        except JournalError:
            self.close()
            raise

    def _open_history_file(self, url: URL, owner: str, journal_id: str) -> None:
        """SQLite: open (and create) the history file, check that it is this journal's,
        and move into it the history an earlier release kept in the journal's file."""
        with _failing_as("opening the history file"):
            self._history = _open_engine(url, owner, self.durable)
        self._history_writer = self._history.execution_options(**{_WRITE_OPTION: True})
        with (
            _failing_as("creating the history tables"),
            self._history_writer.begin() as connection,
        ):
            history_metadata.create_all(connection)
            _check_history(connection, journal_id, url.database or "")
        with _failing_as("reading the journal's tables"), self._engine.connect() as connection:
            names = set(sqlalchemy_inspect(connection).get_table_names())
        earlier = [table for table in history_metadata.sorted_tables if table.name in names]
        if earlier:
            self._move_history(earlier)

    def _move_history(self, tables: Sequence[Table]) -> None:
        """Move `tables` (the projection, as releases before the history file kept it in
        the journal's SQLite file) into the history file: copied in ONE transaction of
        the history file's (a row already there is kept, so a move cut short runs
        again), then dropped from the journal's file in one of its own. Only a durable
        journal (the server's) moves them: the copy must be on disk before the drop."""
        if not self.durable:
            raise JournalError(
                "the history is still in the journal's file, where an earlier release "
                "kept it: the server moves it into its own file when it starts"
            )
        keys = {table.name: table.primary_key.columns.values()[0].name for table in tables}
        with (
            _failing_as("moving the history into its own file"),
            self._history_writer.begin() as target,
            self._engine.connect() as source,
        ):
            for table in tables:
                for rows in source.execute(select(table)).partitions(MOVE_ROWS_PER_INSERT):
                    _insert(target, table, [tuple(row) for row in rows], key=keys[table.name])
        with _failing_as("dropping the moved history"), self._writer.begin() as connection:
            for table in reversed(tables):
                table.drop(connection, checkfirst=True)

    @property
    def engine(self) -> Engine:
        """The journal's engine, for tests and tooling. Never write through it."""
        return self._engine

    @property
    def history_engine(self) -> Engine:
        """The projection's engine (the journal's, or on SQLite the history file's), for
        tests and tooling. Never write through it."""
        return self._history

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every pooled connection. Later calls raise JournalError."""
        self._closed = True
        self._engine.dispose()
        self._history.dispose()

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError("the journal is closed")

    def _check_durable(self, what: str) -> None:
        """Appends and the lease are what answers and takeovers rest on: never on a
        journal whose commits do not wait for the disk."""
        self._check_open()
        if not self.durable:
            raise JournalError(f"{what} on a journal opened with durable=False (the projector's)")

    # ------------------------------------------------------------- writing

    def append(self, records: Sequence[JournalRecord]) -> None:
        """Make `records` durable in ONE transaction, or none of them (group commit).

        Their seqs must continue the journal without a gap and their times must not
        go back: anything else means memory and journal disagree, and replay would
        not rebuild what was acknowledged.
        """
        if not records:
            return
        if len(records) > MAX_RECORDS_PER_APPEND:
            raise ValueError(
                f"{len(records)} records in one append; at most {MAX_RECORDS_PER_APPEND}"
            )
        self._check_durable("an append")
        first = records[0]
        span = f"journal seq {first.seq}..{records[-1].seq}"
        last = records[-1]
        with _failing_as(f"preparing {span}"):
            body = _body(records, span)
        try:
            with _failing_as(f"append of {span}"), self._writer.begin() as connection:
                if self._epoch is not None:
                    _check_epoch(connection, self._epoch)
                # The tail is read from the database once, then known: this object
                # is the journal's only appender, so each commit moves it.
                last_seq, last_at_ms, chain = self._tail or _tail(connection)
                if first.seq != last_seq + 1:
                    raise JournalError(
                        f"{span} does not continue the journal, which ends at seq {last_seq}"
                    )
                if first.at_ms < last_at_ms:
                    raise JournalError(
                        f"{span} starts at {first.at_ms} ms, "
                        f"before seq {last_seq} at {last_at_ms} ms"
                    )
                chain = chain_after(chain, first.seq, last.seq, last.at_ms, body)
                _insert(connection, journal_table, [(first.seq, last.seq, last.at_ms, body, chain)])
        except BaseException:
            self._tail = None  # what reached the database is unknown: read it next time
            raise
        self._tail = (last.seq, last.at_ms, chain)

    def checkpoint(self) -> None:
        """SQLite: copy the journal's committed WAL pages into its file (PASSIVE: it
        waits for no reader and no writer), on a connection of its own; the writer runs
        it on a thread of its own, off the commit path. Elsewhere, nothing."""
        self._check_open()
        if self._engine.dialect.name != "sqlite":
            return
        with _failing_as("checkpointing the journal's WAL"):
            _checkpoint(self._engine, "PASSIVE")

    # ------------------------------------------------------------- the lease

    def fence(self, epoch: int) -> None:
        """From now on, append only while the lease is at `epoch` (else `Fenced`)."""
        self._epoch = epoch

    def lease(self) -> LeaseRow | None:
        """The lease row with its remaining time on the database's clock; None if none."""
        self._check_open()
        query = text(
            "SELECT owner, epoch, advertise, "
            "floor(extract(epoch FROM expires_at - now()) * 1000)::bigint AS remaining_ms "
            "FROM journal_lease WHERE id = 1"
        )
        with _failing_as("reading the lease"), self._engine.connect() as connection:
            row = connection.execute(query).first()
        if row is None:
            return None
        return LeaseRow(str(row.owner), int(row.epoch), str(row.advertise), int(row.remaining_ms))

    def take_lease(
        self, owner: str, advertise: str, seen_epoch: int, new_epoch: int, lease_ms: int
    ) -> bool:
        """Become the lease's holder at `new_epoch` if it is still at `seen_epoch` and
        expired (or absent, at epoch 0). Of servers racing, exactly one gets True."""
        self._check_durable("taking the lease")
        with _failing_as("taking the lease"), self._writer.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO journal_lease (id, owner, epoch, advertise, expires_at) "
                    "VALUES (1, '', 0, '', 'epoch') ON CONFLICT (id) DO NOTHING"
                )
            )
            taken = connection.execute(
                text(
                    "UPDATE journal_lease SET owner = :owner, epoch = :new, "
                    "advertise = :advertise, "
                    "expires_at = now() + make_interval(secs => :ms / 1000.0) "
                    "WHERE id = 1 AND epoch = :seen AND expires_at <= now()"
                ),
                {
                    "owner": owner,
                    "new": new_epoch,
                    "advertise": advertise,
                    "ms": lease_ms,
                    "seen": seen_epoch,
                },
            )
            return taken.rowcount == 1

    def renew_lease(self, owner: str, epoch: int, lease_ms: int) -> bool:
        """Extend our own lease; False: it is no longer ours (deposed)."""
        self._check_durable("renewing the lease")
        with _failing_as("renewing the lease"), self._writer.begin() as connection:
            renewed = connection.execute(
                text(
                    "UPDATE journal_lease "
                    "SET expires_at = now() + make_interval(secs => :ms / 1000.0) "
                    "WHERE id = 1 AND owner = :owner AND epoch = :epoch"
                ),
                {"owner": owner, "epoch": epoch, "ms": lease_ms},
            )
            return renewed.rowcount == 1

    def give_up_lease(self, owner: str, epoch: int) -> None:
        """A clean stop: the lease expires now, so a standby need not wait for it."""
        self._check_open()
        with _failing_as("giving up the lease"), self._writer.begin() as connection:
            connection.execute(
                text(
                    "UPDATE journal_lease SET expires_at = now() - interval '1 ms' "
                    "WHERE id = 1 AND owner = :owner AND epoch = :epoch"
                ),
                {"owner": owner, "epoch": epoch},
            )

    def end_sessions(self, owner: str) -> int:
        """End every PostgreSQL session of server `owner` and wait (up to
        POSTGRES_TERMINATE_WAIT_MS each) until it is gone with its locks; how many there
        were. A takeover runs this before taking the lease. (PostgreSQL 14 or later.)"""
        self._check_open()
        with _failing_as("ending the old primary's sessions"), self._engine.begin() as connection:
            ended = connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid, :wait)) FROM pg_stat_activity "
                    "WHERE application_name = :name AND pid <> pg_backend_pid()"
                ),
                {"name": APPLICATION_NAME_PREFIX + owner, "wait": POSTGRES_TERMINATE_WAIT_MS},
            ).scalar_one()
        return int(ended)

    # ------------------------------------------------------------- replay

    def replay(self, after_seq: int = 0) -> Iterator[tuple[int, int, Command]]:
        """(seq, at_ms, command) for every record after `after_seq`, in seq order.

        Read in pages of REPLAY_PAGE_SIZE by seq range, each on a short-lived
        connection: memory stays flat however long the journal, and nothing is
        held open while the caller applies a page. A missing seq, an unknown
        kind or a body that does not decode raises JournalError naming the seq.
        """
        # Checked now, not at the first next(): a plain function around the generator.
        if after_seq < 0:
            raise ValueError(f"after_seq must not be negative, got {after_seq}")
        self._check_open()
        return self._replay(after_seq + 1)

    def _replay(self, expected: int) -> Iterator[tuple[int, int, Command]]:
        decoded = self._decoded
        if decoded is not None and decoded[0] <= expected <= decoded[3][-1][0] + 1:
            # In the row checked last, or right after it (a tail's next poll): its records
            # from `expected` on come from memory, not from reading it again, and the
            # next row must start right after it and extend its chain value.
            yield from decoded[3][expected - decoded[0] :]
            row_start, chain = decoded[3][-1][0] + 1, decoded[2]
        else:
            with _failing_as(f"replay from seq {expected}"), self._engine.connect() as connection:
                row_start = _row_holding(connection, expected)
                chain = _chain_before(connection, row_start)
        seq = journal_table.c.seq
        while True:
            query = (
                select(journal_table)
                .where(seq >= row_start, seq < row_start + REPLAY_PAGE_SIZE)
                .order_by(seq)
            )
            with _failing_as(f"replay from seq {row_start}"), self._engine.connect() as connection:
                rows = connection.execute(query).all()
                if not rows:
                    after = connection.execute(select(func.min(seq)).where(seq > row_start))
                    following = after.scalar()
            if not rows:
                if following is not None:
                    raise JournalError(f"journal seq {row_start} is missing (next is {following})")
                return
            for row in rows:
                first, last = int(row.seq), int(row.last_seq)
                if first != row_start:
                    raise JournalError(f"journal seq {row_start} is missing (next is {first})")
                decoded = self._decoded
                if decoded is None or decoded[:3] != (first, chain, row.chain):
                    if chain_after(chain, first, last, int(row.at_ms), row.body) != row.chain:
                        raise JournalError(
                            f"journal records seq {first}..{last} are corrupt: their checksum "
                            "does not match (these records, or ones before them, were altered "
                            "or lost); the server will not start from a journal it cannot trust"
                        )
                    records = _records(first, last, int(row.at_ms), row.body)
                    decoded = (first, chain, row.chain, records)
                    self._decoded = decoded
                chain = row.chain
                for record in decoded[3]:
                    if record[0] >= expected:
                        yield record
                row_start = last + 1

    def tail(self, after_seq: int, limit: int) -> list[tuple[int, int, Command]]:
        """At most `limit` records after `after_seq`, checked as replay checks them:
        what a hot standby applies on each poll."""
        return list(itertools.islice(self.replay(after_seq), limit))

    def last_seq(self) -> int:
        """The seq of the last record (or the last pruned one), 0 for an empty journal."""
        self._check_open()
        with _failing_as("reading the last seq"), self._engine.connect() as connection:
            return _tail(connection)[0]

    @property
    def journal_id(self) -> str:
        """A random id stamped when the journal was created: snapshots belong to it."""
        self._check_open()
        with _failing_as("reading the journal metadata"), self._engine.connect() as connection:
            return _meta(connection)["journal_id"]

    def pruned_through(self) -> int:
        """Records up to this seq were pruned (after a snapshot); 0 if none were."""
        self._check_open()
        with _failing_as("reading the journal metadata"), self._engine.connect() as connection:
            return int(_meta(connection).get("pruned_through_seq", "0"))

    def prune(self, through_seq: int) -> int:
        """Delete the records up to `through_seq`, in whole rows (a group commit's row
        that reaches past it stays); how many were deleted.

        Only for records a snapshot covers (the caller checks): replay then starts
        from that snapshot. The chain value of the last pruned row is kept, so the
        rows after it are still verified. The projection (history, events)
        stays, and is never passed: the records it has not projected yet are refused.
        """
        # Only moves forward: read before is safe; durable: a power loss cannot take the
        # projection back behind what this deletes.
        projected = self.durable_projected_through()
        self._tail = None
        with _failing_as(f"pruning through seq {through_seq}"), self._writer.begin() as connection:
            already = int(_meta(connection).get("pruned_through_seq", "0"))
            if through_seq <= already:
                return 0
            last_seq = _tail(connection)[0]
            if through_seq > last_seq:
                raise JournalError(
                    f"cannot prune through {through_seq}: the journal ends at {last_seq}"
                )
            if through_seq > projected:
                raise JournalError(
                    f"cannot prune through {through_seq}: the projection (history, events) "
                    f"is at seq {projected}, and derives the rest from those records"
                )
            through = _row_holding(connection, through_seq + 1) - 1  # whole rows only
            if through <= already:
                return 0
            chain = _chain_before(connection, through + 1)
            connection.execute(delete(journal_table).where(journal_table.c.seq <= through))
            _set_meta(connection, "pruned_through_seq", str(through))
            _set_meta(connection, "pruned_chain", chain)
            return through - already

    def records(self, after_seq: int, through_seq: int) -> Iterator[tuple[int, int, int, str, str]]:
        """Raw (seq, last_seq, at_ms, body, chain) rows wholly after `after_seq` and up to
        `through_seq`, for archiving before a prune."""
        self._check_open()
        start = after_seq + 1
        seq = journal_table.c.seq
        while start <= through_seq:
            query = (
                select(journal_table)
                .where(seq >= start, journal_table.c.last_seq <= through_seq)
                .order_by(seq)
                .limit(REPLAY_PAGE_SIZE)
            )
            with _failing_as(f"reading from seq {start}"), self._engine.connect() as connection:
                rows = connection.execute(query).all()
            if not rows:
                return
            for row in rows:
                yield int(row.seq), int(row.last_seq), int(row.at_ms), row.body, row.chain
            start = int(rows[-1].last_seq) + 1

    # ------------------------------------------------------------- history

    # The reads of the projection see what the projector has stored: the caller waits
    # for `projected_through` to cover what it must see first (service.py).

    def list_entries(
        self, account_id: str, after_entry_id: int, limit: int, *, newest_first: bool = False
    ) -> list[LedgerEntry]:
        """The account's entries with entry_id > after_entry_id, increasing, at most `limit`;
        `newest_first`: decreasing, with entry_id < after_entry_id unless that is 0."""
        _check_limit(limit)
        self._check_open()
        entry_id = entries_table.c.entry_id
        query = select(*_ENTRY_COLUMNS).where(entries_table.c.account_id == account_id)
        if newest_first:
            if after_entry_id:
                query = query.where(entry_id < after_entry_id)
            query = query.order_by(entry_id.desc())
        else:
            query = query.where(entry_id > after_entry_id).order_by(entry_id)
        query = query.limit(limit)
        with _failing_as("listing entries"), self._history.connect() as connection:
            return [_entry(row) for row in connection.execute(query)]

    def list_calls(
        self,
        account_id: str,
        *,
        active_only: bool,
        before_call_seq: int | None,
        limit: int,
    ) -> list[CallRecord]:
        """The account's calls, newest first (call_seq descending), at most `limit`.

        `before_call_seq` pages: pass the call_seq of the last call of a page to
        get the next one.
        """
        _check_limit(limit)
        self._check_open()
        query = select(*_CALL_COLUMNS).where(calls_table.c.account_id == account_id)
        if active_only:
            query = query.where(calls_table.c.state == CallState.ACTIVE.value)
        if before_call_seq is not None:
            query = query.where(calls_table.c.call_seq < before_call_seq)
        query = query.order_by(calls_table.c.call_seq.desc()).limit(limit)
        with _failing_as("listing calls"), self._history.connect() as connection:
            return [_call(row) for row in connection.execute(query)]

    def read_events(
        self, after_seq: int, after_index: int, through_seq: int
    ) -> tuple[list[StoredEvent], int | None, bool]:
        """The events after (after_seq, after_index) in the next EVENT_RECORDS_PER_READ
        records with events up to seq `through_seq`, in order; the last seq read (None if
        none); and whether more records may follow. An event that does not decode raises
        JournalError."""
        self._check_open()
        seq = events_table.c.seq
        query = (
            select(*events_table.c)
            .where(seq >= after_seq, seq <= through_seq)
            .order_by(seq)
            .limit(EVENT_RECORDS_PER_READ)
        )
        with _failing_as("reading events"), self._history.connect() as connection:
            rows = connection.execute(query).all()
        events: list[StoredEvent] = []
        for row in rows:
            try:
                images = orjson.loads(row.body)
                for idx, image in enumerate(images):
                    if row.seq > after_seq or idx > after_index:
                        events.append(StoredEvent(row.seq, idx, row.at_ms, event_from_image(image)))
            except (orjson.JSONDecodeError, EventImageError) as exc:
                raise JournalError(f"events of journal seq {row.seq}: {exc}") from exc
        last = int(rows[-1].seq) if rows else None
        return events, last, len(rows) == EVENT_RECORDS_PER_READ

    def project(
        self, records: Sequence[Projected], through_seq: int, calls_before: int = 0
    ) -> None:
        """Store what the projector derived from records (their events, ledger entries
        and call snapshots), and move the watermark to `through_seq`, in one transaction
        (the projector's).

        Idempotent: an event or entry row already stored is left as it is, a call row is
        replaced only by a snapshot from a later seq, and the watermark never goes back,
        so a projector redoing records, or two at once, is harmless.

        `calls_before`: the last call_seq given out before these records (the
        projector's state machine's `last_call_seq` before it applied them). A call
        created in these records, under an id an ended call may have used before,
        replaces a row whole. The row of an older call was stored by an earlier
        projection: while the call is open, its later snapshots (renewals) are not
        stored, since every read of an open call takes it from memory (service.py:
        GetCall, and ListCalls through `_live`); once it has ended, its snapshot
        replaces all but the columns a call never changes (_CALL_FIXED), as SQLite
        rewrites the index entries of every column an upsert sets, changed or not.
        """
        self._check_open()
        with _failing_as("preparing the projection"):
            event_rows, entry_rows, new_calls, ended_calls = history_rows(records, calls_before)
        with (
            _failing_as("storing the projection"),
            self._history_writer.begin() as connection,
        ):
            if connection.dialect.name not in _NATIVE_UPSERT:
                raise JournalError(f"the journal cannot be projected on {connection.dialect.name}")
            if event_rows:
                _insert(connection, events_table, event_rows, key="seq")
            if entry_rows:
                _insert(connection, entries_table, entry_rows, key="entry_id")
            if new_calls:
                _insert(connection, calls_table, new_calls, key="call_id", newer=True)
            if ended_calls:
                _insert(connection, calls_table, ended_calls, "call_id", True, _CALL_FIXED)
            # The watermark, only forward: the same upsert as a call row's (by seq).
            _insert(connection, projection_table, [(PROJECTION, through_seq)], "name", newer=True)

    def projected_through(self) -> int:
        """The journal seq up to which the projection (events, entries, calls) is stored
        (0: none projected yet)."""
        self._check_open()
        with _failing_as("reading the projection"), self._history.connect() as connection:
            return _projected_through(connection)

    def durable_projected_through(self) -> int:
        """The projection's watermark, on disk before it is returned: what may decide to
        delete what a projector restarting at its watermark would need (a prune, older
        snapshots). The projector commits without waiting for the disk (durable=False),
        so after a power loss its newest watermark could go back to one the journal and
        the snapshots no longer cover.

        SQLite: a FULL checkpoint of the history's WAL after reading it (every frame
        copied into the file, which is then synced); JournalError if readers or the
        projector kept it from finishing within the busy timeout. PostgreSQL: a
        synchronous commit after reading it, which flushes the WAL through the
        projector's commits before it."""
        self._check_open()
        if self._history.dialect.name != "sqlite":
            with _failing_as("making the projection durable"), self._history_writer.begin() as c:
                c.execute(text("SET LOCAL synchronous_commit TO on"))
                seq = _projected_through(c)
                name = projection_table.c.name
                c.execute(update(projection_table).where(name == PROJECTION).values(seq=seq))
            return seq
        seq = self.projected_through()
        with _failing_as("making the projection durable"):
            busy, frames, copied = _checkpoint(self._history, "FULL")
        if busy:
            raise JournalError(
                f"the projection's watermark (seq {seq}) could not be made durable: the "
                f"history's WAL checkpoint copied {copied} of {frames} frames before its "
                f"{SQLITE_BUSY_TIMEOUT_MS} ms busy timeout (try again)"
            )
        return seq

    def last_seq_before(self, at_ms: int, through_seq: int) -> int:
        """The last record with events before `at_ms`, up to seq `through_seq` (0 if none):
        a replay after it starts at `at_ms`. Records are in time order (the writer's
        clock never goes back), so the scan walks back from `through_seq` over the
        records at or after `at_ms` only."""
        self._check_open()
        seq = events_table.c.seq
        query = (
            select(seq)
            .where(seq <= through_seq, events_table.c.at_ms < at_ms)
            .order_by(seq.desc())
            .limit(1)
        )
        with _failing_as("reading events"), self._history.connect() as connection:
            found = connection.execute(query).scalar()
        return 0 if found is None else int(found)

    def get_call(self, call_id: str) -> CallRecord | None:
        """The latest snapshot of the call, or None if it was never journaled."""
        self._check_open()
        query = select(*_CALL_COLUMNS).where(calls_table.c.call_id == call_id)
        with _failing_as("reading a call"), self._history.connect() as connection:
            row = connection.execute(query).first()
        return None if row is None else _call(row)


# ------------------------------------------------------------------ upgrade

# Converting a version-2 journal (one row per record, a chain value per record) to this
# format, offline (`callcredit-server upgrade-journal`). The version-3 rows are built in
# a table of their own, in bounded transactions; only the last transaction swaps the
# tables and stamps the version, so until then the version-2 journal is untouched and
# still served by the release that wrote it, and a conversion cut short runs again.
UPGRADE_RECORDS_PER_ROW = 1_000  # version-2 records per version-3 row, one transaction each
_UPGRADE_TABLE = "journal_upgrade"  # the version-3 rows until the swap
_upgrade_metadata = MetaData()
_upgrade_table = journal_table.to_metadata(_upgrade_metadata, name=_UPGRADE_TABLE)
_v2_journal_table = Table(
    "journal",
    MetaData(),
    Column("seq", _Key, primary_key=True, autoincrement=False),
    Column("at_ms", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("body", Text, nullable=False),
    Column("chain", String(32), nullable=False),
)


class Upgraded(NamedTuple):
    """What `upgrade_journal` did."""

    found_version: str  # the journal's schema version before: "2", or SCHEMA_VERSION
    records: int  # version-2 records verified and converted (0 if it was already current)
    rows: int  # version-3 rows written
    first_seq: int  # the first record converted (the one after the pruned point)


def v2_chain_after(previous: str, seq: int, at_ms: int, kind: str, body: str) -> str:
    """The chain value of a version-2 record (the old release's `chain_after`)."""
    text_ = f"{previous}|{seq}|{at_ms}|{kind}|{body}"
    return hashlib.blake2b(text_.encode(), digest_size=16).hexdigest()


def upgrade_journal(url: str) -> Upgraded:
    """Convert the version-2 journal at `url` to this version, with no server running.

    Every record's version-2 chain value is recomputed (from the pruned point's, if it
    was pruned) and compared, its command decoded and its time checked, while the
    records are copied, UPGRADE_RECORDS_PER_ROW to a version-3 row chained anew from the
    same point, one transaction per row. The last transaction checks that the version-2
    journal has not moved (else a server is writing it), then swaps the tables and
    stamps the version. A journal already at this version is left as it is. Any
    problem raises JournalError (naming the record) and leaves the version-2 journal as
    it was. The history tables (ledger entries, calls, events, the projection's
    watermark) are kept (on SQLite the server's next start moves them into the history
    file): the projector re-derives, idempotently, what lies after its watermark.
    """
    with _failing_as("opening the journal"):
        engine = _open_engine(engine_url(url), "")
    writer = engine.execution_options(**{_WRITE_OPTION: True})
    try:
        with _failing_as("reading the journal metadata"), engine.connect() as connection:
            if not sqlalchemy_inspect(connection).has_table(meta_table.name):
                raise JournalError("there is no journal at this URL (no journal_meta table)")
            meta = _meta(connection)
            _check_offline(connection)
        version = meta.get("schema_version")
        if version == SCHEMA_VERSION:
            return Upgraded(SCHEMA_VERSION, 0, 0, 0)
        if version != "2":
            raise JournalError(
                f"the journal has schema version {version}; only version 2 is converted"
            )
        pruned = int(meta.get("pruned_through_seq", "0"))
        chain = meta.get("pruned_chain", GENESIS_CHAIN)
        with _failing_as("preparing the conversion"), writer.begin() as connection:
            _upgrade_table.drop(connection, checkfirst=True)  # a conversion cut short
            _upgrade_table.create(connection)
        try:
            records, rows, v2_tail = _copy_v2(engine, writer, pruned, chain)
            with _failing_as("swapping in the converted journal"), writer.begin() as connection:
                _swap(connection, meta, v2_tail)
        except BaseException as exc:
            with contextlib.suppress(Exception), writer.begin() as connection:
                _upgrade_table.drop(connection, checkfirst=True)
            if isinstance(exc, JournalError):
                raise JournalError(f"{exc}; nothing was converted") from exc
            raise
        return Upgraded("2", records, rows, pruned + 1)
    finally:
        engine.dispose()


def _check_offline(connection: Connection) -> None:
    """Refuse while a hot standby setup's primary holds the lease (PostgreSQL)."""
    if connection.dialect.name != "postgresql":
        return
    if not sqlalchemy_inspect(connection).has_table(lease_table.name):
        return
    holder = connection.execute(
        text("SELECT owner FROM journal_lease WHERE id = 1 AND expires_at > now()")
    ).scalar()
    if holder is not None:
        raise JournalError(
            f"server {holder!r} holds the journal's lease: stop every server first "
            "(the conversion is offline)"
        )


def _copy_v2(
    engine: Engine, writer: Engine, pruned: int, chain: str
) -> tuple[int, int, tuple[int, str]]:
    """Verify the version-2 records after `pruned` and write them as version-3 rows;
    (records, rows, (last seq, its version-2 chain value))."""
    old = _v2_journal_table.c
    v2_chain = v3_chain = chain
    expected, at_ms, rows = pruned + 1, 0, 0
    while True:
        query = select(old.seq, old.at_ms, old.kind, old.body, old.chain)
        query = query.where(old.seq >= expected).order_by(old.seq).limit(UPGRADE_RECORDS_PER_ROW)
        with _failing_as(f"reading version-2 records from seq {expected}"), engine.connect() as c:
            page = c.execute(query).all()
        if not page:
            return expected - 1 - pruned, rows, (expected - 1, v2_chain)
        items: list[tuple[int, str, str]] = []
        for row in page:
            seq = int(row.seq)
            if seq != expected:
                raise JournalError(f"journal seq {expected} is missing (next is {seq})")
            v2_chain = v2_chain_after(v2_chain, seq, int(row.at_ms), row.kind, row.body)
            if v2_chain != row.chain:
                raise JournalError(
                    f"journal record seq {seq} is corrupt: its checksum does not match (this "
                    "record, or one before it, was altered or lost)"
                )
            try:
                decode_command(row.kind, row.body)
            except CodecError as exc:
                raise JournalError(f"journal seq {seq}: {exc}") from exc
            if row.at_ms < at_ms:
                raise JournalError(
                    f"journal seq {seq} at {row.at_ms} ms is earlier than the record before "
                    f"it at {at_ms} ms"
                )
            at_ms = int(row.at_ms)
            items.append((at_ms, row.kind, row.body))
            expected += 1
        first, last = int(page[0].seq), expected - 1
        body = orjson.dumps(items).decode()
        v3_chain = chain_after(v3_chain, first, last, at_ms, body)
        with _failing_as(f"writing records {first}..{last}"), writer.begin() as connection:
            _insert(connection, _upgrade_table, [(first, last, at_ms, body, v3_chain)])
        rows += 1


def _swap(connection: Connection, meta: dict[str, str], v2_tail: tuple[int, str]) -> None:
    """The conversion's last transaction: the version-2 journal must be as it was read
    (no server wrote it meanwhile); then it is replaced and the version stamped."""
    old = _v2_journal_table.c
    if connection.dialect.name == "postgresql":
        connection.execute(text("LOCK TABLE journal, journal_meta IN ACCESS EXCLUSIVE MODE"))
    last = connection.execute(select(old.seq, old.chain).order_by(old.seq.desc()).limit(1)).first()
    now = (int(last.seq), str(last.chain)) if last is not None else None
    pruned = int(meta.get("pruned_through_seq", "0"))
    expected = None if v2_tail[0] == pruned else v2_tail  # nothing left after a prune
    if now != expected or _meta(connection) != meta:
        raise JournalError(
            "the version-2 journal changed during the conversion: a server is writing it; "
            "stop it and run upgrade-journal again"
        )
    connection.execute(text("DROP TABLE journal"))
    connection.execute(text(f"ALTER TABLE {_UPGRADE_TABLE} RENAME TO journal"))
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"ALTER INDEX {_UPGRADE_TABLE}_pkey RENAME TO journal_pkey"))
    _set_meta(connection, "schema_version", SCHEMA_VERSION)
