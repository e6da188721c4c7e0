"""Reproducers of what the fuzzing found; each now passes against the fixed server.

A finding not yet fixed is a strict xfail, which flips (and turns the suite red)
once the fix lands. See docs/hostile-input.md for each finding and its fix.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from callcredit.v1 import admin_pb2, credit_control_pb2
from tests.fuzz.checks import check_refusal, code_of, rpc_error_status
from tests.fuzz.server import RPC_TIMEOUT_SECONDS, ServerThread

A = admin_pb2
C = credit_control_pb2


def _refusal_reason(server: ServerThread, rpc: str, request: object) -> str:
    stub = server.dialer if rpc in ("Reserve", "Renew", "Release") else server.admin
    with pytest.raises(grpc.RpcError) as refused:
        getattr(stub, rpc)(request, timeout=RPC_TIMEOUT_SECONDS)
    return check_refusal(rpc_error_status(refused.value), rpc)


def test_finding_1_list_calls_page_token_of_unicode_digits(server: ServerThread) -> None:
    request = A.ListCallsRequest(account_id="acc", page_token="²")
    assert _refusal_reason(server, "ListCalls", request) == "INVALID_ARGUMENT"
    assert server.serving()


def test_finding_1_list_calls_page_token_above_int64(server: ServerThread) -> None:
    before = server.digest()
    request = A.ListCallsRequest(account_id="acc", page_token="9" * 19)
    assert _refusal_reason(server, "ListCalls", request) == "INVALID_ARGUMENT"
    assert server.digest() == before


def test_finding_2_oversized_batch_refusal_carries_error_details(server: ServerThread) -> None:
    operations = [
        C.Operation(request_id=f"r{n}", release=C.ReleaseRequest(call_id="nope"))
        for n in range(10_001)
    ]
    responses = server.dialer.Control(
        iter([C.ControlRequest(operations=operations)]), timeout=RPC_TIMEOUT_SECONDS
    )
    with pytest.raises(grpc.RpcError) as ended:
        for _ in responses:
            pass
    status = rpc_error_status(ended.value)
    assert code_of(status) == grpc.StatusCode.INVALID_ARGUMENT
    assert check_refusal(status, "Control") == "INVALID_ARGUMENT"


def test_finding_3_answer_over_the_send_limit(server: ServerThread) -> None:
    """A valid reserve, then 9,999 operations with invalid 700-character request_ids.

    The request is 7.2 MB (under the 8 MiB limit); each invalid request_id is
    echoed back with an error, so the answer is ~9.5 MB, over the send limit.
    """
    reserve = C.Operation(
        request_id="ok",
        reserve=C.ReserveRequest(call_id="f3-call", account_id="acc", destination="84901"),
    )
    junk = [
        C.Operation(request_id=f"{n:05d}" + "x" * 695, release=C.ReleaseRequest(call_id="nope"))
        for n in range(9_999)
    ]
    request = C.ControlRequest(operations=[reserve, *junk])
    assert request.ByteSize() < 8 * 1024 * 1024
    outcomes: list[C.Outcome] = []
    code = grpc.StatusCode.OK
    try:
        for response in server.dialer.Control(iter([request]), timeout=RPC_TIMEOUT_SECONDS):
            outcomes.extend(response.outcomes)
    except grpc.RpcError as error:
        code = code_of(rpc_error_status(error))
    call = server.admin.GetCall(
        A.GetCallRequest(call_id="f3-call"), timeout=RPC_TIMEOUT_SECONDS
    ).call
    executed = call.state == A.CALL_STATE_ACTIVE
    assert code == grpc.StatusCode.OK, (
        f"stream ended {code.name} after {len(outcomes)} outcomes; reserve executed: {executed}"
    )
    assert "ok" in {o.request_id for o in outcomes}


def test_finding_4_many_field_violations_reach_the_client(server: ServerThread) -> None:
    rates = [
        A.Rate(
            prefix=f"x{n}",
            price_per_minute_micros=1,
            first_increment_seconds=1,
            next_increment_seconds=1,
        )
        for n in range(1_000)
    ]
    before = server.digest()
    request = A.PutTariffRequest(tariff=A.Tariff(tariff_id="t-bad", currency="VND", rates=rates))
    assert _refusal_reason(server, "PutTariff", request) == "INVALID_ARGUMENT"
    assert server.digest() == before


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("/callcredit.v1.AdminService/GetAccount", b"\x0a\x02\xff\xfe"),  # bad UTF-8 account_id
        ("/callcredit.v1.AdminService/TopUp", b"\xff\xff\xff"),  # corrupt wire format
        ("/callcredit.v1.CreditControlService/Reserve", b"\x0a\x05ab"),  # truncated field
    ],
)
def test_finding_6_unparseable_request(server: ServerThread, method: str, body: bytes) -> None:
    before = server.digest()
    raw: Any = server.channel.unary_unary(method)
    with pytest.raises(grpc.RpcError) as refused:
        raw(body, timeout=RPC_TIMEOUT_SECONDS)
    status = rpc_error_status(refused.value)
    assert code_of(status) == grpc.StatusCode.INVALID_ARGUMENT, (
        f"{code_of(status).name}: {status.message}"
    )
    assert server.digest() == before
    assert server.serving()
