"""Servers with tokens (and TLS) on a free port, certificates made at test time (trustme).

Tokens and tenants go through a real TOML configuration file and `load_settings`, so
every test also exercises the file format operators write.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2_grpc
from callcredit_server.app import RunningServer, load_settings, start
from callcredit_server.auth import hash_token
from tests.service.conftest import UNIT_PER_SECOND, FakeClock

ADMIN_TOKEN = "admin-token-0123456789abcdef"
ACME_TOKEN = "acme-dialer-token-0123456789"  # tenant acme: every account id "acme-*"
BETA_TOKEN = "beta-dialer-token-0123456789"  # tenant beta: exactly the account "beta"
ALL_TOKENS = (ADMIN_TOKEN, ACME_TOKEN, BETA_TOKEN)

TOKENS_TOML = f"""
[tenants.acme]
account_prefix = "acme-"

[tenants.beta]
accounts = ["beta"]

[[tokens]]
name = "ops"
role = "admin"
hash = "{hash_token(ADMIN_TOKEN)}"

[[tokens]]
name = "acme-dialers"
role = "dialer"
tenant = "acme"
hash = "{hash_token(ACME_TOKEN)}"

[[tokens]]
name = "beta-dialers"
role = "dialer"
tenant = "beta"
hash = "{hash_token(BETA_TOKEN)}"
"""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def reason_of(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason of a failed RPC ("" if it carries none)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


@dataclass(frozen=True)
class Pki:
    """PEM files: our CA, the server's cert, a client cert, and a stranger CA with its own."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    folder = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("dialer-1.example")
    stranger = other.issue_cert("dialer-1.example")
    files = {
        "ca": ca.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
        "other_ca": other.cert_pem,
        "other_client_cert": stranger.cert_chain_pems[0],
        "other_client_key": stranger.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        path = folder / f"{name}.pem"
        blob.write_to_path(str(path))
        paths[name] = path
    yield Pki(**paths)


def write_config(folder: Path, text: str) -> Path:
    path = folder / "callcredit.toml"
    path.write_text(text)
    return path


@asynccontextmanager
async def secured_server(
    tmp_path: Path, config_text: str = TOKENS_TOML, **explicit: Any
) -> AsyncIterator[RunningServer]:
    """A server configured by `config_text` (tokens) plus `explicit` settings (flags)."""
    config = write_config(tmp_path, config_text)
    settings, problems = load_settings(
        {
            "listen": "127.0.0.1:0",
            "database_url": f"sqlite:///{tmp_path / 'journal.db'}",
            "snapshot_dir": str(tmp_path / "snapshots"),
            "tick_interval_ms": 20,
            **explicit,
        },
        str(config),
    )
    assert problems == []
    running = await start(settings, clock_ms=FakeClock())
    try:
        yield running
    finally:
        await running.stop(grace_seconds=0.5)


@dataclass
class Secured:
    """A token-protected server and plaintext stubs to it (tokens go per call)."""

    running: RunningServer
    channel: grpc.aio.Channel
    admin: admin_pb2_grpc.AdminServiceAsyncStub
    dialer: credit_control_pb2_grpc.CreditControlServiceAsyncStub

    async def account(self, account_id: str) -> admin_pb2.Account:
        response = await self.admin.GetAccount(
            admin_pb2.GetAccountRequest(account_id=account_id), metadata=bearer(ADMIN_TOKEN)
        )
        return response.account

    async def call(self, call_id: str) -> admin_pb2.Call:
        response = await self.admin.GetCall(
            admin_pb2.GetCallRequest(call_id=call_id), metadata=bearer(ADMIN_TOKEN)
        )
        return response.call

    def last_seq(self) -> int:
        """The journal's last record: unchanged means nothing changed state."""
        return self.running.journal.last_seq()

    async def fund(self, account_id: str, amount: int) -> None:
        """A unit-per-second tariff (shared), and the account topped up by `amount`."""
        auth = bearer(ADMIN_TOKEN)
        await self.admin.PutTariff(
            admin_pb2.PutTariffRequest(
                tariff=admin_pb2.Tariff(tariff_id="t", currency="VND", rates=[UNIT_PER_SECOND])
            ),
            metadata=auth,
        )
        await self.admin.CreateAccount(
            admin_pb2.CreateAccountRequest(account_id=account_id, currency="VND", tariff_id="t"),
            metadata=auth,
        )
        await self.admin.TopUp(
            admin_pb2.TopUpRequest(
                account_id=account_id, amount=amount, idempotency_key=f"seed-{account_id}"
            ),
            metadata=auth,
        )


@asynccontextmanager
async def secured_stubs(tmp_path: Path, config_text: str = TOKENS_TOML) -> AsyncIterator[Secured]:
    """`secured_server(tmp_path, config_text)` with a plaintext channel and both stubs."""
    async with secured_server(tmp_path, config_text) as running:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")
        try:
            yield Secured(
                running,
                channel,
                admin_pb2_grpc.AdminServiceStub(channel),
                credit_control_pb2_grpc.CreditControlServiceStub(channel),
            )
        finally:
            await channel.close()


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Secured]:
    async with secured_stubs(tmp_path) as stubs:
        yield stubs
