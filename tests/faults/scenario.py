"""One story told under every fault: acknowledged work, the fault, fail-stop, restart.

Before the fault (`acknowledged_work`), 1 minor unit per second:

- acc-a: seeded 1,000; call c1 open (reserved 60 s, renewed at 10 s used: allowed 70,
  held 70); call c2 reserved and released at 5 s (charged 5); topped up 100 (k-before).
  Balance 1,095, reserved 70.
- acc-b: seeded 50; call c3 open with a final grant of 50 s (available 0).

During the fault (`expect_fail_stop`) every change and every read is refused with
UNAVAILABLE: the top-up k-fault of acc-b (the first change after the fault: its commit
is the one that fails), a Reserve of c4 and a Release of c1 on the open Control stream,
and the unary RPCs. Had k-fault been applied, c3 would have been re-granted and the
grant pushed on the stream; no push may arrive.

After the restart (`expect_resumed_exactly`) the state is exactly what was acknowledged,
and the refused operations, retried with the same idempotency key / call id, are each
applied once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2

from callcredit.v1 import admin_pb2, credit_control_pb2
from tests.faults.servers import Endpoint
from tests.service.conftest import UNIT_PER_SECOND
from tests.service.streams import RawStream, release_op, renew_op, reserve_op

RPC_TIMEOUT_SECONDS = 10.0
NOT_SERVING_WITHIN_SECONDS = 2.0
ACCOUNTS = ("acc-a", "acc-b")
FAULT_TOPUP = admin_pb2.TopUpRequest(
    account_id="acc-b", amount=30, idempotency_key="k-fault", reference="during-fault"
)
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _reason(status: status_pb2.Status) -> str:
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def assert_unavailable_outcome(outcome: credit_control_pb2.Outcome) -> None:
    """A Control stream answer: an error Outcome with code and reason UNAVAILABLE."""
    assert outcome.WhichOneof("result") == "error", outcome
    assert outcome.error.code == grpc.StatusCode.UNAVAILABLE.value[0], outcome.error
    assert _reason(outcome.error) == "UNAVAILABLE", outcome.error


async def expect_unavailable(call: Awaitable[object]) -> None:
    """A unary RPC that must fail with UNAVAILABLE (not hang, not UNKNOWN)."""
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    error = refused.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, (error.code(), error.details())


async def health(endpoint: Endpoint) -> int:
    response = await endpoint.health.Check(
        health_pb2.HealthCheckRequest(service=""), timeout=RPC_TIMEOUT_SECONDS
    )
    status: int = response.status
    return status


async def expect_not_serving(endpoint: Endpoint) -> None:
    """grpc.health.v1 Check("") turns NOT_SERVING (it is set by a task, so soon, not at once)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + NOT_SERVING_WITHIN_SECONDS
    status = await health(endpoint)
    while status != NOT_SERVING and loop.time() < deadline:
        await asyncio.sleep(0.02)
        status = await health(endpoint)
    assert status == NOT_SERVING, health_pb2.HealthCheckResponse.ServingStatus.Name(status)


