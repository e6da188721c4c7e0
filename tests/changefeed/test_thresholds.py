"""Low-balance thresholds over real gRPC: one event per crossing under concurrent calls."""

from __future__ import annotations

import asyncio

from callcredit.v1 import admin_pb2, credit_control_pb2
from callcredit_server.changefeed import END_OF_RECORD
from tests.changefeed.test_watch import collect, watch
from tests.service.conftest import Harness

CALLS = 100  # each holds 60 (a 60 s grant at 1 unit/s): 6,000 of 10,000 at once
LOW = admin_pb2.EVENT_KIND_LOW_BALANCE
RESTORED = admin_pb2.EVENT_KIND_BALANCE_RESTORED


async def test_exactly_one_event_per_crossing_under_concurrent_calls(harness: Harness) -> None:
    h = harness
    # Created with nothing on it: LOW at once; the top-up then restores it.
    await h.funded_account("acme", 10_000, low_balance_threshold=5_000)
    start = f"{h.running.journal.last_seq()}.{END_OF_RECORD}"
    for cycle in range(3):
        await asyncio.gather(
            *(
                h.dialer.Reserve(
                    credit_control_pb2.ReserveRequest(
                        call_id=f"c{cycle}-{i}", account_id="acme", destination="84901"
                    )
                )
                for i in range(CALLS)
            )
        )
        account = await h.account("acme")
        assert account.available == 4_000 and account.active_calls == CALLS
        assert account.burn_rate_per_minute == CALLS * 60
        assert account.seconds_until_empty == 4_000 * 60 // (CALLS * 60)
        await asyncio.gather(
            *(
                h.dialer.Release(
                    credit_control_pb2.ReleaseRequest(call_id=f"c{cycle}-{i}", used_seconds=0)
                )
                for i in range(CALLS)
            )
        )
        account = await h.account("acme")
        assert account.burn_rate_per_minute == 0 and not account.HasField("seconds_until_empty")
    # 3 cycles of 100 starts and 100 ends, and one LOW and one RESTORED per cycle.
    events, _ = await collect(watch(h, after=start), 3 * (2 * CALLS + 2))
    crossings = [e.kind for e in events if e.kind in (LOW, RESTORED)]
    assert crossings == [LOW, RESTORED] * 3
    low = next(e for e in events if e.kind == LOW)
    assert low.account.available < 5_000 <= low.account.low_balance_threshold
    assert low.account.burn_rate_per_minute > 0


async def test_the_threshold_is_set_read_and_changed(harness: Harness) -> None:
    h = harness
    await h.funded_account("acme", 100)
    response = await h.admin.UpdateAccount(
        admin_pb2.UpdateAccountRequest(account_id="acme", low_balance_threshold=500)
    )
    assert response.account.low_balance_threshold == 500
    assert (await h.account("acme")).low_balance_threshold == 500
    events, _ = await collect(watch(h), 4)
    assert [e.kind for e in events][-2:] == [admin_pb2.EVENT_KIND_ACCOUNT_UPDATED, LOW]
