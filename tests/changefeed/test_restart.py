"""The cursor across a server killed with SIGKILL and restarted: no gap, no repeat."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from callcredit.admin import AdminClient, RateSpec
from callcredit.errors import CallcreditError
from callcredit.v1 import admin_pb2
from callcredit_server.changefeed import END_OF_RECORD, format_cursor, parse_cursor
from tests.service.processes import server_process


async def follow(
    target: str, after: str, seen: list[admin_pb2.Event], count: int, reached: asyncio.Event
) -> str:
    """Append events to `seen` until the server goes away (`reached` once there are
    `count`); the last cursor."""
    cursor = after
    with contextlib.suppress(CallcreditError):
        async with AdminClient(target) as admin:
            async for response in admin.watch_events(after=cursor):
                seen.extend(response.events)
                cursor = response.cursor
                if len(seen) >= count:
                    reached.set()
    return cursor


async def top_ups(target: str, keys: range) -> None:
    async with AdminClient(target) as admin:
        for i in keys:
            await admin.top_up("acme", 1, idempotency_key=f"k{i}")


async def wait_for(reached: asyncio.Event) -> None:
    async with asyncio.timeout(20):
        await reached.wait()


async def test_a_cursor_resumes_exactly_after_a_kill_and_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'journal.db'}"
    seen: list[admin_pb2.Event] = []
    with server_process(url) as (process, target):
        async with AdminClient(target) as admin:
            await admin.put_tariff("t", "VND", [RateSpec("", 60_000_000, 1, 1)])
            await admin.create_account("acme", currency="VND", tariff_id="t")
        reached = asyncio.Event()
        follower = asyncio.ensure_future(follow(target, "", seen, 31, reached))
        await top_ups(target, range(30))
        await wait_for(reached)
        process.kill()  # SIGKILL: no drain, no goodbye to the stream
        cursor = await follower
    # The last cursor is the last event's, or the end of its record (a response with no
    # events may say "all of this seq" once the record is fully sent): both resume after it.
    last = parse_cursor(seen[-1].event_id)
    assert last is not None
    assert cursor in (seen[-1].event_id, format_cursor((last[0], END_OF_RECORD)))
    with server_process(url) as (_, target):
        reached = asyncio.Event()
        follower = asyncio.ensure_future(follow(target, cursor, seen, 61, reached))
        await top_ups(target, range(30, 60))
        await wait_for(reached)
        follower.cancel()
        async with AdminClient(target) as admin:
            everything: list[admin_pb2.Event] = []
            async for response in admin.watch_events():
                everything.extend(response.events)
                if len(everything) >= 61:
                    break
            account = await admin.get_account("acme")
    assert [e.event_id for e in seen] == [e.event_id for e in everything]
    assert len({e.event_id for e in seen}) == 61
    assert [e.account.balance for e in seen[1:]] == list(range(1, 61))
    assert account.balance == 60
