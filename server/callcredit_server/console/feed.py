"""The console's one changefeed follower, the news it hands to open pages, and the
replays that give each account's chart its past.

One ``WatchEvents`` stream per console process (not one per browser tab): ``Feed.run``
follows the server's events from the end of the journal, records each account's
``available`` in the burn-down ``History`` and bumps that account in ``Changes``; every
open page waits on ``Changes`` and re-reads its account when it moved. A broken stream
(the server restarting, SLOW_CONSUMER) is resumed from its last cursor after a short,
growing pause; a cursor the server no longer accepts starts again from the end.

What happened before the console started comes from the journal too: the first time a
page shows an account, ``Replays`` reads that account's stored events since two hours
ago (the hour the chart shows, and the hour before it for the value the chart starts
with) in one bounded stream (``since``, ``stored_only``), merges them into the
``History`` and, if that added anything, bumps the account, so the open page redraws
its chart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable

import grpc

from callcredit.admin import AdminClient
from callcredit.errors import CallcreditError
from callcredit_server.console.burndown import (
    HISTORY_MS,
    MAX_POINTS_PER_ACCOUNT,
    EventKey,
    History,
    Point,
)

__all__ = [
    "MAX_REPLAY_RESPONSES",
    "MAX_TRACKED_ACCOUNTS",
    "REPLAY_MS",
    "RETRY_MAX_SECONDS",
    "Changes",
    "Feed",
    "Replays",
]

log = logging.getLogger("callcredit.console")

MAX_TRACKED_ACCOUNTS = 10_000
"""Accounts whose last change is remembered; one forgotten counts as changed."""

RETRY_MIN_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0
"""Pauses before resuming a broken stream: doubling from 0.2 s to at most 5 s."""

REPLAY_MS = 2 * HISTORY_MS
"""How far back a replay reads: the chart's hour, and the hour before for its start value."""
MAX_REPLAY_RESPONSES = 2_000
"""Responses one replay reads (the server reads 100 journal records per response at
least): a replay of a journal busier than that is given up, and the chart shows what
the console saw itself."""
MAX_REPLAYS_RUNNING = 4
"""Replays at once; more wait their turn."""
MAX_REPLAYS_PENDING = 1_000
"""Accounts waiting for or in a replay; beyond it a page's account is replayed at a later
opening."""


class Changes:
    """A version number that grows with every batch of events, and the version at which
    each account last changed. Waiters are woken once per batch, whatever its size."""

    def __init__(self, *, max_accounts: int = MAX_TRACKED_ACCOUNTS) -> None:
        self._max_accounts = max_accounts
        self.version = 0
        self._changed_at: OrderedDict[str, int] = OrderedDict()
        self._forgotten_up_to = 0
        self._condition = asyncio.Condition()

    async def publish(self, account_ids: set[str]) -> None:
        """Note that ``account_ids`` changed, and wake every waiter."""
        if not account_ids:
            return
        self.version += 1
        for account_id in account_ids:
            self._changed_at[account_id] = self.version
            self._changed_at.move_to_end(account_id)
        while len(self._changed_at) > self._max_accounts:
            _, version = self._changed_at.popitem(last=False)
            self._forgotten_up_to = max(self._forgotten_up_to, version)
        async with self._condition:
            self._condition.notify_all()

    def changed_since(self, account_id: str | None, version: int) -> bool:
        """Whether ``account_id`` (None: any account) changed after ``version``."""
        if account_id is None:
            return self.version > version
        changed = self._changed_at.get(account_id)
        if changed is None:
            return self._forgotten_up_to > version
        return changed > version

    async def wait(self, version: int) -> int:
        """Wait until the version is past ``version``; answer the new one."""
        async with self._condition:
            await self._condition.wait_for(lambda: self.version > version)
            return self.version


