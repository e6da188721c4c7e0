"""WatchEvents over real gRPC: replay then live, exact cursors, bounds, scope, refusals."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from callcredit.v1 import admin_pb2, credit_control_pb2
from callcredit_server import changefeed
from tests.security.conftest import ACME_TOKEN, ADMIN_TOKEN, Secured, bearer, reason_of
from tests.service.conftest import Harness
from tests.service.streams import reserve_op

Feed = grpc.aio.UnaryStreamCall[admin_pb2.WatchEventsRequest, admin_pb2.WatchEventsResponse]


def watch(h: Harness | Secured, token: str | None = None, **fields: object) -> Feed:
    request = admin_pb2.WatchEventsRequest(**fields)  # type: ignore[arg-type]
    metadata = bearer(token) if token else None
    call: Feed = h.admin.WatchEvents(request, metadata=metadata)
    return call


async def collect(feed: Feed, count: int) -> tuple[list[admin_pb2.Event], str]:
    """The next `count` events (and the cursor after them)."""
    events: list[admin_pb2.Event] = []
    cursor = ""
    async with asyncio.timeout(10):
        async for response in feed:
            events.extend(response.events)
            cursor = response.cursor
            if len(events) >= count:
                break
    return events, cursor


async def top_ups(h: Harness, account_id: str, start: int, count: int) -> None:
    for i in range(start, start + count):
        await h.admin.TopUp(
            admin_pb2.TopUpRequest(account_id=account_id, amount=1, idempotency_key=f"k{i}")
        )


def ids(events: list[admin_pb2.Event]) -> list[str]:
    return [e.event_id for e in events]


async def test_replay_then_live_and_a_reconnect_resumes_exactly(harness: Harness) -> None:
    h = harness
    await h.funded_account("acme", 1_000)  # ACCOUNT_CREATED, BALANCE_CHANGED
    await top_ups(h, "acme", 0, 5)
    feed = watch(h)
    first, _ = await collect(feed, 7)
    assert [e.kind for e in first[:2]] == [
        admin_pb2.EVENT_KIND_ACCOUNT_CREATED,
        admin_pb2.EVENT_KIND_BALANCE_CHANGED,
    ]
    assert first[-1].account.balance == 1_005 and first[-1].entry.amount == 1
    live = asyncio.ensure_future(collect(feed, 3))
    await top_ups(h, "acme", 5, 3)
    more, _ = await live
    feed.cancel()
    assert [e.account.balance for e in more] == [1_006, 1_007, 1_008]
    everything = first + more
    # Resume after each event in turn: exactly the rest follows, nothing twice.
    for i in (0, 3, 6, 7):
        resumed = watch(h, after=everything[i].event_id)
        rest, _ = await collect(resumed, len(everything) - i - 1)
        resumed.cancel()
        assert ids(rest) == ids(everything[i + 1 :])
    # The seq is the journal's; (seq, index) increase strictly.
    keys = [(e.seq, e.index) for e in everything]
    assert keys == sorted(set(keys))
    assert all(e.event_id == f"{e.seq}.{e.index}" for e in everything)


async def test_from_end_sends_only_new_events_and_filters_apply(harness: Harness) -> None:
    h = harness
    await h.funded_account("a1", 100)
    await h.funded_account("a2", 100)
    feed = watch(
        h,
        from_end=True,
        account_ids=["a2"],
        kinds=[admin_pb2.EVENT_KIND_BALANCE_CHANGED],
    )
    live = asyncio.ensure_future(collect(feed, 2))
    await asyncio.sleep(0.2)  # the stream is following
    await top_ups(h, "a1", 0, 3)
    await top_ups(h, "a2", 10, 2)
    events, _ = await live
    feed.cancel()
    assert [(e.account_id, e.account.balance) for e in events] == [("a2", 101), ("a2", 102)]


async def test_from_end_answers_its_position_at_once_and_a_reconnect_resumes_there(
    harness: Harness,
) -> None:
    """A from_end stream cut before any event came (a takeover) resumes from the cursor
    of its first response: the events made meanwhile are not skipped."""
    h = harness
    await h.funded_account("acme", 100)
    feed = watch(h, from_end=True)
    async with asyncio.timeout(10):
        first = await feed.read()
    feed.cancel()
    assert isinstance(first, admin_pb2.WatchEventsResponse)
    assert list(first.events) == [] and first.cursor
    await top_ups(h, "acme", 0, 2)  # while the client reconnects
    resumed = watch(h, after=first.cursor)
    events, _ = await collect(resumed, 2)
    resumed.cancel()
    assert [e.account.balance for e in events] == [101, 102]


async def test_a_filtered_replay_still_moves_the_cursor(harness: Harness) -> None:
    h = harness
    await h.funded_account("quiet", 100)
    await h.funded_account("busy", 100)
    await top_ups(h, "busy", 0, 5)
    feed = watch(h, account_ids=["quiet"])
    async with asyncio.timeout(10):
        response = await feed.read()
    feed.cancel()
    assert isinstance(response, admin_pb2.WatchEventsResponse)
    assert [e.account_id for e in response.events] == ["quiet", "quiet"]
    assert response.cursor == f"{h.running.journal.last_seq()}.{changefeed.END_OF_RECORD}"


@pytest.mark.parametrize(
    "cursor",
    ["x", "1", "1.", ".1", "-1.0", "01.0", "1.01", "1.0.0", "1 .0", "\u0661.0", "9" * 30 + ".0",
     "1." + "9" * 12, "\x00", "1.0\n"],
)  # fmt: skip
async def test_a_fuzzed_cursor_is_refused(harness: Harness, cursor: str) -> None:
    await harness.funded_account("acme", 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch(harness, after=cursor).read()
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(caught.value) == "INVALID_ARGUMENT"


async def test_a_cursor_beyond_the_end_and_conflicting_fields_are_refused(
    harness: Harness,
) -> None:
    await harness.funded_account("acme", 1)
    tail = harness.running.journal.last_seq()
    for fields in (
        {"after": f"{tail + 1}.0"},
        {"after": "1.0", "from_end": True},
        {"kinds": [99]},
        {"account_ids": ["bad id"]},
        {"account_ids": [f"a{i}" for i in range(changefeed.MAX_ACCOUNT_FILTER + 1)]},
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await watch(harness, **fields).read()
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT, fields
    # The end itself is a valid cursor: nothing yet, then what comes.
    feed = watch(harness, after=f"{tail}.{changefeed.END_OF_RECORD}")
    live = asyncio.ensure_future(collect(feed, 1))
    await asyncio.sleep(0.1)
    await top_ups(harness, "acme", 0, 1)
    (event,), _ = await live
    feed.cancel()
    assert event.seq == tail + 1


async def test_a_cursor_the_projection_covers_is_valid_before_the_writer_marks_it_durable(
    harness: Harness,
) -> None:
    """The projector sees a commit as soon as it is made, and may publish its events
    before the writer's event loop runs the commit's on_durable: a client resuming from
    such an event's cursor at that moment is not refused."""
    await harness.funded_account("acme", 1)
    tail = harness.running.journal.last_seq()
    feed = harness.running.metrics.feed if harness.running.metrics else None
    assert feed is not None
    await asyncio.wait_for(feed.projected(tail), 5.0)
    feed.durable_seq = tail - 1  # the writer's mark, one record behind the projection
    resumed = watch(harness, after=f"{tail}.{changefeed.END_OF_RECORD}")
    live = asyncio.ensure_future(collect(resumed, 1))
    await asyncio.sleep(0.1)
    feed.durable_seq = tail
    await top_ups(harness, "acme", 0, 1)
    (event,), _ = await live
    resumed.cancel()
    assert event.seq == tail + 1


