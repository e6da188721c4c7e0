"""What a team would build on Redis instead: a Lua script per operation, run by EVALSHA.

    {prefix}a:{account}  hash  b = balance, r = reserved, c = charged so far
    {prefix}h:{call_id}  string: the call's hold

- reserve: if b - r >= hold: r += hold, set the hold; else refuse (0);
- renew: the same check for the extra hold; r += extra, hold += extra;
- release: r -= hold, b -= cost, c += cost, delete the hold.

A script runs atomically in Redis's single thread, so the check and the hold cannot be
split by another client. Driven two ways: `drive_single` (one command at a time from
each of many connections; ready operations wait for a free connection) and
`drive_pipelined` (a few connections, each sending everything ready, at most 1,000
commands, as one pipeline: batches like the dialer's). How durable an answer is depends
on the server's configuration (appendonly/appendfsync), which the benchmark reports.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

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

MAX_PIPELINE = 1_000  # as the dialer library's MAX_OPS_PER_MESSAGE

_CHECK = """
local v = redis.call('HMGET', KEYS[1], 'b', 'r')
if tonumber(v[1]) - tonumber(v[2]) < tonumber(ARGV[1]) then return 0 end
"""
_RESERVE = """
{check}
redis.call('HINCRBY', KEYS[1], 'r', ARGV[1])
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""
_RENEW = """
{check}
redis.call('HINCRBY', KEYS[1], 'r', ARGV[1])
redis.call('INCRBY', KEYS[2], ARGV[1])
return 1
"""
_RELEASE = """
local h = redis.call('GET', KEYS[2])
if not h then return redis.error_reply('NO_HOLD') end
redis.call('DEL', KEYS[2])
redis.call('HINCRBY', KEYS[1], 'r', -tonumber(h))
redis.call('HINCRBY', KEYS[1], 'c', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'b', -tonumber(ARGV[1]))
"""


@dataclass(frozen=True)
class Scripts:
    reserve: str
    renew: str
    release: str


@dataclass(frozen=True)
class RedisRun:
    url: str
    prefix: str
    scripts: Scripts


def _client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, single_connection_client=True)


async def durability(url: str) -> str:
    """appendonly / appendfsync as the server reports them (or why it could not tell)."""
    client = _client(url)
    try:
        appendonly = await client.config_get("appendonly")
        appendfsync = await client.config_get("appendfsync")
        return (
            f"appendonly={_text(appendonly.get('appendonly'))}, "
            f"appendfsync={_text(appendfsync.get('appendfsync'))}"
        )
    except RedisError as exc:
        return f"unknown ({exc})"
    finally:
        await client.aclose()


async def server_pid(url: str) -> int | None:
    client = _client(url)
    try:
        info = await client.info("server")
        pid = info.get("process_id")
        return int(pid) if pid is not None else None
    finally:
        await client.aclose()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def ping(url: str) -> bool:
    client = _client(url)
    try:
        return bool(await asyncio.wait_for(client.ping(), 2))
    except (RedisError, OSError, TimeoutError):
        return False
    finally:
        await client.aclose()


@asynccontextmanager
async def redis_accounts(
    url: str, accounts: list[str], balance: int, *, unsafe: bool = False
) -> AsyncIterator[RedisRun]:
    """Scripts loaded and every account at `balance`, under a fresh key prefix; the keys
    are deleted after. unsafe: scripts without the balance check."""
    prefix = f"bench_compare:{uuid.uuid4().hex[:12]}:"
    check = "" if unsafe else _CHECK
    client = _client(url)
    try:
        scripts = Scripts(
            reserve=str(await client.script_load(_RESERVE.format(check=check))),
            renew=str(await client.script_load(_RENEW.format(check=check))),
            release=str(await client.script_load(_RELEASE)),
        )
        pipe = client.pipeline(transaction=False)
        for n, account in enumerate(accounts, 1):
            pipe.hset(f"{prefix}a:{account}", mapping={"b": balance, "r": 0, "c": 0})
            if n % 1_000 == 0:
                await pipe.execute()
        await pipe.execute()
        yield RedisRun(url, prefix, scripts)
    finally:
        try:
            batch: list[str] = []
            async for key in client.scan_iter(match=f"{prefix}*", count=1_000):
                batch.append(key.decode() if isinstance(key, bytes) else str(key))
                if len(batch) >= 1_000:
                    await client.unlink(*batch)
                    batch = []
            if batch:
                await client.unlink(*batch)
        finally:
            await client.aclose()


