"""Tokens, roles and tenants over real gRPC: who may call what, and a refusal changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from callcredit.v1 import admin_pb2, credit_control_pb2
from callcredit_server.auth import Authenticator, Role, Token, bearer_token, hash_token
from tests.security.conftest import (
    ACME_TOKEN,
    ADMIN_TOKEN,
    ALL_TOKENS,
    BETA_TOKEN,
    Secured,
    bearer,
    reason_of,
)

Stream = grpc.aio.StreamStreamCall[
    credit_control_pb2.ControlRequest, credit_control_pb2.ControlResponse
]


def reserve_op(request_id: str, call_id: str, account_id: str) -> credit_control_pb2.Operation:
    return credit_control_pb2.Operation(
        request_id=request_id,
        reserve=credit_control_pb2.ReserveRequest(
            call_id=call_id, account_id=account_id, destination="84901234567", requested_seconds=60
        ),
    )


def renew_op(
    request_id: str, call_id: str, sequence: int, used: int
) -> credit_control_pb2.Operation:
    return credit_control_pb2.Operation(
        request_id=request_id,
        renew=credit_control_pb2.RenewRequest(
            call_id=call_id, sequence=sequence, used_seconds=used
        ),
    )


def release_op(request_id: str, call_id: str, used: int) -> credit_control_pb2.Operation:
    return credit_control_pb2.Operation(
        request_id=request_id,
        release=credit_control_pb2.ReleaseRequest(call_id=call_id, used_seconds=used),
    )


def error_reason(outcome: credit_control_pb2.Outcome) -> str:
    assert outcome.WhichOneof("result") == "error", outcome
    for detail in outcome.error.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError(f"no ErrorInfo in {outcome}")


async def exchange(
    stream: Stream, *operations: credit_control_pb2.Operation
) -> dict[str, credit_control_pb2.Outcome]:
    """Send one ControlRequest and read until every operation is answered."""
    await stream.write(credit_control_pb2.ControlRequest(operations=operations))
    answers: dict[str, credit_control_pb2.Outcome] = {}
    while len(answers) < len(operations):
        response = await asyncio.wait_for(stream.read(), 5)
        assert isinstance(response, credit_control_pb2.ControlResponse)
        answers.update((o.request_id, o) for o in response.outcomes)
    return answers


@pytest.fixture
async def acme_stream(secured: Secured) -> AsyncIterator[Stream]:
    stream = secured.dialer.Control(metadata=bearer(ACME_TOKEN))
    yield stream
    stream.cancel()


@pytest.fixture
async def beta_stream(secured: Secured) -> AsyncIterator[Stream]:
    stream = secured.dialer.Control(metadata=bearer(BETA_TOKEN))
    yield stream
    stream.cancel()


async def refused(rpc: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await rpc
    return caught.value.code(), reason_of(caught.value)


async def stream_refused(stream: Stream) -> tuple[grpc.StatusCode, str]:
    """A Control stream the interceptor refused ends with its status at the first read."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.write(
            credit_control_pb2.ControlRequest(operations=[reserve_op("r", "c", "x")])
        )
        await stream.read()
    return caught.value.code(), reason_of(caught.value)


# ------------------------------------------------------------------ authentication

BAD_HEADERS: list[tuple[tuple[str, str], ...]] = [
    (),  # no header at all
    bearer("not-a-configured-token-000000"),
    bearer(ADMIN_TOKEN + "x"),
    (("authorization", f"Basic {ADMIN_TOKEN}"),),
    (("authorization", "Bearer "),),
    (("authorization", ADMIN_TOKEN),),
]