async def test_a_slow_consumer_is_cut_and_resumes_from_its_cursor(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    monkeypatch.setattr(changefeed, "MAX_BUFFERED_EVENTS", 50)
    await h.funded_account("acme", 10**9)
    feed = watch(h, from_end=True)
    # Its first answer (no events, its cursor) comes once it follows the live events:
    # otherwise a quick projector could store all 20,000 before it did, and they would
    # come from the stored events, paced by the reader, and never fill the buffer.
    async for response in feed:
        assert not response.events
        start = response.cursor
        break
    # Reads nothing while 20,000 events happen: gRPC's windows fill, then the buffer.
    reserves = [
        reserve_op(f"r{m}-{i}", f"c{m}-{i}", "acme", destination="84901")
        for m in range(2)
        for i in range(10_000)
    ]
    stream = h.dialer.Control()
    for first in (0, 10_000):
        await stream.write(
            credit_control_pb2.ControlRequest(operations=reserves[first : first + 10_000])
        )
        await stream.read()
    await stream.done_writing()
    got: list[admin_pb2.Event] = []
    cursor = start
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        # The projector derives the 20,000 events first: a few seconds on a busy machine.
        async with asyncio.timeout(30):
            async for response in feed:
                got.extend(response.events)
                cursor = response.cursor or cursor
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, len(got)
    assert reason_of(caught.value) == "SLOW_CONSUMER"
    assert "resume with after=" in (caught.value.details() or "")
    assert len(got) < 20_000
    # Resuming from the last cursor received delivers the rest exactly once.
    monkeypatch.setattr(changefeed, "MAX_BUFFERED_EVENTS", 10_000)
    rest, _ = await collect(watch(h, after=cursor), 20_000 - len(got))
    assert len(set(ids(got + rest))) == 20_000
    assert {e.call.call_id for e in got + rest} == {op.reserve.call_id for op in reserves}


async def test_a_tenant_token_sees_only_its_accounts(secured: Secured) -> None:
    s = secured
    await s.fund("acme-1", 100)
    await s.fund("beta", 100)
    await s.fund("acme-2", 100)
    feed = watch(s, ACME_TOKEN)
    events, _ = await collect(feed, 4)
    feed.cancel()
    assert {e.account_id for e in events} == {"acme-1", "acme-2"}
    admin_feed = watch(s, ADMIN_TOKEN)
    everything, _ = await collect(admin_feed, 6)
    admin_feed.cancel()
    assert {e.account_id for e in everything} == {"acme-1", "acme-2", "beta"}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await watch(s, ACME_TOKEN, account_ids=["beta"]).read()
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    # Still no other admin method for a dialer token.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await s.admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id="acme-1"), metadata=bearer(ACME_TOKEN)
        )
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED


async def test_a_record_with_more_events_than_a_response_holds(harness: Harness) -> None:
    # 600 calls expiring in one Tick: one journal record of 1,200 events (charge + end).
    h = harness
    await h.funded_account("acme", 10**9)
    stream = h.dialer.Control()
    await stream.write(
        credit_control_pb2.ControlRequest(
            operations=[
                reserve_op(f"r{i}", f"c{i}", "acme", destination="84901") for i in range(600)
            ]
        )
    )
    await stream.read()
    start = f"{h.running.journal.last_seq()}.{changefeed.END_OF_RECORD}"
    h.clock.advance(h.settings.validity_seconds + 1)
    expired, _ = await collect(watch(h, after=start), 1_200)
    assert {e.seq for e in expired} == {expired[0].seq}
    assert [e.index for e in expired] == list(range(1_200))
    middle = expired[700].event_id
    rest, _ = await collect(watch(h, after=middle), 499)
    assert ids(rest) == ids(expired[701:])