def _command(run: RedisRun, slot: Slot) -> tuple[str, str, str, int]:
    """(sha, account key, hold key, argument) of the slot's operation."""
    account_key = f"{run.prefix}a:{slot.account}"
    hold_key = f"{run.prefix}h:{slot.call_id}"
    kind = slot.kind
    if kind == RESERVE:
        return run.scripts.reserve, account_key, hold_key, RESERVE_HOLD
    if kind == RELEASE:
        return run.scripts.release, account_key, hold_key, cost(slot.used)
    return run.scripts.renew, account_key, hold_key, next_hold(slot)[2]


def _answer(workload: Workload, slot: Slot, reply: object) -> bool:
    kind = slot.kind
    if isinstance(reply, Exception):
        workload.error(slot, repr(reply))
        return workload.answer(slot, kind == RELEASE, 0, 0, 0)
    if kind == RESERVE:
        if reply == 1:
            return workload.answer(slot, True, REQUESTED_SECONDS, RESERVE_HOLD, 0)
        return workload.answer(slot, False, 0, 0, 0)
    if kind == RELEASE:
        return workload.answer(slot, True, 0, 0, cost(slot.used))
    if reply == 1:
        allowed, held, _ = next_hold(slot)
        return workload.answer(slot, True, allowed, held, 0)
    return workload.answer(slot, False, 0, 0, 0)


async def drive_single(run: RedisRun, workload: Workload, *, clients: int) -> None:
    """One EVALSHA at a time on each of `clients` connections."""
    queue: asyncio.Queue[Slot | None] = asyncio.Queue(maxsize=workload.calls + clients)
    connections = [_client(run.url) for _ in range(clients)]

    async def worker(client: aioredis.Redis) -> None:
        while True:
            slot = await queue.get()
            if slot is None:
                return
            sha, account_key, hold_key, argument = _command(run, slot)
            reply: object
            try:
                reply = await client.evalsha(sha, 2, account_key, hold_key, argument)
            except ResponseError as exc:
                reply = exc
            if _answer(workload, slot, reply):
                queue.put_nowait(slot)

    try:
        for slot in workload.start():
            queue.put_nowait(slot)
        workers = [asyncio.create_task(worker(client)) for client in connections]
        await workload.drained.wait()
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
    finally:
        for client in connections:
            await client.aclose()


async def drive_pipelined(run: RedisRun, workload: Workload, *, connections: int) -> None:
    """Each of `connections` sends what is ready (a share of it when others are idle, at
    most MAX_PIPELINE) as one pipeline, and waits for the replies."""
    ready: collections.deque[Slot] = collections.deque()
    wake = asyncio.Event()
    idle = 0
    clients = [_client(run.url) for _ in range(connections)]

    async def worker(client: aioredis.Redis) -> None:
        nonlocal idle
        while True:
            if not ready:
                if workload.drained.is_set():
                    return
                idle += 1
                wake.clear()
                await wake.wait()
                idle -= 1
                continue
            share = -(-len(ready) // (idle + 1))
            batch = [ready.popleft() for _ in range(min(share, MAX_PIPELINE))]
            if ready:
                wake.set()  # the rest is for the idle ones
            pipe = client.pipeline(transaction=False)
            for slot in batch:
                sha, account_key, hold_key, argument = _command(run, slot)
                pipe.evalsha(sha, 2, account_key, hold_key, argument)
            replies = await pipe.execute(raise_on_error=False)
            for slot, reply in zip(batch, replies, strict=True):
                if _answer(workload, slot, reply):
                    ready.append(slot)
            if ready:
                wake.set()

    try:
        ready.extend(workload.start())
        workers = [asyncio.create_task(worker(client)) for client in clients]
        await workload.drained.wait()
        wake.set()
        await asyncio.gather(*workers)
    finally:
        for client in clients:
            await client.aclose()


async def redis_totals(run: RedisRun, accounts: list[str], balance: int) -> AccountTotals:
    client = _client(run.url)
    try:
        rows: list[list[int]] = []
        for start in range(0, len(accounts), 1_000):
            pipe = client.pipeline(transaction=False)
            for account in accounts[start : start + 1_000]:
                pipe.hmget(f"{run.prefix}a:{account}", ["b", "r", "c"])
            for values in await pipe.execute():
                rows.append([int(v) for v in values])
        holds = 0
        held = 0
        async for key in client.scan_iter(match=f"{run.prefix}h:*", count=1_000):
            holds += 1
            held += int(await client.get(key) or 0)
    finally:
        await client.aclose()
    return AccountTotals(
        accounts=len(rows),
        initial_total=balance * len(rows),
        balance_total=sum(r[0] for r in rows),
        min_balance=min(r[0] for r in rows),
        negative_balances=sum(1 for r in rows if r[0] < 0),
        reserved_total=sum(r[1] for r in rows),
        nonzero_reserved=sum(1 for r in rows if r[1]),
        open_holds=holds,
        open_holds_total=held,
        server_charged_total=sum(r[2] for r in rows),
    )
