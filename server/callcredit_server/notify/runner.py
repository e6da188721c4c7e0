"""The notifier's asyncio shell: follow the changefeed into the outbox, deliver the outbox.

Two tasks share the state file (store.py). The follower reads WatchEvents from the
stored cursor, routes each event (delivery.py) and accepts the page: its deliveries and
the new cursor in one transaction. It stops reading while the outbox holds
MAX_OUTBOX deliveries (the server may then cut the stream as a slow consumer; the
follower reconnects from its cursor). The deliverer POSTs what is due, at most
`concurrency` at once, and records each decision delivery.py takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable

import httpx

from callcredit.admin import AdminClient
from callcredit.errors import CallcreditError
from callcredit_server.clock import wall_clock_ms
from callcredit_server.notify import delivery
from callcredit_server.notify.config import NotifyConfig
from callcredit_server.notify.store import Pending, Store

log = logging.getLogger("callcredit_server.notify")

MAX_OUTBOX = 10_000  # deliveries waiting: beyond it the follower stops reading
RECONNECT_FIRST_SECONDS = 0.5  # reconnect waits double from this up to RECONNECT_MAX_SECONDS
RECONNECT_MAX_SECONDS = 30.0
IDLE_POLL_SECONDS = 1.0  # the deliverer looks at the outbox at least this often


class Notifier:
    def __init__(
        self, config: NotifyConfig, store: Store, clock_ms: Callable[[], int] = wall_clock_ms
    ):
        self.config = config
        self.store = store
        self._clock_ms = clock_ms
        self._wake = asyncio.Event()  # new deliveries in the outbox
        self._room = asyncio.Event()  # the outbox has room again
        self._random = random.Random()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self.config.timeout_seconds) as http:
            await asyncio.gather(self._follow(), self._deliver(http))

    # ------------------------------------------------------------ follower

    async def _follow(self) -> None:
        wait_seconds = RECONNECT_FIRST_SECONDS
        while True:
            try:
                if await self._follow_once():
                    wait_seconds = (
                        RECONNECT_FIRST_SECONDS  # it was connected: start the backoff anew
                    )
            except CallcreditError as exc:
                log.warning("changefeed: %s; reconnecting in %.1f s", exc, wait_seconds)
            await asyncio.sleep(wait_seconds)
            wait_seconds = min(wait_seconds * 2, RECONNECT_MAX_SECONDS)

    async def _follow_once(self) -> bool:
        """Follow until the stream ends; whether any response arrived."""
        received = False
        config = self.config
        async with AdminClient(
            config.target, token=config.token, tls=config.tls, ca_file=config.ca_file
        ) as admin:
            after = self.store.cursor()
            log.info("following the changefeed after %r", after or "the start")
            async for response in admin.watch_events(after=after):
                received = True
                while self.store.outbox_size() >= MAX_OUTBOX:
                    self._room.clear()
                    await self._room.wait()
                deliveries = [
                    (event.event_id, endpoint.name, delivery.payload(event))
                    for event in response.events
                    for endpoint in delivery.routes(event, config.endpoints)
                ]
                self.store.accept(response.cursor, deliveries, self._clock_ms())
                if deliveries:
                    self._wake.set()
        return received

    # ----------------------------------------------------------- deliverer

    async def _deliver(self, http: httpx.AsyncClient) -> None:
        endpoints = {e.name: e for e in self.config.endpoints}
        while True:
            due = self.store.due(self._clock_ms(), self.config.concurrency)
            if not due:
                self._room.set()
                next_ms = self.store.next_due_ms()
                wait_seconds = IDLE_POLL_SECONDS
                if next_ms is not None:
                    wait_seconds = min(max(next_ms - self._clock_ms(), 0) / 1000, IDLE_POLL_SECONDS)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait_seconds)
                continue
            await asyncio.gather(*(self._attempt(http, endpoints, item) for item in due))

    async def _attempt(
        self, http: httpx.AsyncClient, endpoints: dict[str, delivery.Endpoint], item: Pending
    ) -> None:
        endpoint = endpoints.get(item.endpoint)
        if endpoint is None:  # removed from the configuration since it was queued
            self.store.dead_letter(item, "endpoint no longer configured", self._clock_ms())
            return
        timestamp_seconds = self._clock_ms() // 1000
        headers = {
            "Content-Type": "application/json",
            delivery.SIGNATURE_HEADER: delivery.signature(
                endpoint.secret, timestamp_seconds, item.body
            ),
            delivery.EVENT_ID_HEADER: item.event_id,
        }
        status: int | None = None
        error = ""
        try:
            response = await http.post(endpoint.url, content=item.body, headers=headers)
            status = response.status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        decision = delivery.after_attempt(
            self.config.retry, item.attempts + 1, status, error, self._random.random()
        )
        match decision:
            case delivery.Delivered():
                self.store.delivered(item)
            case delivery.Retry(after_seconds=after_seconds, error=why):
                log.info(
                    "%s to %s: %s; retry in %.1f s",
                    item.event_id,
                    endpoint.name,
                    why,
                    after_seconds,
                )
                self.store.retry(item, self._clock_ms() + int(after_seconds * 1000), why)
            case delivery.DeadLetter(error=why):
                log.error("%s to %s dead-lettered: %s", item.event_id, endpoint.name, why)
                self.store.dead_letter(item, why, self._clock_ms())
