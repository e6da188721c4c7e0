"""Changes: which open pages must re-read, and that waiters wake once per batch."""

from __future__ import annotations

import asyncio

from callcredit_server.console.feed import Changes


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