class Feed:
    """Follows the changefeed through ``admin`` into ``history`` and ``changes``."""

    def __init__(
        self,
        admin: AdminClient,
        history: History,
        changes: Changes,
        *,
        clock_ms: Callable[[], int],
    ) -> None:
        """Follow from the first record at or after the console's start (``clock_ms()``
        now) until a response gives a cursor: a stream broken before then resumes from that
        time, not from the end, so a change made meanwhile is not missed."""
        self._admin = admin
        self._history = history
        self._changes = changes
        self._clock_ms = clock_ms
        self._since_ms = clock_ms()
        self._received = False
        self.cursor = ""

    async def run(self) -> None:
        """Follow the feed until cancelled, resuming after every interruption: soon after
        a stream that carried something, then less and less often (0.2 s to 5 s)."""
        pause = RETRY_MIN_SECONDS
        while True:
            self._received = False
            try:
                await self._follow()
            except CallcreditError as error:
                if error.code is grpc.StatusCode.INVALID_ARGUMENT and self.cursor:
                    # The cursor fell out of the journal the server keeps: what happened
                    # in between is not on the charts; go on from now.
                    log.warning("changefeed cursor refused (%s); following from now", error)
                    self.cursor = ""
                    self._since_ms = self._clock_ms()
                else:
                    log.warning("changefeed interrupted (%s); resuming", error)
            if self._received:
                pause = RETRY_MIN_SECONDS
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_SECONDS)

    async def _follow(self) -> None:
        """One stream, until it ends."""
        if self.cursor:
            responses = self._admin.watch_events(after=self.cursor)
        else:
            responses = self._admin.watch_events(since_ms=self._since_ms)
        async for response in responses:
            self._received = True
            changed: set[str] = set()
            for event in response.events:
                at_ms = event.at.ToMilliseconds()
                key = (event.seq, event.index)
                self._history.record(event.account_id, key, at_ms, event.account.available)
                changed.add(event.account_id)
            self.cursor = response.cursor or self.cursor
            await self._changes.publish(changed)


class Replays:
    """Replays each account's recent past into ``history`` once, on demand, then bumps it
    in ``changes`` if that added anything. A replay the server refused or could not
    answer is tried again when the account is next shown; one too long to read is not."""

    def __init__(self, admin: AdminClient, history: History, changes: Changes) -> None:
        self._admin = admin
        self._history = history
        self._changes = changes
        self._running = asyncio.Semaphore(MAX_REPLAYS_RUNNING)
        self._pending: dict[str, asyncio.Task[None]] = {}

    def ensure(self, account_id: str, now_ms: int) -> None:
        """Start replaying ``account_id``'s past before ``now_ms`` unless it is known."""
        if self._history.replayed(account_id) or account_id in self._pending:
            return
        if len(self._pending) >= MAX_REPLAYS_PENDING:
            return
        task = asyncio.create_task(self._replay(account_id, now_ms), name="replay")
        self._pending[account_id] = task
        task.add_done_callback(lambda _: self._pending.pop(account_id, None))

    async def idle(self) -> None:
        """Until every replay started so far has ended."""
        await asyncio.gather(*self._pending.values(), return_exceptions=True)

    async def close(self) -> None:
        for task in self._pending.values():
            task.cancel()
        await self.idle()

    async def _replay(self, account_id: str, now_ms: int) -> None:
        async with self._running:
            try:
                replayed = await self._read(account_id, now_ms - REPLAY_MS)
            except CallcreditError as error:
                log.warning("replaying %s's events failed (%s)", account_id, error)
                return
        if replayed is None:
            # Given up for good (until the account is forgotten): the next try costs as much.
            log.warning(
                "replaying %s's events needs more than %d responses; the chart shows what "
                "this console saw",
                account_id,
                MAX_REPLAY_RESPONSES,
            )
            replayed = []
        if self._history.merge(account_id, replayed):
            await self._changes.publish({account_id})

    async def _read(self, account_id: str, since_ms: int) -> list[tuple[EventKey, Point]] | None:
        """The account's stored events since ``since_ms``, the newest kept; None when the
        replay would read more than MAX_REPLAY_RESPONSES."""
        replayed: deque[tuple[EventKey, Point]] = deque(maxlen=MAX_POINTS_PER_ACCOUNT)
        responses = self._admin.watch_events(
            account_ids=[account_id], since_ms=since_ms, stored_only=True
        )
        async with contextlib.aclosing(responses):
            read = 0
            async for response in responses:
                read += 1
                if read > MAX_REPLAY_RESPONSES:
                    return None
                for event in response.events:
                    point = Point(event.at.ToMilliseconds(), event.account.available)
                    replayed.append(((event.seq, event.index), point))
        return list(replayed)
