"""Call lifecycle over real gRPC: duplicates, pushes, suspension, expiry, late release."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2

from callcredit.v1 import admin_pb2, credit_control_pb2
from tests.service.conftest import Harness
from tests.service.streams import RawStream, release_op, renew_op, reserve_op


def _reason(status: object) -> str:
    for detail in status.details:  # type: ignore[attr-defined]
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {status}")


async def test_every_duplicate_charges_once(harness: Harness) -> None:
    await harness.funded_account("acc", 1_000)
    a, b = RawStream(harness.dialer), RawStream(harness.dialer)
    # The same reserve, twice in one message and once on another stream, at once.
    first, second = await asyncio.gather(
        a.ask(reserve_op("r1", "c1", "acc"), reserve_op("r2", "c1", "acc")),
        b.ask(reserve_op("r3", "c1", "acc")),
    )
    grants = [o.reserve.grant for o in [*first, *second]]
    assert {(g.allowed_seconds, g.held) for g in grants} == {(60, 60)}
    assert (await harness.account("acc")).reserved == 60
    # The same renew sequence twice: the second answer is the first, nothing more held.
    (n1,), (n2,) = await asyncio.gather(
        a.ask(renew_op("n1", "c1", 1, 50)), b.ask(renew_op("n2", "c1", 1, 50))
    )
    assert n1.renew.grant == n2.renew.grant
    assert n1.renew.grant.allowed_seconds == 110
    assert (await harness.account("acc")).reserved == 110
    # The same release from both streams at once: charged once, same answer.
    (x1,), (x2,) = await asyncio.gather(
        a.ask(release_op("x1", "c1", 70)), b.ask(release_op("x2", "c1", 70))
    )
    assert x1.release == x2.release
    assert (x1.release.charged, x1.release.balance) == (70, 930)
    # A duplicate top-up, concurrently: money arrives once.
    request = admin_pb2.TopUpRequest(account_id="acc", amount=500, idempotency_key="pay-1")
    t1, t2 = await asyncio.gather(harness.admin.TopUp(request), harness.admin.TopUp(request))
    assert t1.account == t2.account
    account = await harness.account("acc")
    assert (account.balance, account.reserved) == (1_430, 0)
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await harness.admin.TopUp(
            admin_pb2.TopUpRequest(account_id="acc", amount=501, idempotency_key="pay-1")
        )
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # After the release, a renew is refused and a reserve of the same call too.
    (late_renew, late_reserve) = await a.ask(
        renew_op("n3", "c1", 2, 70), reserve_op("r4", "c1", "acc")
    )
    assert _reason(late_renew.error) == "CALL_ALREADY_ENDED"
    assert _reason(late_reserve.error) == "CALL_ALREADY_ENDED"
    assert (await harness.account("acc")).balance == 1_430
    await a.close()
    await b.close()


async def test_top_up_during_a_call_pushes_a_new_grant_on_its_stream(harness: Harness) -> None:
    await harness.funded_account("acc", 30)
    carrier, bystander = RawStream(harness.dialer), RawStream(harness.dialer)
    (reserved,) = await carrier.ask(reserve_op("r", "c1", "acc"))
    assert (reserved.reserve.grant.allowed_seconds, reserved.reserve.grant.final) == (30, True)
    await harness.admin.TopUp(
        admin_pb2.TopUpRequest(account_id="acc", amount=100, idempotency_key="k1")
    )
    await carrier.wait_for(lambda: carrier.grant_updates)
    (update,) = carrier.grant_updates
    assert (update.call_id, update.allowed_seconds, update.final, update.held) == (
        "c1",
        60,
        False,
        60,
    )
    assert bystander.grant_updates == []
    await carrier.close()
    await bystander.close()


async def test_pushes_follow_the_stream_that_last_carried_the_call(harness: Harness) -> None:
    await harness.funded_account("acc", 80)
    old, new = RawStream(harness.dialer), RawStream(harness.dialer)
    await old.ask(reserve_op("r1", "c1", "acc"))
    (second,) = await old.ask(reserve_op("r2", "c2", "acc"))
    assert second.reserve.grant.final  # 20 of 60 seconds
    await new.ask(renew_op("n", "c2", 1, 0))  # the dialer reconnected: c2 now rides `new`
    await old.ask(release_op("x", "c1", 10))  # frees 50: c2 is re-granted
    await new.wait_for(lambda: new.grant_updates)
    assert [g.call_id for g in new.grant_updates] == ["c2"]
    assert new.grant_updates[0].allowed_seconds == 60
    assert old.grant_updates == []
    await old.close()
    await new.close()


async def test_suspend_pushes_terminations_and_resume_regrants(harness: Harness) -> None:
    await harness.funded_account("acc", 1_000)
    a, b = RawStream(harness.dialer), RawStream(harness.dialer)
    await a.ask(reserve_op("r1", "c1", "acc"))
    await b.ask(reserve_op("r2", "c2", "acc"))
    await harness.admin.UpdateAccount(
        admin_pb2.UpdateAccountRequest(account_id="acc", status=admin_pb2.ACCOUNT_STATUS_SUSPENDED)
    )
    await a.wait_for(lambda: a.terminations)
    await b.wait_for(lambda: b.terminations)
    assert [(t.call_id, t.reason) for t in a.terminations] == [("c1", "ACCOUNT_SUSPENDED")]
    assert [(t.call_id, t.reason) for t in b.terminations] == [("c2", "ACCOUNT_SUSPENDED")]
    (refused,) = await a.ask(reserve_op("r3", "c3", "acc"))
    assert _reason(refused.error) == "ACCOUNT_SUSPENDED"
    (renewed,) = await a.ask(renew_op("n1", "c1", 1, 59))
    assert (renewed.renew.grant.allowed_seconds, renewed.renew.grant.final) == (60, True)
    await harness.admin.UpdateAccount(
        admin_pb2.UpdateAccountRequest(account_id="acc", status=admin_pb2.ACCOUNT_STATUS_ACTIVE)
    )
    await a.wait_for(lambda: a.grant_updates)
    assert (a.grant_updates[0].allowed_seconds, a.grant_updates[0].final) == (119, False)
    await a.close()
    await b.close()


async def test_silent_call_expires_charged_its_allowance_and_late_release_refunds(
    harness: Harness,
) -> None:
    await harness.funded_account("acc", 1_000)
    stream = RawStream(harness.dialer)
    await stream.ask(reserve_op("r", "c1", "acc"))
    harness.clock.advance(harness.settings.validity_seconds + 1)
    for _ in range(200):  # the tick loop runs every 20 ms
        call = (await harness.admin.GetCall(admin_pb2.GetCallRequest(call_id="c1"))).call
        if call.state == admin_pb2.CALL_STATE_EXPIRED:
            break
        await asyncio.sleep(0.02)
    assert (call.state, call.charged, call.held) == (admin_pb2.CALL_STATE_EXPIRED, 60, 0)
    account = await harness.account("acc")
    assert (account.balance, account.reserved) == (940, 0)
    (late,) = await stream.ask(release_op("x", "c1", 25))
    assert (late.release.charged, late.release.billed_seconds, late.release.balance) == (
        25,
        25,
        975,
    )
    (again,) = await stream.ask(release_op("x2", "c1", 25))
    assert again.release == late.release
    entries = (
        await harness.admin.ListEntries(admin_pb2.ListEntriesRequest(account_id="acc"))
    ).entries
    assert [(e.kind, e.amount) for e in entries] == [
        (admin_pb2.ENTRY_KIND_TOP_UP, 1_000),
        (admin_pb2.ENTRY_KIND_EXPIRY_CHARGE, -60),
        (admin_pb2.ENTRY_KIND_REFUND, 35),
    ]
    await stream.close()


async def test_a_broken_stream_takes_no_call_with_it(harness: Harness) -> None:
    await harness.funded_account("acc", 1_000)
    doomed = RawStream(harness.dialer)
    await doomed.ask(reserve_op("r", "c1", "acc"))
    doomed.call.cancel()
    survivor = RawStream(harness.dialer)
    (renewed,) = await survivor.ask(renew_op("n", "c1", 1, 30))
    assert renewed.renew.grant.allowed_seconds == 90
    (released,) = await survivor.ask(release_op("x", "c1", 45))
    assert released.release.charged == 45
    await survivor.close()


async def test_unary_rpcs_share_the_stream_rules(harness: Harness) -> None:
    await harness.funded_account("acc", 100)
    reserved = await harness.dialer.Reserve(
        credit_control_pb2.ReserveRequest(call_id="u1", account_id="acc", destination="+84901")
    )
    assert reserved.grant.allowed_seconds == 60
    renewed = await harness.dialer.Renew(
        credit_control_pb2.RenewRequest(call_id="u1", sequence=1, used_seconds=30)
    )
    assert (renewed.grant.allowed_seconds, renewed.grant.final) == (90, False)
    released = await harness.dialer.Release(
        credit_control_pb2.ReleaseRequest(call_id="u1", used_seconds=31)
    )
    assert (released.charged, released.balance) == (31, 69)
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await harness.dialer.Renew(
            credit_control_pb2.RenewRequest(call_id="u1", sequence=2, used_seconds=31)
        )
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
