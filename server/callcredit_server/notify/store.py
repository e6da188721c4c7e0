"""The notifier's durable state, one SQLite file: the cursor, the outbox, the dead letters.

Accepting a page of the changefeed is one transaction: its deliveries enter the outbox
and the cursor moves past the page together, so a notifier killed at any instant
resumes with nothing lost (the outbox still holds what was not delivered) and at most
the deliveries in flight sent twice (receivers deduplicate by event id).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    event_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL,
    next_at_ms INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    PRIMARY KEY (event_id, endpoint)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (next_at_ms);
CREATE TABLE IF NOT EXISTS dead_letters (
    event_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    body BLOB NOT NULL,
    attempts INTEGER NOT NULL,
    last_error TEXT NOT NULL,
    dead_at_ms INTEGER NOT NULL,
    PRIMARY KEY (event_id, endpoint)
);
"""


@dataclass(frozen=True, slots=True)
class Pending:
    """A delivery in the outbox."""

    event_id: str
    endpoint: str
    body: bytes
    attempts: int  # made so far
    next_at_ms: int


@dataclass(frozen=True, slots=True)
class DeadLettered:
    event_id: str
    endpoint: str
    body: bytes
    attempts: int
    last_error: str
    dead_at_ms: int


class Store:
    """The state file, for one notifier process at a time (cli.py holds a lock on it)."""

    def __init__(self, path: str | Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")  # a moved cursor survives power loss
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def cursor(self) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE name = 'cursor'").fetchone()
        return str(row[0]) if row else ""

    def accept(
        self, cursor: str, deliveries: Iterable[tuple[str, str, bytes]], now_ms: int
    ) -> None:
        """Queue (event_id, endpoint, body) deliveries and move the cursor, atomically."""
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, 0, ?, '')",
                [(event_id, endpoint, body, now_ms) for event_id, endpoint, body in deliveries],
            )
            self._db.execute(
                "INSERT INTO meta VALUES ('cursor', ?) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (cursor,),
            )

    def outbox_size(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def due(self, now_ms: int, limit: int) -> list[Pending]:
        rows = self._db.execute(
            "SELECT event_id, endpoint, body, attempts, next_at_ms FROM outbox "
            "WHERE next_at_ms <= ? ORDER BY next_at_ms, event_id LIMIT ?",
            (now_ms, limit),
        ).fetchall()
        return [Pending(*row) for row in rows]

    def next_due_ms(self) -> int | None:
        row = self._db.execute("SELECT min(next_at_ms) FROM outbox").fetchone()
        return None if row[0] is None else int(row[0])

    def delivered(self, item: Pending) -> None:
        self._db.execute(
            "DELETE FROM outbox WHERE event_id = ? AND endpoint = ?", (item.event_id, item.endpoint)
        )

    def retry(self, item: Pending, next_at_ms: int, error: str) -> None:
        self._db.execute(
            "UPDATE outbox SET attempts = attempts + 1, next_at_ms = ?, last_error = ? "
            "WHERE event_id = ? AND endpoint = ?",
            (next_at_ms, error, item.event_id, item.endpoint),
        )

    def dead_letter(self, item: Pending, error: str, now_ms: int) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR REPLACE INTO dead_letters VALUES (?, ?, ?, ?, ?, ?)",
                (item.event_id, item.endpoint, item.body, item.attempts + 1, error, now_ms),
            )
            self.delivered(item)

    def dead_letters(self, limit: int) -> list[DeadLettered]:
        rows = self._db.execute(
            "SELECT event_id, endpoint, body, attempts, last_error, dead_at_ms FROM dead_letters "
            "ORDER BY dead_at_ms, event_id LIMIT ?",
            (limit,),
        ).fetchall()
        return [DeadLettered(*row) for row in rows]

    def requeue(self, event_id: str, endpoint: str, now_ms: int) -> bool:
        """Move a dead letter back to the outbox, its attempts reset; False if none."""
        with self._transaction():
            moved = self._db.execute(
                "INSERT OR IGNORE INTO outbox SELECT event_id, endpoint, body, 0, ?, '' "
                "FROM dead_letters WHERE event_id = ? AND endpoint = ?",
                (now_ms, event_id, endpoint),
            ).rowcount
            self._db.execute(
                "DELETE FROM dead_letters WHERE event_id = ? AND endpoint = ?",
                (event_id, endpoint),
            )
        return bool(moved)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