async def acknowledged_work(endpoint: Endpoint) -> RawStream:
    """The work before the fault, every piece acknowledged. The stream stays open."""
    admin = endpoint.admin
    tariff = admin_pb2.Tariff(tariff_id="t", currency="VND", rates=[UNIT_PER_SECOND])
    await admin.PutTariff(admin_pb2.PutTariffRequest(tariff=tariff), timeout=RPC_TIMEOUT_SECONDS)
    for account_id, seed in (("acc-a", 1_000), ("acc-b", 50)):
        await admin.CreateAccount(
            admin_pb2.CreateAccountRequest(account_id=account_id, currency="VND", tariff_id="t"),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        await admin.TopUp(
            admin_pb2.TopUpRequest(account_id=account_id, amount=seed, idempotency_key="seed"),
            timeout=RPC_TIMEOUT_SECONDS,
        )
    stream = RawStream(endpoint.dialer)
    (c1,) = await stream.ask(reserve_op("a1", "c1", "acc-a"))
    assert c1.reserve.grant.allowed_seconds == 60, c1
    (renewed,) = await stream.ask(renew_op("a2", "c1", 1, 10))
    assert renewed.renew.grant.allowed_seconds == 70, renewed
    await stream.ask(reserve_op("a3", "c2", "acc-a"))
    (released,) = await stream.ask(release_op("a4", "c2", 5))
    assert released.release.charged == 5, released
    (c3,) = await stream.ask(reserve_op("a5", "c3", "acc-b"))
    assert (c3.reserve.grant.allowed_seconds, c3.reserve.grant.final) == (50, True), c3
    topped = await admin.TopUp(
        admin_pb2.TopUpRequest(account_id="acc-a", amount=100, idempotency_key="k-before"),
        timeout=RPC_TIMEOUT_SECONDS,
    )
    assert (topped.account.balance, topped.account.reserved) == (1_095, 70), topped
    assert not stream.grant_updates and not stream.terminations
    return stream


async def snapshot(endpoint: Endpoint) -> dict[str, object]:
    """Every account, ledger entry and call, as the server answers them."""
    admin = endpoint.admin
    seen: dict[str, object] = {}
    for account_id in ACCOUNTS:
        account = await admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id=account_id), timeout=RPC_TIMEOUT_SECONDS
        )
        seen[account_id] = account.account
        entries = await admin.ListEntries(
            admin_pb2.ListEntriesRequest(account_id=account_id, limit=1_000),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        seen[f"{account_id}/entries"] = list(entries.entries)
        calls = await admin.ListCalls(
            admin_pb2.ListCallsRequest(account_id=account_id, limit=1_000),
            timeout=RPC_TIMEOUT_SECONDS,
        )
        seen[f"{account_id}/calls"] = list(calls.calls)
        for call in calls.calls:
            got = await admin.GetCall(
                admin_pb2.GetCallRequest(call_id=call.call_id), timeout=RPC_TIMEOUT_SECONDS
            )
            seen[call.call_id] = got.call
    return seen


async def expect_refused_everywhere(
    endpoint: Endpoint, stream: RawStream, *, tag: str = "f"
) -> None:
    """Changes and reads alike: UNAVAILABLE, on the stream and on the unary RPCs.

    `tag` prefixes the stream's request ids: a second round needs new ones.
    """
    reserve, release = await stream.ask(
        reserve_op(f"{tag}1", "c4", "acc-a"), release_op(f"{tag}2", "c1", 20)
    )
    assert_unavailable_outcome(reserve)
    assert_unavailable_outcome(release)
    (renew,) = await stream.ask(renew_op(f"{tag}3", "c1", 2, 15))  # the stream stays open
    assert_unavailable_outcome(renew)
    dialer, admin = endpoint.dialer, endpoint.admin
    for call in (
        admin.TopUp(FAULT_TOPUP, timeout=RPC_TIMEOUT_SECONDS),
        dialer.Reserve(
            credit_control_pb2.ReserveRequest(
                call_id="c5", account_id="acc-a", destination="84901234567"
            ),
            timeout=RPC_TIMEOUT_SECONDS,
        ),
        dialer.Renew(
            credit_control_pb2.RenewRequest(call_id="c1", sequence=2, used_seconds=15),
            timeout=RPC_TIMEOUT_SECONDS,
        ),
        dialer.Release(
            credit_control_pb2.ReleaseRequest(call_id="c1", used_seconds=20),
            timeout=RPC_TIMEOUT_SECONDS,
        ),
        admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id="acc-a"), timeout=RPC_TIMEOUT_SECONDS
        ),
        admin.ListEntries(
            admin_pb2.ListEntriesRequest(account_id="acc-a"), timeout=RPC_TIMEOUT_SECONDS
        ),
        admin.GetCall(admin_pb2.GetCallRequest(call_id="c1"), timeout=RPC_TIMEOUT_SECONDS),
    ):
        await expect_unavailable(call)
    await expect_not_serving(endpoint)


async def expect_fail_stop(endpoint: Endpoint, stream: RawStream) -> None:
    """The first change after the fault fails to commit; from then on, nothing is served."""
    await expect_unavailable(endpoint.admin.TopUp(FAULT_TOPUP, timeout=RPC_TIMEOUT_SECONDS))
    await expect_refused_everywhere(endpoint, stream)
    # Nothing that was not journaled left the server: k-fault's re-grant of c3 was not pushed.
    assert not stream.grant_updates and not stream.terminations, stream.grant_updates


