"""A refused operation does not move a call's pushes, across tenants (issue 9, part 1).

Tenant A holds every account "ta-*", tenant B exactly "tb-main" and "tb-2". B reserves
call b-push-1 over its Control stream; A then reserves the same call id on an account of
its own. That passes the servicer's tenant check (the account is A's) and the state
machine refuses it with CALL_ID_CONFLICT. The refusal must change nothing: B's
grant_update and termination for b-push-1 keep going to B's stream, none to A's. The
same holds on a server without tokens (two dialers, one call id), and when A's Reserve
is unary (which carries no stream to route to).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from callcredit.v1 import admin_pb2, credit_control_pb2
from callcredit_server.auth import hash_token
from tests.security.conftest import ADMIN_TOKEN, Secured, bearer, reason_of, secured_stubs
from tests.security.test_auth import Stream, error_reason, exchange, reserve_op

A_TOKEN = "tenant-a-dialer-token-0123456789"
B_TOKEN = "tenant-b-dialer-token-0123456789"

TWO_TENANTS_TOML = f"""
[tenants.a]
account_prefix = "ta-"

[tenants.b]
accounts = ["tb-main", "tb-2"]

[[tokens]]
name = "ops"
role = "admin"
hash = "{hash_token(ADMIN_TOKEN)}"

[[tokens]]
name = "a-dialers"
role = "dialer"
tenant = "a"
hash = "{hash_token(A_TOKEN)}"

[[tokens]]
name = "b-dialers"
role = "dialer"
tenant = "b"
hash = "{hash_token(B_TOKEN)}"
"""

Pushes = tuple[list[str], list[str]]  # (call ids of grant_updates, of terminations)


@pytest.fixture(params=[TWO_TENANTS_TOML, ""], ids=["tokens", "no-tokens"])
async def tenants(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Secured]:
    """The server with the two tenants' tokens, and one without any (tokens are ignored)."""
    async with secured_stubs(tmp_path, request.param) as stubs:
        yield stubs


async def pushes_until_answered(stream: Stream, marker: credit_control_pb2.Operation) -> Pushes:
    """Send `marker` and read until it is answered: every push released before its answer."""
    await stream.write(credit_control_pb2.ControlRequest(operations=[marker]))
    grants: list[str] = []
    terminations: list[str] = []
    while True:
        response = await asyncio.wait_for(stream.read(), 5)
        assert isinstance(response, credit_control_pb2.ControlResponse)
        grants += [g.call_id for g in response.grant_updates]
        terminations += [t.call_id for t in response.terminations]
        if any(o.request_id == marker.request_id for o in response.outcomes):
            return grants, terminations


async def next_pushes(stream: Stream) -> Pushes:
    response = await asyncio.wait_for(stream.read(), 5)
    assert isinstance(response, credit_control_pb2.ControlResponse)
    return (
        [g.call_id for g in response.grant_updates],
        [t.call_id for t in response.terminations],
    )


RefusedReserve = Callable[[Secured, Stream], Awaitable[str]]


async def on_the_stream(tenants: Secured, a_stream: Stream) -> str:
    answers = await exchange(a_stream, reserve_op("a1", "b-push-1", "ta-1"))
    return error_reason(answers["a1"])


async def unary(tenants: Secured, a_stream: Stream) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tenants.dialer.Reserve(
            reserve_op("a1", "b-push-1", "ta-1").reserve, metadata=bearer(A_TOKEN)
        )
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    return reason_of(caught.value)


@pytest.mark.parametrize("refused_reserve", [on_the_stream, unary], ids=["stream", "unary"])
async def test_a_conflicting_reserve_does_not_take_another_tenants_pushes(
    tenants: Secured, refused_reserve: RefusedReserve
) -> None:
    await tenants.fund("tb-2", 30)  # 30 s of talk: a 60 s request gets a final 30 s grant
    await tenants.fund("ta-1", 100)
    b_stream = tenants.dialer.Control(metadata=bearer(B_TOKEN))
    a_stream = tenants.dialer.Control(metadata=bearer(A_TOKEN))
    try:
        answers = await exchange(b_stream, reserve_op("b1", "b-push-1", "tb-2"))
        assert answers["b1"].reserve.grant.final
        seq = tenants.last_seq()

        assert await refused_reserve(tenants, a_stream) == "CALL_ID_CONFLICT"
        assert tenants.last_seq() == seq

        # A top-up re-grants b-push-1: the grant_update goes to B, nothing to A.
        await tenants.admin.TopUp(
            admin_pb2.TopUpRequest(account_id="tb-2", amount=100, idempotency_key="more"),
            metadata=bearer(ADMIN_TOKEN),
        )
        assert await pushes_until_answered(a_stream, reserve_op("m1", "ta-m1", "ta-1")) == (
            [],
            [],
        )
        assert await next_pushes(b_stream) == (["b-push-1"], [])

        # Suspending tb-2 ends b-push-1: the termination goes to B, nothing to A.
        await tenants.admin.UpdateAccount(
            admin_pb2.UpdateAccountRequest(
                account_id="tb-2", status=admin_pb2.ACCOUNT_STATUS_SUSPENDED
            ),
            metadata=bearer(ADMIN_TOKEN),
        )
        assert await pushes_until_answered(a_stream, reserve_op("m2", "ta-m2", "ta-1")) == (
            [],
            [],
        )
        assert await next_pushes(b_stream) == ([], ["b-push-1"])
    finally:
        a_stream.cancel()
        b_stream.cancel()