@pytest.mark.parametrize("metadata", BAD_HEADERS, ids=range(len(BAD_HEADERS)))
async def test_no_or_unknown_token_is_unauthenticated_everywhere(
    secured: Secured, metadata: tuple[tuple[str, str], ...]
) -> None:
    await secured.fund("acme-1", 100)
    before = secured.last_seq()
    unauthenticated = (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED")
    assert (
        await refused(
            secured.admin.GetAccount(
                admin_pb2.GetAccountRequest(account_id="acme-1"), metadata=metadata
            )
        )
        == unauthenticated
    )
    assert (
        await refused(
            secured.admin.TopUp(
                admin_pb2.TopUpRequest(account_id="acme-1", amount=5, idempotency_key="k"),
                metadata=metadata,
            )
        )
        == unauthenticated
    )
    assert (
        await refused(
            secured.dialer.Reserve(reserve_op("r", "c-1", "acme-1").reserve, metadata=metadata)
        )
        == unauthenticated
    )
    assert await stream_refused(secured.dialer.Control(metadata=metadata)) == unauthenticated
    assert secured.last_seq() == before
    assert (await secured.account("acme-1")).balance == 100


async def test_health_and_reflection_need_no_token(secured: Secured) -> None:
    health = health_pb2_grpc.HealthStub(secured.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(secured.channel)
    call = reflection.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    names = {s.name for s in response.list_services_response.service}
    assert {"callcredit.v1.AdminService", "callcredit.v1.CreditControlService"} <= names


async def test_unknown_method_stays_unimplemented(secured: Secured) -> None:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = secured.channel.unary_unary(
        "/callcredit.v1.AdminService/NoSuchMethod"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"", metadata=bearer(ADMIN_TOKEN))
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED


# ---------------------------------------------------------------------------- roles


async def test_each_role_calls_its_own_service_only(secured: Secured) -> None:
    await secured.fund("acme-1", 100)
    denied = (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    for token in (ACME_TOKEN, BETA_TOKEN):  # dialers cannot read or move money
        assert (
            await refused(
                secured.admin.GetAccount(
                    admin_pb2.GetAccountRequest(account_id="acme-1"), metadata=bearer(token)
                )
            )
            == denied
        )
        assert (
            await refused(
                secured.admin.TopUp(
                    admin_pb2.TopUpRequest(account_id="acme-1", amount=5, idempotency_key="k"),
                    metadata=bearer(token),
                )
            )
            == denied
        )
    before = secured.last_seq()
    # An admin token does not dial (auth.py: roles do not overlap).
    assert (
        await refused(
            secured.dialer.Reserve(
                reserve_op("r", "c-1", "acme-1").reserve, metadata=bearer(ADMIN_TOKEN)
            )
        )
        == denied
    )
    assert await stream_refused(secured.dialer.Control(metadata=bearer(ADMIN_TOKEN))) == denied
    assert secured.last_seq() == before
    account = await secured.account("acme-1")
    assert (account.balance, account.reserved, account.active_calls) == (100, 0, 0)
    # ... while the right role works.
    grant = await secured.dialer.Reserve(
        reserve_op("r", "c-1", "acme-1").reserve, metadata=bearer(ACME_TOKEN)
    )
    assert grant.grant.allowed_seconds == 60


# -------------------------------------------------------------------------- tenants


async def test_reserve_on_another_tenants_account_is_denied_unary(secured: Secured) -> None:
    await secured.fund("beta", 100)
    before, account = secured.last_seq(), await secured.account("beta")
    code, reason = await refused(
        secured.dialer.Reserve(reserve_op("r", "c-1", "beta").reserve, metadata=bearer(ACME_TOKEN))
    )
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert secured.last_seq() == before
    assert await secured.account("beta") == account
    # The explicit list is exact: "beta" is beta's, "beta2" is not (and not acme's).
    await secured.fund("beta2", 100)
    assert (await refused(
        secured.dialer.Reserve(reserve_op("r", "c-2", "beta2").reserve, metadata=bearer(BETA_TOKEN))
    ))[1] == "PERMISSION_DENIED"  # fmt: skip
    ok = await secured.dialer.Reserve(
        reserve_op("r", "c-3", "beta").reserve, metadata=bearer(BETA_TOKEN)
    )
    assert ok.grant.allowed_seconds == 60


async def test_reserve_on_another_tenants_account_is_denied_on_the_stream(
    secured: Secured, acme_stream: Stream
) -> None:
    await secured.fund("beta", 100)
    await secured.fund("acme-1", 100)
    before, account = secured.last_seq(), await secured.account("beta")
    answers = await exchange(acme_stream, reserve_op("r1", "c-1", "beta"))
    assert error_reason(answers["r1"]) == "PERMISSION_DENIED"
    assert answers["r1"].error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert secured.last_seq() == before
    assert await secured.account("beta") == account
    # The stream stays open, and a batch mixing both is answered op by op.
    answers = await exchange(
        acme_stream, reserve_op("r2", "c-2", "acme-1"), reserve_op("r3", "c-3", "beta")
    )
    assert answers["r2"].reserve.grant.allowed_seconds == 60
    assert error_reason(answers["r3"]) == "PERMISSION_DENIED"
    assert await secured.account("beta") == account


async def test_renew_and_release_of_another_tenants_call_are_denied_and_change_nothing(
    secured: Secured, acme_stream: Stream, beta_stream: Stream
) -> None:
    await secured.fund("acme-1", 30)  # 30 s of talk: a 60 s request gets a final 30 s grant
    await secured.fund("beta", 100)
    answers = await exchange(acme_stream, reserve_op("r1", "c-acme", "acme-1"))
    assert answers["r1"].reserve.grant.final
    seq, call, account = (
        secured.last_seq(),
        await secured.call("c-acme"),
        await secured.account("acme-1"),
    )

    # Unary, with beta's token.
    beta = bearer(BETA_TOKEN)
    for rpc in (
        secured.dialer.Renew(renew_op("x", "c-acme", 1, 10).renew, metadata=beta),
        secured.dialer.Release(release_op("x", "c-acme", 10).release, metadata=beta),
    ):
        assert await refused(rpc) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    # On beta's stream, batched with a legitimate reserve of its own.
    answers = await exchange(
        beta_stream,
        renew_op("b1", "c-acme", 2, 20),
        release_op("b2", "c-acme", 20),
        reserve_op("b3", "c-beta", "beta"),
    )
    assert error_reason(answers["b1"]) == "PERMISSION_DENIED"
    assert error_reason(answers["b2"]) == "PERMISSION_DENIED"
    assert answers["b3"].reserve.grant.allowed_seconds == 60

    assert secured.last_seq() == seq + 1  # only beta's own reserve was journaled
    assert await secured.call("c-acme") == call
    assert await secured.account("acme-1") == account

    # The refused operations did not route the call to beta's stream: a top-up re-grants
    # c-acme's final grant and the push goes to acme's stream, which carried it.
    await secured.admin.TopUp(
        admin_pb2.TopUpRequest(account_id="acme-1", amount=100, idempotency_key="more"),
        metadata=bearer(ADMIN_TOKEN),
    )
    response = await asyncio.wait_for(acme_stream.read(), 5)
    assert isinstance(response, credit_control_pb2.ControlResponse)
    assert [g.call_id for g in response.grant_updates] == ["c-acme"]
    # Beta's stream, answered after that push was sent, carried no push of c-acme.
    await beta_stream.write(
        credit_control_pb2.ControlRequest(operations=[release_op("b4", "c-beta", 5)])
    )
    response = await asyncio.wait_for(beta_stream.read(), 5)
    assert isinstance(response, credit_control_pb2.ControlResponse)
    assert [o.release.charged for o in response.outcomes] == [5]
    assert not response.grant_updates and not response.terminations
    # Acme's call is intact: it renews and releases as if nothing happened.
    answers = await exchange(
        acme_stream, renew_op("a1", "c-acme", 1, 10), release_op("a2", "c-acme", 12)
    )
    assert answers["a1"].renew.grant.allowed_seconds == 70
    assert answers["a2"].release.charged == 12


async def test_unknown_call_is_not_found_not_denied(secured: Secured) -> None:
    """The guard needs the call's account; a call nobody has is the machine's CALL_NOT_FOUND."""
    assert await refused(
        secured.dialer.Renew(renew_op("x", "nobody", 1, 1).renew, metadata=bearer(BETA_TOKEN))
    ) == (grpc.StatusCode.NOT_FOUND, "CALL_NOT_FOUND")


# ------------------------------------------------------------------ token handling


async def test_tokens_are_compared_in_constant_time(
    secured: Secured, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    await secured.fund("acme-1", 10)
    # Three admin RPCs (tariff, account, top-up), each compared with all three hashes.
    assert len(compared) == 3 * len(ALL_TOKENS)
    assert all(len(a) == len(b) == 32 for a, b in compared)


def test_authenticator_matches_any_position_and_compares_every_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from callcredit_server.auth import parse_token_hash

    tokens = [
        Token(f"t{n}", Role.ADMIN, parse_token_hash(hash_token(f"token-number-{n:04}")))
        for n in range(5)
    ]
    calls = 0
    real = hmac.compare_digest

    def counting(a: Any, b: Any) -> bool:
        nonlocal calls
        calls += 1
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    authenticator = Authenticator(tokens)
    for n in range(5):
        found = authenticator.identify(f"token-number-{n:04}")
        assert found is not None and found.name == f"t{n}"
    assert authenticator.identify("token-number-9999") is None
    assert calls == 6 * 5
    assert "digest" not in repr(tokens[0])


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("authorization", "bearer  abc "),), "abc"),
        ((("x-other", "1"), ("authorization", "Bearer abc")), "abc"),
        ((("authorization", "Basic abc"),), None),
        ((("authorization", "Bearer"),), None),
        ((), None),
        (None, None),
    ],
)
def test_bearer_header_parsing(
    metadata: tuple[tuple[str, str], ...] | None, expected: str | None
) -> None:
    assert bearer_token(metadata) == expected


