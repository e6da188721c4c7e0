"""What a team would build on PostgreSQL instead: one row per account, a conditional UPDATE.

    accounts(id, balance, reserved)   holds(call_id, account_id, held, allowed)
    charges(call_id, account_id, amount, used_seconds)

- reserve: `UPDATE accounts SET reserved = reserved + $hold WHERE id = $acct AND
  balance - reserved >= $hold`, and the hold row, in one statement (a data-modifying
  CTE), so one transaction;
- renew: the same conditional UPDATE for the extra hold, and the hold row grows;
- release: delete the hold, record the charge, `balance -= cost, reserved -= held`, in
  one statement.

Each operation is one statement in autocommit mode: one round trip, one transaction,
committed with synchronous_commit = on (durable when answered). A fixed pool of
connections, each used by one worker task; ready operations wait in a bounded queue.
Every run gets a schema of its own, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import psycopg
from psycopg import sql

from loadtest.baselines.workload import (
    RELEASE,
    REQUESTED_SECONDS,
    RESERVE,
    RESERVE_HOLD,
    AccountTotals,
    Slot,
    Workload,
    cost,
    next_hold,
)

_RESERVE = """
WITH a AS (
    UPDATE accounts SET reserved = reserved + %(held)s
    WHERE id = %(account)s {condition}
    RETURNING id)
INSERT INTO holds (call_id, account_id, held, allowed)
SELECT %(call)s, id, %(held)s, %(allowed)s FROM a
RETURNING held
"""
_RENEW = """
WITH a AS (
    UPDATE accounts SET reserved = reserved + %(extra)s
    WHERE id = %(account)s {condition}
    RETURNING id)
UPDATE holds SET held = held + %(extra)s, allowed = %(allowed)s
WHERE call_id = %(call)s AND account_id = (SELECT id FROM a)
RETURNING held
"""
_RELEASE = """
WITH h AS (
    DELETE FROM holds WHERE call_id = %(call)s RETURNING account_id, held),
c AS (
    INSERT INTO charges (call_id, account_id, amount, used_seconds)
    SELECT %(call)s, account_id, %(cost)s, %(used)s FROM h)
UPDATE accounts SET balance = balance - %(cost)s, reserved = reserved - h.held
FROM h WHERE accounts.id = h.account_id
RETURNING accounts.balance
"""
_RESERVE_CONDITION = "AND balance - reserved >= %(held)s"
_RENEW_CONDITION = "AND balance - reserved >= %(extra)s"


def conninfo(url: str) -> str:
    """A libpq URL from a SQLAlchemy one (postgresql+psycopg://...)."""
    for prefix in ("postgresql+psycopg://", "postgresql+psycopg2://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


async def _connect(url: str, schema: str) -> psycopg.AsyncConnection[tuple[object, ...]]:
    conn = await psycopg.AsyncConnection.connect(conninfo(url), autocommit=True)
    await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    await conn.execute("SET synchronous_commit TO on")
    return conn


@asynccontextmanager
async def postgres_schema(url: str, accounts: list[str], balance: int) -> AsyncIterator[str]:
    """A fresh schema with the three tables and every account at `balance`; dropped after."""
    schema = f"bench_compare_{uuid.uuid4().hex[:12]}"
    admin = await psycopg.AsyncConnection.connect(conninfo(url), autocommit=True)
    try:
        await admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            conn = await _connect(url, schema)
            async with conn:
                await conn.execute(
                    "CREATE TABLE accounts (id text PRIMARY KEY, balance bigint NOT NULL,"
                    " reserved bigint NOT NULL DEFAULT 0)"
                )
                await conn.execute(
                    "CREATE TABLE holds (call_id text PRIMARY KEY, account_id text NOT NULL,"
                    " held bigint NOT NULL, allowed integer NOT NULL)"
                )
                await conn.execute(
                    "CREATE TABLE charges (call_id text PRIMARY KEY,"
                    " account_id text NOT NULL, amount bigint NOT NULL,"
                    " used_seconds integer NOT NULL)"
                )
                async with (
                    conn.cursor() as cur,
                    cur.copy("COPY accounts (id, balance) FROM STDIN") as copy,
                ):
                    for account in accounts:
                        await copy.write_row((account, balance))
                await conn.execute("ANALYZE accounts")
            yield schema
        finally:
            await admin.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema))
            )
    finally:
        await admin.close()


