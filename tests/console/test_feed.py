"""Changes: which open pages must re-read, and that waiters wake once per batch; Replays:
an account's past read from a real server's changefeed."""

from __future__ import annotations

import asyncio
import time

import pytest

from callcredit.admin import AdminClient
from callcredit_server.console import feed
from callcredit_server.console.burndown import History, Point
from callcredit_server.console.feed import Changes, Replays
from tests.console.conftest import new_account
from tests.console.processes import admin_cli


async def test_an_account_changed_since_a_version() -> None:
    changes = Changes()
    await changes.publish({"a", "b"})
    assert changes.version == 1
    await changes.publish({"b"})
    assert changes.changed_since("a", 0) and not changes.changed_since("a", 1)
    assert changes.changed_since("b", 1)
    assert not changes.changed_since("c", 0)
    assert changes.changed_since(None, 1) and not changes.changed_since(None, 2)


async def test_nothing_published_moves_nothing() -> None:
    changes = Changes()
    await changes.publish(set())
    assert changes.version == 0


async def test_a_forgotten_account_counts_as_changed() -> None:
    changes = Changes(max_accounts=2)
    await changes.publish({"a"})
    await changes.publish({"b"})
    await changes.publish({"c"})  # "a" is forgotten; it changed at version 1
    assert changes.changed_since("a", 0)
    assert not changes.changed_since("a", 1)  # nothing forgotten changed after 1
    await changes.publish({"d"})  # "b" forgotten, changed at 2
    assert changes.changed_since("a", 1)  # conservative: it may have been "a"


async def test_waiters_wake_when_the_version_passes_theirs() -> None:
    changes = Changes()
    waiter = asyncio.create_task(changes.wait(0))
    await asyncio.sleep(0)
    assert not waiter.done()
    await changes.publish({"a"})
    assert await asyncio.wait_for(waiter, 1) == 1
    assert await asyncio.wait_for(changes.wait(0), 1) == 1  # already past: no waiting


async def replayed_points(target: str, account_id: str) -> tuple[History, Changes, list[Point]]:
    """Replays ``account_id`` through a real server; the history, the changes it bumped
    and the account's points."""
    history, changes = History(), Changes()
    async with AdminClient(target) as admin:
        replays = Replays(admin, history, changes)
        replays.ensure(account_id, time.time_ns() // 1_000_000)
        await asyncio.wait_for(replays.idle(), 10)
        await replays.close()
    return history, changes, history.points(account_id, time.time_ns() // 1_000_000)


async def test_a_replay_reads_the_accounts_past_from_the_server(server: str) -> None:
    new_account(server, "replay-1", dollars=3)
    new_account(server, "replay-other", dollars=9)
    admin_cli(server, "topup", "replay-1", "200", "--idempotency-key", "replay-1-1")
    history, changes, points = await replayed_points(server, "replay-1")
    # Created at $0, topped up to $3, then $5; the other account is not read in.
    assert [point.available for point in points] == [0, 300, 500]
    assert history.points("replay-other", time.time_ns() // 1_000_000) == []
    assert changes.changed_since("replay-1", 0)  # open pages redraw


async def test_a_replay_too_long_to_read_is_given_up_for_good(
    server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    new_account(server, "replay-2", dollars=3)
    monkeypatch.setattr(feed, "MAX_REPLAY_RESPONSES", 0)
    history, changes, points = await replayed_points(server, "replay-2")
    assert history.replayed("replay-2") and points == []
    assert changes.version == 0  # nothing new: no page redraws
