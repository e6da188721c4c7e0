"""Bad input on every RPC gets docs/design.md's reason and changes nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from callcredit.v1 import admin_pb2, credit_control_pb2
from callcredit_server import service
from tests.service.conftest import UNIT_PER_SECOND, Harness
from tests.service.streams import RawStream, release_op, renew_op, reserve_op

LONG_ID = "x" * 129
A = admin_pb2
C = credit_control_pb2

Call = Callable[[Harness], Awaitable[Any]]


def _admin(method: str, request: Any) -> Call:
    return lambda h: getattr(h.admin, method)(request)


def _dialer(method: str, request: Any) -> Call:
    return lambda h: getattr(h.dialer, method)(request)


def _rate(**fields: Any) -> A.Rate:
    rate = A.Rate()
    rate.CopyFrom(UNIT_PER_SECOND)
    for name, value in fields.items():
        setattr(rate, name, value)
    return rate


CASES = [
    # (call, reason, field named in the BadRequest, or "" when not INVALID_ARGUMENT)
    pytest.param(_admin("TopUp", A.TopUpRequest(account_id="acc", amount=0, idempotency_key="k")),
                 "INVALID_ARGUMENT", "amount", id="topup-zero"),
    pytest.param(_admin("TopUp", A.TopUpRequest(account_id="acc", amount=-5, idempotency_key="k")),
                 "INVALID_ARGUMENT", "amount", id="topup-negative"),
    pytest.param(_admin("TopUp", A.TopUpRequest(account_id="acc", amount=10**15 + 1,
                                                idempotency_key="k")),
                 "INVALID_ARGUMENT", "amount", id="topup-huge"),
    pytest.param(_admin("TopUp", A.TopUpRequest(account_id="acc", amount=5)),
                 "INVALID_ARGUMENT", "idempotency_key", id="topup-no-key"),
    pytest.param(_admin("TopUp", A.TopUpRequest(account_id="nope", amount=5, idempotency_key="k")),
                 "ACCOUNT_NOT_FOUND", "", id="topup-unknown-account"),
    pytest.param(_admin("Adjust", A.AdjustRequest(account_id="acc", amount=0, idempotency_key="k")),
                 "INVALID_ARGUMENT", "amount", id="adjust-zero"),
    pytest.param(_admin("Adjust", A.AdjustRequest(account_id="acc", amount=-(10**15) - 1,
                                                  idempotency_key="k")),
                 "INVALID_ARGUMENT", "amount", id="adjust-huge"),
    pytest.param(_admin("Adjust", A.AdjustRequest(account_id="acc", amount=-1001,
                                                  idempotency_key="k")),
                 "INSUFFICIENT_FUNDS", "", id="adjust-below-available"),
    pytest.param(_admin("CreateAccount", A.CreateAccountRequest(account_id="", currency="VND",
                                                                tariff_id="t-acc")),
                 "INVALID_ARGUMENT", "account_id", id="create-empty-id"),
    pytest.param(_admin("CreateAccount", A.CreateAccountRequest(account_id=LONG_ID, currency="VND",
                                                                tariff_id="t-acc")),
                 "INVALID_ARGUMENT", "account_id", id="create-oversized-id"),
    pytest.param(_admin("CreateAccount", A.CreateAccountRequest(account_id="b", currency="vnd",
                                                                tariff_id="t-acc")),
                 "INVALID_ARGUMENT", "currency", id="create-bad-currency"),
    pytest.param(_admin("CreateAccount", A.CreateAccountRequest(account_id="b", currency="VND",
                                                                tariff_id="t-acc",
                                                                credit_limit=-1)),
                 "INVALID_ARGUMENT", "credit_limit", id="create-negative-credit"),
    pytest.param(_admin("CreateAccount", A.CreateAccountRequest(account_id="acc", currency="VND",
                                                                tariff_id="t-acc")),
                 "ACCOUNT_EXISTS", "", id="create-existing"),
    pytest.param(_admin("CreateAccount", A.CreateAccountRequest(account_id="b", currency="VND",
                                                                tariff_id="nope")),
                 "TARIFF_NOT_FOUND", "", id="create-unknown-tariff"),
    pytest.param(_admin("CreateAccount", A.CreateAccountRequest(account_id="b", currency="USD",
                                                                tariff_id="t-acc")),
                 "CURRENCY_MISMATCH", "", id="create-currency-mismatch"),
    pytest.param(_admin("GetAccount", A.GetAccountRequest(account_id="nope")),
                 "ACCOUNT_NOT_FOUND", "", id="get-unknown-account"),
    pytest.param(_admin("GetAccount", A.GetAccountRequest(account_id="bad id")),
                 "INVALID_ARGUMENT", "account_id", id="get-bad-account-id"),
    pytest.param(_admin("UpdateAccount", A.UpdateAccountRequest(account_id="acc", credit_limit=-1)),
                 "INVALID_ARGUMENT", "credit_limit", id="update-negative-credit"),
    pytest.param(_admin("UpdateAccount", A.UpdateAccountRequest(
                     account_id="acc", status=A.ACCOUNT_STATUS_UNSPECIFIED)),
                 "INVALID_ARGUMENT", "status", id="update-unspecified-status"),
    pytest.param(_admin("UpdateAccount", A.UpdateAccountRequest(account_id="acc", tariff_id="no")),
                 "TARIFF_NOT_FOUND", "", id="update-unknown-tariff"),
    pytest.param(_admin("UpdateAccount", A.UpdateAccountRequest(account_id="nope", credit_limit=1)),
                 "ACCOUNT_NOT_FOUND", "", id="update-unknown-account"),
    pytest.param(_admin("PutTariff", A.PutTariffRequest(tariff=A.Tariff(
                     tariff_id="t2", currency="VND", rates=[_rate(prefix="8a")]))),
                 "INVALID_ARGUMENT", "tariff.rates[0].prefix", id="tariff-non-digit-prefix"),
    pytest.param(_admin("PutTariff", A.PutTariffRequest(tariff=A.Tariff(
                     tariff_id="t2", currency="VND", rates=[_rate(), _rate()]))),
                 "INVALID_ARGUMENT", "tariff.rates[1].prefix", id="tariff-duplicate-prefix"),
    pytest.param(_admin("PutTariff", A.PutTariffRequest(tariff=A.Tariff(
                     tariff_id="t2", currency="VND",
                     rates=[_rate(price_per_minute_micros=10**12 + 1)]))),
                 "INVALID_ARGUMENT", "tariff.rates[0].price_per_minute_micros", id="tariff-price"),
    pytest.param(_admin("PutTariff", A.PutTariffRequest(tariff=A.Tariff(
                     tariff_id="t2", currency="VND", rates=[_rate(next_increment_seconds=0)]))),
                 "INVALID_ARGUMENT", "tariff.rates[0].next_increment_seconds",
                 id="tariff-zero-increment"),
    pytest.param(_admin("PutTariff", A.PutTariffRequest(tariff=A.Tariff(
                     tariff_id="t-acc", currency="USD", rates=[_rate()]))),
                 "CURRENCY_MISMATCH", "", id="tariff-currency-change"),
    pytest.param(_admin("GetTariff", A.GetTariffRequest(tariff_id="nope")),
                 "TARIFF_NOT_FOUND", "", id="get-unknown-tariff"),
    pytest.param(_admin("GetCall", A.GetCallRequest(call_id="nope")),
                 "CALL_NOT_FOUND", "", id="get-unknown-call"),
    pytest.param(_admin("GetCall", A.GetCallRequest(call_id="")),
                 "INVALID_ARGUMENT", "call_id", id="get-empty-call-id"),
    pytest.param(_admin("ListCalls", A.ListCallsRequest(account_id="acc", limit=1001)),
                 "INVALID_ARGUMENT", "limit", id="list-calls-limit"),
    pytest.param(_admin("ListCalls", A.ListCallsRequest(account_id="acc", page_token="zz")),
                 "INVALID_ARGUMENT", "page_token", id="list-calls-token"),
    pytest.param(_admin("ListCalls", A.ListCallsRequest(account_id="nope")),
                 "ACCOUNT_NOT_FOUND", "", id="list-calls-unknown-account"),
    pytest.param(_admin("ListEntries", A.ListEntriesRequest(account_id="acc", limit=-1)),
                 "INVALID_ARGUMENT", "limit", id="list-entries-limit"),
    pytest.param(_admin("ListEntries", A.ListEntriesRequest(account_id="acc", after_entry_id=-1)),
                 "INVALID_ARGUMENT", "after_entry_id", id="list-entries-after"),
    pytest.param(_dialer("Reserve", C.ReserveRequest(call_id="c", account_id="acc",
                                                     destination="84-90")),
                 "INVALID_ARGUMENT", "destination", id="reserve-non-digit-destination"),
    pytest.param(_dialer("Reserve", C.ReserveRequest(call_id="c", account_id="acc",
                                                     destination="1" * 33)),
                 "INVALID_ARGUMENT", "destination", id="reserve-long-destination"),
    pytest.param(_dialer("Reserve", C.ReserveRequest(call_id="c", account_id="acc",
                                                     destination="8490", requested_seconds=-1)),
                 "INVALID_ARGUMENT", "requested_seconds", id="reserve-negative-seconds"),
    pytest.param(_dialer("Reserve", C.ReserveRequest(call_id="c", account_id="acc",
                                                     destination="8490",
                                                     requested_seconds=86_401)),
                 "INVALID_ARGUMENT", "requested_seconds", id="reserve-huge-seconds"),
    pytest.param(_dialer("Reserve", C.ReserveRequest(call_id=LONG_ID, account_id="acc",
                                                     destination="8490")),
                 "INVALID_ARGUMENT", "call_id", id="reserve-oversized-call-id"),
    pytest.param(_dialer("Reserve", C.ReserveRequest(call_id="c", account_id="nope",
                                                     destination="8490")),
                 "ACCOUNT_NOT_FOUND", "", id="reserve-unknown-account"),
    pytest.param(_dialer("Renew", C.RenewRequest(call_id="nope", sequence=1)),
                 "CALL_NOT_FOUND", "", id="renew-unknown-call"),
    pytest.param(_dialer("Renew", C.RenewRequest(call_id="c", sequence=0)),
                 "INVALID_ARGUMENT", "sequence", id="renew-zero-sequence"),
    pytest.param(_dialer("Renew", C.RenewRequest(call_id="c", sequence=1, used_seconds=-1)),
                 "INVALID_ARGUMENT", "used_seconds", id="renew-negative-used"),
    pytest.param(_dialer("Release", C.ReleaseRequest(call_id="nope")),
                 "CALL_NOT_FOUND", "", id="release-unknown-call"),
    pytest.param(_dialer("Release", C.ReleaseRequest(call_id="c", used_seconds=86_401)),
                 "INVALID_ARGUMENT", "used_seconds", id="release-huge-used"),
]  # fmt: skip


async def _digest(h: Harness) -> tuple[Any, ...]:
    """What a refused request must not change: the account, its entries, its calls, tariffs."""
    account = await h.account("acc")
    entries = await h.admin.ListEntries(A.ListEntriesRequest(account_id="acc", limit=1000))
    calls = await h.admin.ListCalls(A.ListCallsRequest(account_id="acc", limit=1000))
    tariff = await h.admin.GetTariff(A.GetTariffRequest(tariff_id="t-acc"))
    return (account, list(entries.entries), list(calls.calls), tariff)


@pytest.mark.parametrize(("call", "reason", "field"), CASES)
async def test_bad_unary_request_is_refused_and_changes_nothing(
    harness: Harness, call: Call, reason: str, field: str
) -> None:
    await harness.funded_account("acc", 1_000)
    before = await _digest(harness)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(harness)
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None
    info, violations = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert any(d.Unpack(info) for d in status.details)
    assert (info.reason, info.domain) == (reason, "callcredit.v1")
    if field:
        assert any(d.Unpack(violations) for d in status.details)
        assert field in [v.field for v in violations.field_violations]
    assert await _digest(harness) == before


async def test_bad_operations_on_the_stream_are_answered_and_the_stream_stays_open(
    harness: Harness,
) -> None:
    await harness.funded_account("acc", 1_000)
    before = await _digest(harness)
    stream = RawStream(harness.dialer)
    outcomes = await stream.ask(
        reserve_op("a", "c1", "acc", destination="abc"),
        reserve_op("b", "c1", "nope"),
        renew_op("c", "nope", 1, 0),
        release_op("d", "nope", 0),
        credit_control_pb2.Operation(request_id="e"),
        reserve_op("f" * 129, "c1", "acc"),
    )
    reasons = []
    for outcome in outcomes:
        info = error_details_pb2.ErrorInfo()
        assert any(d.Unpack(info) for d in outcome.error.details)
        reasons.append(info.reason)
    assert reasons == [
        "INVALID_ARGUMENT",
        "ACCOUNT_NOT_FOUND",
        "CALL_NOT_FOUND",
        "CALL_NOT_FOUND",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
    ]
    assert await _digest(harness) == before
    (ok,) = await stream.ask(reserve_op("g", "c1", "acc"))
    assert ok.reserve.grant.allowed_seconds == 60
    await stream.close()


async def test_a_batch_over_ten_thousand_operations_is_refused(harness: Harness) -> None:
    await harness.funded_account("acc", 1_000)
    before = await _digest(harness)
    stream = RawStream(harness.dialer)
    await stream.send(*(release_op(f"r{n}", "nope", 0) for n in range(10_001)))
    assert await stream.ended() == grpc.StatusCode.INVALID_ARGUMENT
    assert stream.outcomes == {}
    assert await _digest(harness) == before


async def test_control_streams_past_the_limit_are_refused_and_a_closed_one_frees_a_place(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each Control stream holds buffers of its own (unsent answers, pushes): their
    number is bounded too. One more is refused UNAVAILABLE before it is read."""
    monkeypatch.setattr(service, "MAX_CONTROL_STREAMS", 2)
    await harness.funded_account("acme", 10**6)
    streams = [RawStream(harness.dialer) for _ in range(2)]
    for n, stream in enumerate(streams):  # both are open at the server
        (answer,) = await stream.ask(release_op(f"r{n}", f"no-such-call-{n}", 0))
        assert answer.WhichOneof("result") == "error"
    extra = RawStream(harness.dialer)
    assert await extra.ended() is grpc.StatusCode.UNAVAILABLE
    await streams[0].close()
    again = RawStream(harness.dialer)
    (answer,) = await again.ask(reserve_op("r-again", "c-again", "acme"))
    assert answer.WhichOneof("result") == "reserve"
    await again.close()
    await streams[1].close()
