"""The changefeed: the events of durable journal records, handed to WatchEvents streams.

Events come from the state machine (core/events.py), but not the writer's: the
projector (projector.py) re-applies the durable journal to its own state machine and
stores the events in the events table (keyed by (seq, index)) with its watermark,
`projected_seq`. The server polls that table once for every follower
(projector.FeedPoller) and hands what is new to `publish`, which appends the matching
events to each follower's bounded buffer. A stream first reads stored events after its
cursor, page by page at its own pace, then follows live ones. Nothing here reads a
socket or a clock; service.py runs the stream.

Two seqs: `durable_seq`, the writer's last durable record (what a client may have
seen acknowledged), and `projected_seq`, how far the events are stored and published.
A stream that replays first waits until the projection covers the durable seq of its
start (service.py), so it replays at least everything acknowledged before it began.

Handing over from the database to live without a gap or a repeat:

1. read pages after the cursor up to `projected_seq`;
2. `subscribe` (from now on every event published reaches the buffer);
3. read pages once more (events published between 1 and 2);
4. follow the buffer, skipping events at or before the cursor (those 3 also read).

`publish` moves `projected_seq` with the events it hands over, with no await between,
so a read up to `projected_seq` and the buffer meet exactly.

The cursor is ``"<seq>.<index>"``: the last event sent. A response that sends no event
(every event of a page filtered out) still moves the cursor, as ``"<seq>.<MAX>"`` past
the last record read. A follower whose buffer overflows is cut (SLOW_CONSUMER) and
resumes from its last cursor, reading the database again.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from callcredit_server.core.events import Event, EventKind

MAX_BUFFERED_EVENTS = 10_000  # per follower: beyond it the follower is cut (SLOW_CONSUMER)
MAX_EVENTS_PER_RESPONSE = 1_000  # per WatchEventsResponse, and rows per database page
MAX_ACCOUNT_FILTER = 1_000  # account_ids in one WatchEventsRequest
MAX_FOLLOWERS = 1_000  # WatchEvents streams at once; more are refused UNAVAILABLE
MAX_CURSOR_CHARS = 40
END_OF_RECORD = 2**31 - 1  # an index past any record's last event: "all of this seq"

_CURSOR = re.compile(r"(0|[1-9][0-9]{0,18})\.(0|[1-9][0-9]{0,9})")
_MAX_SEQ = 2**63 - 1

Cursor = tuple[int, int]  # (seq, index) of the last event sent


def parse_cursor(text: str) -> Cursor | None:
    """The cursor `text` spells, or None if it is not one this server gives."""
    if len(text) > MAX_CURSOR_CHARS or not text.isascii():
        return None
    match = _CURSOR.fullmatch(text)
    if match is None:
        return None
    seq, index = int(match[1]), int(match[2])
    if seq > _MAX_SEQ or index > END_OF_RECORD:
        return None
    return seq, index


def format_cursor(cursor: Cursor) -> str:
    return f"{cursor[0]}.{cursor[1]}"


class FeedEvent:
    """An event with its place in the journal: what a stream sends.

    `wire` caches the event's bytes on the wire (service.py fills it once): every
    follower of a live event sends the same bytes, so ten followers cost one encoding.
    """

    __slots__ = ("at_ms", "event", "index", "seq", "wire")

    def __init__(self, seq: int, index: int, at_ms: int, event: Event) -> None:
        self.seq = seq
        self.index = index
        self.at_ms = at_ms
        self.event = event
        self.wire: bytes | None = None

    @property
    def cursor(self) -> Cursor:
        return (self.seq, self.index)


@dataclass(frozen=True, slots=True)
class Filter:
    """What one stream may and wants to see."""

    allows: Callable[[str], bool] | None = None  # a dialer token's tenant; None: all
    account_ids: frozenset[str] = frozenset()  # empty: every account allowed
    kinds: frozenset[EventKind] = frozenset()  # empty: every kind

    def matches(self, account_id: str, kind: EventKind) -> bool:
        if self.account_ids and account_id not in self.account_ids:
            return False
        if self.kinds and kind not in self.kinds:
            return False
        return self.allows is None or self.allows(account_id)


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity, kept in a set
class Follower:
    """One stream's live buffer, bounded; `cut` once it overflowed."""

    filter: Filter
    buffer: deque[FeedEvent] = field(default_factory=deque)
    cut: bool = False
    closed: bool = False  # the writer stopped: no more events will come
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, events: Iterable[FeedEvent]) -> None:
        matches = self.filter.matches
        buffer = self.buffer
        added = False
        for item in events:
            if matches(item.event.account_id, item.event.kind):
                if len(buffer) >= MAX_BUFFERED_EVENTS:
                    self.cut = True
                    buffer.clear()
                    self.wake.set()
                    return
                buffer.append(item)
                added = True
        if added:
            self.wake.set()

    def take(self, after: Cursor) -> list[FeedEvent]:
        """Up to MAX_EVENTS_PER_RESPONSE buffered events after `after`."""
        taken: list[FeedEvent] = []
        buffer = self.buffer
        while buffer and len(taken) < MAX_EVENTS_PER_RESPONSE:
            item = buffer.popleft()
            if item.cursor > after:
                taken.append(item)
        if not buffer:
            self.wake.clear()
        return taken


class Changefeed:
    """The followers, the writer's durable seq, and how far the events are published."""

    def __init__(self, durable_seq: int, projected_seq: int) -> None:
        self.durable_seq = durable_seq  # the writer's last durable record
        self.projected_seq = projected_seq  # events stored and published up to here
        self._followers: set[Follower] = set()
        self._moved = asyncio.Event()  # set whenever projected_seq moves

    @property
    def followers(self) -> int:
        return len(self._followers)

    @property
    def lag(self) -> int:
        """Durable records whose events are not published yet (a metric)."""
        return max(self.durable_seq - self.projected_seq, 0)

    def durable(self, seq: int) -> None:
        """The writer's hook: records up to `seq` are durable. O(1): the writer pays
        nothing else for the changefeed."""
        self.durable_seq = seq

    def publish(self, events: Sequence[FeedEvent], through_seq: int) -> None:
        """The stored events of records up to `through_seq` (after `projected_seq`), in
        order, to every follower. O(events x followers), no I/O."""
        if events:
            for follower in self._followers:
                if not follower.cut:
                    follower.offer(events)
        if through_seq > self.projected_seq:
            self.projected_seq = through_seq
            self._moved.set()
            self._moved = asyncio.Event()

    async def projected(self, seq: int) -> None:
        """Wait until the events are published through `seq` (the caller bounds it)."""
        while self.projected_seq < seq:
            await self._moved.wait()

    def subscribe(self, filter: Filter) -> Follower | None:
        """A new follower; None when MAX_FOLLOWERS are following already."""
        if len(self._followers) >= MAX_FOLLOWERS:
            return None
        follower = Follower(filter)
        self._followers.add(follower)
        return follower

    def unsubscribe(self, follower: Follower) -> None:
        self._followers.discard(follower)

    def close(self) -> None:
        """The writer failed or stopped: wake every follower to end its stream."""
        for follower in self._followers:
            follower.closed = True
            follower.wake.set()