async def expect_resumed_exactly(
    endpoint: Endpoint, before: dict[str, object], *, fault_topup_durable: bool = False
) -> None:
    """After the restart: exactly what was acknowledged; refused work retried applies once.

    `fault_topup_durable`: the commit of k-fault reached the database and only its reply
    was lost, so k-fault (and the re-grant of c3 it caused) is part of the state.
    """
    after = await snapshot(endpoint)
    b_before = before["acc-b"]
    assert isinstance(b_before, admin_pb2.Account)
    if not fault_topup_durable:
        assert after == before
    else:
        changed = {"acc-b", "acc-b/entries", "acc-b/calls", "c3"}
        assert {k: v for k, v in after.items() if k not in changed} == {
            k: v for k, v in before.items() if k not in changed
        }
        account = after["acc-b"]
        assert isinstance(account, admin_pb2.Account)
        assert account.balance == b_before.balance + 30
        entries_before = before["acc-b/entries"]
        entries_after = after["acc-b/entries"]
        assert isinstance(entries_before, list) and isinstance(entries_after, list)
        assert entries_after[: len(entries_before)] == entries_before
        assert [(e.kind, e.amount, e.reference) for e in entries_after[len(entries_before) :]] == [
            (admin_pb2.ENTRY_KIND_TOP_UP, 30, "during-fault")
        ]

    stream = RawStream(endpoint.dialer)
    try:
        # c3 survived; renewing it routes its pushes to this stream.
        (renewed,) = await stream.ask(renew_op("b1", "c3", 1, 0))
        grant = renewed.renew.grant
        if fault_topup_durable:  # k-fault re-granted it when it was applied
            assert (grant.allowed_seconds, grant.final) == (60, False), renewed
        else:
            assert (grant.allowed_seconds, grant.final) == (50, True), renewed

        first = await endpoint.admin.TopUp(FAULT_TOPUP, timeout=RPC_TIMEOUT_SECONDS)
        again = await endpoint.admin.TopUp(FAULT_TOPUP, timeout=RPC_TIMEOUT_SECONDS)
        assert first == again
        assert first.account.balance == b_before.balance + 30
        entries = await endpoint.admin.ListEntries(
            admin_pb2.ListEntriesRequest(account_id="acc-b"), timeout=RPC_TIMEOUT_SECONDS
        )
        entries_before = before["acc-b/entries"]
        assert isinstance(entries_before, list)
        assert len(entries.entries) == len(entries_before) + 1  # k-fault, once
        if not fault_topup_durable:  # applied now: c3's re-grant is pushed, once durable
            await stream.wait_for(lambda: any(g.call_id == "c3" for g in stream.grant_updates))
            assert [g.allowed_seconds for g in stream.grant_updates] == [60]

        (c4,) = await stream.ask(reserve_op("b2", "c4", "acc-a"))
        (c4_again,) = await stream.ask(reserve_op("b3", "c4", "acc-a"))
        assert c4.reserve.grant.allowed_seconds == 60, c4
        assert c4_again.reserve == c4.reserve
        (c1,) = await stream.ask(release_op("b4", "c1", 20))
        (c1_again,) = await stream.ask(release_op("b5", "c1", 20))
        assert c1.release.charged == 20, c1
        assert c1_again.release == c1.release
        with pytest.raises(grpc.aio.AioRpcError) as missing:  # refused, so it never happened
            await endpoint.admin.GetCall(
                admin_pb2.GetCallRequest(call_id="c5"), timeout=RPC_TIMEOUT_SECONDS
            )
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        a_before = before["acc-a"]
        assert isinstance(a_before, admin_pb2.Account)
        account_a = await endpoint.admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id="acc-a"), timeout=RPC_TIMEOUT_SECONDS
        )
        assert account_a.account.balance == a_before.balance - 20  # c1 charged once
        assert account_a.account.reserved == 60  # c4's hold; c1's is gone
        # One re-grant of c3 if k-fault was applied now; none if the retry found it done.
        assert len(stream.grant_updates) == (0 if fault_topup_durable else 1)
    finally:
        await stream.close()
