"""The three failures of the mission, attempted with real concurrency over real gRPC.

1. no call runs past what the account can pay for;
2. calls ending together never lose or double a charge;
3. calls starting together cannot each spend the same money.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from callcredit.v1 import admin_pb2, credit_control_pb2
from tests.service.conftest import Harness
from tests.service.streams import RawStream, release_op, renew_op, reserve_op

RATE_19_66 = admin_pb2.Rate(  # 19.66 dong per second, 6/6 increments, connect fee 50
    prefix="84",
    price_per_minute_micros=1_179_600_000,
    first_increment_seconds=6,
    next_increment_seconds=6,
    connect_fee=50,
)


def _cost(rate: admin_pb2.Rate, seconds: int) -> int:
    """An independent reading of docs/design.md's formula, to check the server against."""
    if seconds == 0:
        return 0
    first, step = rate.first_increment_seconds, rate.next_increment_seconds
    billed = first + -(-max(0, seconds - first) // step) * step
    return rate.connect_fee + -(-(billed * rate.price_per_minute_micros) // 60_000_000)


@pytest.mark.parametrize(
    ("balance", "expected_allowed"),
    [
        pytest.param(60, [60], id="covers-exactly-one-call"),
        pytest.param(150, [60, 60, 30], id="covers-two-and-a-half"),
        pytest.param(59, [59], id="covers-less-than-one-grant"),
    ],
)
async def test_fifty_reserves_at_once_spend_the_money_once(
    harness: Harness, balance: int, expected_allowed: list[int]
) -> None:
    await harness.funded_account("acc", balance)
    streams = [RawStream(harness.dialer) for _ in range(5)]

    async def reserve_on(stream: RawStream, n: int) -> credit_control_pb2.Outcome:
        (outcome,) = await stream.ask(reserve_op(f"r{n}", f"call-{n}", "acc"))
        return outcome

    async def reserve_unary(n: int) -> credit_control_pb2.Outcome:
        try:
            response = await harness.dialer.Reserve(
                credit_control_pb2.ReserveRequest(
                    call_id=f"call-{n}", account_id="acc", destination="84901"
                )
            )
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
            return credit_control_pb2.Outcome(request_id=str(n))
        return credit_control_pb2.Outcome(request_id=str(n), reserve=response)

    attempts = [reserve_on(streams[n % 5], n) for n in range(40)]
    attempts += [reserve_unary(n) for n in range(40, 50)]
    outcomes = await asyncio.gather(*attempts)

    granted = sorted(
        (o.reserve.grant.allowed_seconds for o in outcomes if o.WhichOneof("result") == "reserve"),
        reverse=True,
    )
    assert granted == expected_allowed
    refused = [o for o in outcomes if o.WhichOneof("result") == "error"]
    assert all(o.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] for o in refused)
    account = await harness.account("acc")
    assert account.reserved == sum(expected_allowed)
    assert account.available == balance - sum(expected_allowed)
    assert account.active_calls == len(expected_allowed)
    for stream in streams:
        await stream.close()


async def test_renewing_until_the_money_runs_out_ends_final_never_past_balance(
    harness: Harness,
) -> None:
    await harness.funded_account("acc", 1_000, credit_limit=200)
    stream = RawStream(harness.dialer)
    (first,) = await stream.ask(reserve_op("r", "c1", "acc", seconds=300))
    assert first.reserve.grant.allowed_seconds == 300
    used, sequence, grant = 0, 0, first.reserve.grant
    while not grant.final:
        used = grant.allowed_seconds
        sequence += 1
        (answer,) = await stream.ask(renew_op(f"n{sequence}", "c1", sequence, used, seconds=300))
        grant = answer.renew.grant
        assert grant.allowed_seconds <= 1_200  # balance + credit limit, one unit per second
    assert grant.allowed_seconds == 1_200
    assert grant.held == 1_200
    # The dialer overruns by 100 s: the charge stops at balance + credit limit.
    (done,) = await stream.ask(release_op("x", "c1", 1_300))
    assert done.release.charged == 1_200
    assert done.release.shortfall == 100
    assert done.release.balance == -200
    account = await harness.account("acc")
    assert (account.balance, account.available, account.reserved) == (-200, 0, 0)
    await stream.close()


async def test_two_hundred_calls_released_at_once_charge_each_exactly_once(
    harness: Harness,
) -> None:
    rate = RATE_19_66
    await harness.funded_account("acc", 10_000_000, rate=rate)
    streams = [RawStream(harness.dialer) for _ in range(8)]
    calls = [f"call-{n}" for n in range(200)]
    await asyncio.gather(
        *(
            streams[k].ask(*(reserve_op(f"r{n}", calls[n], "acc") for n in range(k, 200, 8)))
            for k in range(8)
        )
    )
    used = {call_id: (n * 37) % 600 for n, call_id in enumerate(calls)}
    await asyncio.gather(
        *(
            streams[k].ask(
                *(release_op(f"x{n}", calls[n], used[calls[n]]) for n in range(k, 200, 8))
            )
            for k in range(8)
        )
    )
    charged = {
        call_id: streams[n % 8].outcomes[f"x{n}"].release.charged for n, call_id in enumerate(calls)
    }
    assert all(charged[c] == _cost(rate, used[c]) for c in calls)
    account = await harness.account("acc")
    assert account.balance == 10_000_000 - sum(charged.values())
    assert (account.reserved, account.active_calls) == (0, 0)
    entries = await _all_entries(harness, "acc")
    assert sum(e.amount for e in entries) == account.balance
    charges = [e for e in entries if e.kind == admin_pb2.ENTRY_KIND_CALL_CHARGE]
    assert sorted(e.call_id for e in charges) == sorted(c for c in calls if charged[c])
    for stream in streams:
        await stream.close()


async def _all_entries(harness: Harness, account_id: str) -> list[admin_pb2.LedgerEntry]:
    entries: list[admin_pb2.LedgerEntry] = []
    while True:
        page = await harness.admin.ListEntries(
            admin_pb2.ListEntriesRequest(
                account_id=account_id,
                after_entry_id=entries[-1].entry_id if entries else 0,
                limit=1000,
            )
        )
        if not page.entries:
            return entries
        entries.extend(page.entries)
