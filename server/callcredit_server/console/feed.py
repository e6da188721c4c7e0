"""The console's one changefeed follower, and the news it hands to open pages.

One ``WatchEvents`` stream per console process (not one per browser tab): ``Feed.run``
follows the server's events from the end of the journal, records each account's
``available`` in the burn-down ``History`` and bumps that account in ``Changes``; every
open page waits on ``Changes`` and re-reads its account when it moved. A broken stream
(the server restarting, SLOW_CONSUMER) is resumed from its last cursor after a short,
growing pause; a cursor the server no longer accepts starts again from the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

import grpc

from callcredit.admin import AdminClient
from callcredit.errors import CallcreditError
from callcredit_server.console.burndown import History

__all__ = ["MAX_TRACKED_ACCOUNTS", "RETRY_MAX_SECONDS", "Changes", "Feed"]

log = logging.getLogger("callcredit.console")

MAX_TRACKED_ACCOUNTS = 10_000
"""Accounts whose last change is remembered; one forgotten counts as changed."""

RETRY_MIN_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0
"""Pauses before resuming a broken stream: doubling from 0.2 s to at most 5 s."""


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

    def __init__(self, admin: AdminClient, history: History, changes: Changes) -> None:
        self._admin = admin
        self._history = history
        self._changes = changes
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
                    log.warning("changefeed cursor refused (%s); following from the end", error)
                    self.cursor = ""
                else:
                    log.warning("changefeed interrupted (%s); resuming", error)
            if self._received:
                pause = RETRY_MIN_SECONDS
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX_SECONDS)

    async def _follow(self) -> None:
        """One stream, until it ends."""
        responses = self._admin.watch_events(after=self.cursor, from_end=not self.cursor)
        async for response in responses:
            self._received = True
            changed: set[str] = set()
            for event in response.events:
                at_ms = event.at.ToMilliseconds()
                self._history.record(event.account_id, at_ms, event.account.available)
                changed.add(event.account_id)
            self.cursor = response.cursor or self.cursor
            await self._changes.publish(changed)