async def drive_postgres(
    url: str,
    schema: str,
    workload: Workload,
    *,
    pool: int,
    unsafe: bool = False,
    started: Callable[[list[int]], None] | None = None,
) -> list[int]:
    """Run the workload over `pool` connections; returns their backend pids.

    unsafe: leave the balance condition out of reserve and renew (the overdraft the
    correctness check must catch)."""
    reserve = _RESERVE.format(condition="" if unsafe else _RESERVE_CONDITION)
    renew = _RENEW.format(condition="" if unsafe else _RENEW_CONDITION)
    queue: asyncio.Queue[Slot | None] = asyncio.Queue(maxsize=workload.calls + pool)
    connections = [await _connect(url, schema) for _ in range(pool)]
    pids = [conn.info.backend_pid for conn in connections]
    if started is not None:
        started(pids)

    async def worker(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        while True:
            slot = await queue.get()
            if slot is None:
                return
            try:
                more = await _one(conn, slot)
            except psycopg.Error as exc:
                workload.error(slot, repr(exc))
                more = workload.answer(slot, False, 0, 0, 0)
            if more:
                queue.put_nowait(slot)

    async def _one(conn: psycopg.AsyncConnection[tuple[object, ...]], slot: Slot) -> bool:
        kind = slot.kind
        if kind == RESERVE:
            cur = await conn.execute(
                reserve,
                {"held": RESERVE_HOLD, "account": slot.account, "call": slot.call_id,
                 "allowed": REQUESTED_SECONDS},
                prepare=True,
            )  # fmt: skip
            if await cur.fetchone() is None:
                return workload.answer(slot, False, 0, 0, 0)
            return workload.answer(slot, True, REQUESTED_SECONDS, RESERVE_HOLD, 0)
        if kind == RELEASE:
            charge = cost(slot.used)
            cur = await conn.execute(
                _RELEASE,
                {"call": slot.call_id, "cost": charge, "used": slot.used},
                prepare=True,
            )
            if await cur.fetchone() is None:
                workload.error(slot, "no hold to release")
                return workload.answer(slot, True, 0, 0, 0)
            return workload.answer(slot, True, 0, 0, charge)
        allowed, held, extra = next_hold(slot)
        cur = await conn.execute(
            renew,
            {"extra": extra, "account": slot.account, "call": slot.call_id, "allowed": allowed},
            prepare=True,
        )
        if await cur.fetchone() is None:
            return workload.answer(slot, False, 0, 0, 0)
        return workload.answer(slot, True, allowed, held, 0)

    try:
        for slot in workload.start():
            queue.put_nowait(slot)
        workers = [asyncio.create_task(worker(conn)) for conn in connections]
        await workload.drained.wait()
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
    finally:
        for conn in connections:
            await conn.close()
    return pids


async def postgres_totals(url: str, schema: str, balance: int) -> AccountTotals:
    conn = await _connect(url, schema)
    async with conn:
        cur = await conn.execute(
            "SELECT count(*), coalesce(sum(balance), 0), coalesce(min(balance), 0),"
            " count(*) FILTER (WHERE balance < 0), coalesce(sum(reserved), 0),"
            " count(*) FILTER (WHERE reserved <> 0) FROM accounts"
        )
        accounts, total, lowest, negative, reserved, nonzero = _ints(await cur.fetchone())
        cur = await conn.execute("SELECT count(*), coalesce(sum(held), 0) FROM holds")
        holds, held = _ints(await cur.fetchone())
        cur = await conn.execute(
            "SELECT count(*) FROM accounts a LEFT JOIN"
            " (SELECT account_id, sum(held) AS held FROM holds GROUP BY account_id) h"
            " ON h.account_id = a.id WHERE a.reserved <> coalesce(h.held, 0)"
        )
        (mismatched,) = _ints(await cur.fetchone())
        cur = await conn.execute("SELECT coalesce(sum(amount), 0) FROM charges")
        (charged,) = _ints(await cur.fetchone())
    return AccountTotals(
        accounts=accounts,
        initial_total=balance * accounts,
        balance_total=total,
        min_balance=lowest,
        negative_balances=negative,
        reserved_total=reserved,
        nonzero_reserved=nonzero,
        open_holds=holds,
        open_holds_total=held,
        reserved_mismatches=mismatched,
        server_charged_total=charged,
    )


def _ints(row: tuple[object, ...] | None) -> list[int]:
    assert row is not None
    return [int(str(value)) for value in row]


async def synchronous_commit(url: str) -> str:
    """The setting our sessions run with (we SET it on; this reads it back)."""
    conn = await psycopg.AsyncConnection.connect(conninfo(url), autocommit=True)
    async with conn:
        await conn.execute("SET synchronous_commit TO on")
        cur = await conn.execute("SELECT current_setting('synchronous_commit'),"
                                 " current_setting('fsync')")  # fmt: skip
        row = await cur.fetchone()
        assert row is not None
        return f"synchronous_commit={row[0]}, fsync={row[1]}"