async def test_no_token_or_hash_reaches_the_logs(
    secured: Secured, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await secured.fund("acme-1", 10)
    attempts: list[Awaitable[Any]] = [
        secured.admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id="acme-1"), metadata=bearer(token)
        )
        for token in (*ALL_TOKENS, "wrong-token-0000000000000000")
    ]
    attempts.append(
        secured.dialer.Reserve(reserve_op("r", "c", "acme-1").reserve, metadata=bearer(ADMIN_TOKEN))
    )
    for attempt in attempts:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await attempt
    text = caplog.text
    assert "refused /callcredit.v1.AdminService/GetAccount: unknown bearer token" in text
    assert "token 'acme-dialers' has role dialer" in text  # logs name tokens, by name
    for token in (*ALL_TOKENS, "wrong-token-0000000000000000"):
        assert token not in text
        assert hash_token(token) not in text
        assert hash_token(token).removeprefix("sha256:") not in text


async def test_a_full_batch_of_refusals_for_a_long_foreign_id_fits_one_answer(
    secured: Secured, acme_stream: Stream
) -> None:
    """10,000 reserves on a 790-character id outside the tenant (a legal 8 MB message):
    an id no account can have is refused as invalid and not echoed, so the answers fit
    what gRPC sends, and the stream goes on. Echoed, they came to 9.3 MB and the stream
    died RESOURCE_EXHAUSTED."""
    await secured.fund("acme-1", 100)
    before = secured.last_seq()
    foreign = "b" * 790
    operations = [reserve_op(f"r{n}", f"c-{n}", foreign) for n in range(10_000)]
    answers = await exchange(acme_stream, *operations)
    assert {answer.error.code for answer in answers.values()} == {
        grpc.StatusCode.INVALID_ARGUMENT.value[0]
    }
    assert all(foreign not in answer.error.message for answer in answers.values())
    assert secured.last_seq() == before
    answers = await exchange(acme_stream, reserve_op("ok", "c-ok", "acme-1"))
    assert answers["ok"].reserve.grant.allowed_seconds == 60
