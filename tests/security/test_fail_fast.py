"""Clients that cannot reach their server fail within their bound and say why.

Real servers (in-process, plaintext or TLS) and real closed ports; the cause must be named:
connection refused, DNS failure, TLS expected, TLS handshake failed, unauthenticated.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import pytest

from callcredit.admin import AdminClient
from callcredit.connect import PROBE_TIMEOUT_SECONDS, Probe, Reach, explain, split_target
from callcredit.dialer import DialerClient
from callcredit.errors import CallcreditError
from tests.security.conftest import ADMIN_TOKEN, Pki, secured_server

BOUND = 1.0  # seconds: the connect timeout these tests give the dialer
# The bound, one diagnosis, and room for a loaded machine.
WITHIN = BOUND + PROBE_TIMEOUT_SECONDS + 2.0


def closed_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def admin_error(target: str, **options: object) -> CallcreditError:
    with pytest.raises(CallcreditError) as caught:
        async with AdminClient(target, timeout_seconds=BOUND, **options) as admin:  # type: ignore[arg-type]
            await admin.get_account("acme-1")
    return caught.value


async def reserve_error(target: str, **options: object) -> tuple[CallcreditError, float]:
    started = time.monotonic()
    with pytest.raises(CallcreditError) as caught:
        async with DialerClient(target, connect_timeout_seconds=BOUND, **options) as dialer:  # type: ignore[arg-type]
            await dialer.reserve("c-1", "acme-1", "+84901234567")
    return caught.value, time.monotonic() - started


async def test_a_closed_port_is_connection_refused_within_the_bound() -> None:
    target = f"127.0.0.1:{closed_port()}"
    admin = await admin_error(target)
    dialer, seconds = await reserve_error(target)
    for error in (admin, dialer):
        assert error.reason == "UNAVAILABLE"
        assert error.message == f"cannot reach {target}: connection refused " + (
            "(is the server running, on this port?)"
        )
    assert BOUND <= seconds < WITHIN


async def test_the_dialer_keeps_failing_fast_then_recovers_when_the_server_comes_back(
    tmp_path: Path,
) -> None:
    port = closed_port()
    target = f"127.0.0.1:{port}"
    async with DialerClient(target, connect_timeout_seconds=BOUND) as dialer:
        with pytest.raises(CallcreditError, match="connection refused"):
            await dialer.reserve("c-1", "acme-1", "+84901234567")
        started = time.monotonic()
        with pytest.raises(CallcreditError, match="connection refused"):
            await dialer.reserve("c-2", "acme-1", "+84901234567")
        assert time.monotonic() - started < 0.5  # known unreachable: at once
        async with secured_server(tmp_path, config_text="", listen=target) as running:
            assert running.port == port
            deadline = time.monotonic() + WITHIN
            while True:  # the next connection attempt finds the server
                try:
                    await dialer.reserve("c-3", "acme-1", "+84901234567")
                except CallcreditError as err:
                    if err.reason != "UNAVAILABLE" and "connection refused" not in err.message:
                        assert err.reason == "ACCOUNT_NOT_FOUND"
                        break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)


async def test_an_unknown_host_is_a_dns_failure() -> None:
    target = "no-such-host.invalid:50051"
    admin = await admin_error(target)
    dialer, _ = await reserve_error(target)
    for error in (admin, dialer):
        assert error.message.startswith(f"cannot reach {target}: DNS failure"), error.message


async def test_a_tls_server_and_a_plaintext_client(tmp_path: Path, pki: Pki) -> None:
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    async with secured_server(tmp_path, **tls) as running:
        target = f"localhost:{running.port}"
        admin = await admin_error(target, token=ADMIN_TOKEN)
        dialer, seconds = await reserve_error(target)
    for error in (admin, dialer):
        assert error.message == (
            f"cannot reach {target}: the server expects TLS (pass --tls, or --ca-file with its CA)"
        )
    assert seconds < WITHIN


async def test_a_plaintext_server_and_a_tls_client(tmp_path: Path, pki: Pki) -> None:
    async with secured_server(tmp_path) as running:
        target = f"localhost:{running.port}"
        admin = await admin_error(target, token=ADMIN_TOKEN, ca_file=str(pki.ca))
        dialer, _ = await reserve_error(target, ca_file=str(pki.ca))
    for error in (admin, dialer):
        assert error.message.startswith(
            f"cannot reach {target}: TLS handshake failed: the server does not speak TLS"
        ), error.message


async def test_a_tls_server_whose_certificate_the_client_does_not_trust(
    tmp_path: Path, pki: Pki
) -> None:
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    async with secured_server(tmp_path, **tls) as running:
        target = f"localhost:{running.port}"
        admin = await admin_error(target, token=ADMIN_TOKEN, ca_file=str(pki.other_ca))
        dialer, _ = await reserve_error(target, ca_file=str(pki.other_ca))
    for error in (admin, dialer):
        assert error.message.startswith(
            f"cannot reach {target}: TLS handshake failed: the server's certificate is not "
            "trusted (unable to get local issuer certificate)"
        ), error.message


async def test_no_token_is_unauthenticated_naming_the_server(tmp_path: Path) -> None:
    async with secured_server(tmp_path) as running:
        target = f"127.0.0.1:{running.port}"
        admin = await admin_error(target)
        dialer, seconds = await reserve_error(target)
    assert admin.reason == dialer.reason == "UNAUTHENTICATED"
    assert admin.message.startswith(f"{target} said: no bearer token"), admin.message
    assert dialer.message.startswith(f"{target} refused the stream: no bearer token"), (
        dialer.message
    )
    assert seconds < BOUND  # the server answered: no need to wait for the bound


@pytest.mark.parametrize(
    ("target", "address"),
    [
        ("127.0.0.1:50051", ("127.0.0.1", 50051)),
        ("[::1]:50051", ("::1", 50051)),
        ("host.example:1", ("host.example", 1)),
        ("dns:///host.example:50051", None),
        ("unix:/run/callcredit.sock", None),
        ("::1:50051", None),
        ("host:0", None),
        ("host:x", None),
    ],
)
def test_split_target(target: str, address: tuple[str, int] | None) -> None:
    assert split_target(target) == address


def test_explain_names_the_cause_from_the_probe_alone() -> None:
    def said(probe: Probe, tls: bool) -> str:
        return explain("h:1", probe, tls=tls).removeprefix("cannot reach h:1: ")

    assert said(Probe(Reach.SILENT), False).startswith("no answer to the TCP connection")
    assert said(Probe(Reach.TCP_ONLY), False).startswith("the port accepts connections")
    assert said(Probe(Reach.TLS_OK), True).startswith("the TLS handshake succeeds")
    assert said(Probe(Reach.NOT_PROBED, "x"), True) == "not connected (x)"
