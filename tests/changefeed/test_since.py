"""WatchEvents from a time (`since`) and as a bounded replay (`stored_only`), over real gRPC:
what the console reads to draw an account's last hour."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from callcredit.v1 import admin_pb2
from tests.changefeed.test_watch import Feed, collect, top_ups
from tests.service.conftest import Harness


def watch(h: Harness, **fields: object) -> Feed:
    call: Feed = h.admin.WatchEvents(admin_pb2.WatchEventsRequest(**fields))  # type: ignore[arg-type]
    return call


def at(milliseconds: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMilliseconds(milliseconds)
    return stamp


async def replay(h: Harness, **fields: object) -> list[admin_pb2.Event]:
    """Every response of a stored_only stream, which must end by itself."""
    events: list[admin_pb2.Event] = []
    async with asyncio.timeout(10):
        async for response in watch(h, stored_only=True, **fields):
            events.extend(response.events)
    return events


async def test_since_starts_at_the_first_record_at_or_after_the_time(harness: Harness) -> None:
    h = harness
    await h.funded_account("acme", 1_000)
    h.clock.advance(600)
    hour_ago = h.clock.now_ms
    await top_ups(h, "acme", 0, 2)
    h.clock.advance(1_800)
    await top_ups(h, "acme", 2, 1)
    balances = [e.account.balance for e in await replay(h, since=at(hour_ago))]
    assert balances == [1_001, 1_002, 1_003]
    assert [e.account.balance for e in await replay(h, since=at(hour_ago + 1))] == [1_003]
    everything = await replay(h, since=at(0))
    assert everything[0].kind == admin_pb2.EVENT_KIND_ACCOUNT_CREATED
    assert await replay(h, since=at(h.clock.now_ms + 1)) == []


async def test_a_stored_only_replay_ends_at_the_end_as_it_was_and_filters_apply(
    harness: Harness,
) -> None:
    h = harness
    await h.funded_account("a1", 100)
    await h.funded_account("a2", 200)
    await top_ups(h, "a1", 0, 3)
    events = await replay(h, account_ids=["a2"])
    assert {e.account_id for e in events} == {"a2"}
    assert events[-1].account.available == 200
    # Without stored_only the same request follows on to what comes next.
    feed = watch(h, since=at(0), account_ids=["a1"])
    stored, _ = await collect(feed, 5)
    live = asyncio.ensure_future(collect(feed, 1))
    await top_ups(h, "a1", 3, 1)
    (event,), _ = await live
    feed.cancel()
    assert stored[-1].account.balance == 103 and event.account.balance == 104


@pytest.mark.parametrize(
    "fields",
    [
        {"since": at(0), "after": "1.0"},
        {"since": at(0), "from_end": True},
        {"stored_only": True, "from_end": True},
        {"since": Timestamp(seconds=-1)},
        {"since": Timestamp(seconds=10**15)},
        {"since": Timestamp(seconds=1, nanos=-1)},
    ],
)
async def test_since_out_of_range_or_with_other_starts_is_refused(
    harness: Harness, fields: dict[str, object]
) -> None:
    await harness.funded_account("acme", 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch(harness, **fields).read()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
