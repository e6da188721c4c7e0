"""TLS and mutual TLS: the clients connect with the right CA and certificate, and nothing
else gets through. Certificates are made at test time (conftest.pki, trustme)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from callcredit.admin import AdminClient, RateSpec
from callcredit.cli import app as admin_cli
from callcredit.dialer import DialerClient
from callcredit.errors import CallcreditError
from callcredit_server.auth import hash_token
from callcredit_server.launch import serving
from tests.security.conftest import (
    ACME_TOKEN,
    ADMIN_TOKEN,
    ALL_TOKENS,
    TOKENS_TOML,
    Pki,
    secured_server,
    write_config,
)

SHORT = 3.0  # seconds: a refused handshake fails fast; do not wait for the default


async def _fund(
    target: str, pki: Pki, cert_file: str | None = None, key_file: str | None = None
) -> None:
    async with AdminClient(
        target, token=ADMIN_TOKEN, ca_file=str(pki.ca), cert_file=cert_file, key_file=key_file
    ) as admin:
        await admin.put_tariff("t", "VND", [RateSpec("", 60_000_000)])
        await admin.create_account("acme-1", currency="VND", tariff_id="t")
        await admin.top_up("acme-1", 1_000, idempotency_key="seed")


async def _refusal(target: str, **options: object) -> CallcreditError:
    with pytest.raises(CallcreditError) as caught:
        async with AdminClient(target, timeout_seconds=SHORT, **options) as admin:  # type: ignore[arg-type]
            await admin.get_account("acme-1")
    return caught.value


async def test_tls_with_tokens_serves_the_admin_and_dialer_libraries(
    tmp_path: Path, pki: Pki
) -> None:
    tls = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    async with secured_server(tmp_path, **tls) as running:
        target = f"localhost:{running.port}"
        await _fund(target, pki)
        async with DialerClient(target, token=ACME_TOKEN, ca_file=str(pki.ca)) as dialer:
            call = await dialer.reserve("c-1", "acme-1", "+84901234567")
            result = await call.release(used_seconds=7)
        assert (result.charged, result.balance) == (7, 993)

        # Refused: plaintext to a TLS port, a CA that did not sign the server's
        # certificate, and TLS with the right CA but no token.
        plaintext = await _refusal(target, token=ADMIN_TOKEN)
        assert plaintext.code is grpc.StatusCode.UNAVAILABLE
        stranger = await _refusal(target, token=ADMIN_TOKEN, ca_file=str(pki.other_ca))
        assert stranger.code is grpc.StatusCode.UNAVAILABLE
        no_token = await _refusal(target, ca_file=str(pki.ca))
        assert no_token.reason == "UNAUTHENTICATED"


async def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(
    tmp_path: Path, pki: Pki
) -> None:
    tls = {
        "tls_cert": str(pki.server_cert),
        "tls_key": str(pki.server_key),
        "tls_client_ca": str(pki.ca),
    }
    async with secured_server(tmp_path, **tls) as running:
        target = f"localhost:{running.port}"
        cert, key = str(pki.client_cert), str(pki.client_key)
        await _fund(target, pki, cert, key)
        async with DialerClient(
            target, token=ACME_TOKEN, ca_file=str(pki.ca), cert_file=cert, key_file=key
        ) as dialer:
            call = await dialer.reserve("c-1", "acme-1", "+84901234567")
            assert (await call.release(used_seconds=3)).charged == 3

        ca = str(pki.ca)
        no_cert = await _refusal(target, token=ADMIN_TOKEN, ca_file=ca)
        assert no_cert.code is grpc.StatusCode.UNAVAILABLE
        foreign = await _refusal(
            target,
            token=ADMIN_TOKEN,
            ca_file=ca,
            cert_file=str(pki.other_client_cert),
            key_file=str(pki.other_client_key),
        )
        assert foreign.code is grpc.StatusCode.UNAVAILABLE
        # A certificate is not a token: the bearer token is still required.
        no_token = await _refusal(target, ca_file=ca, cert_file=cert, key_file=key)
        assert no_token.reason == "UNAUTHENTICATED"


async def test_a_tls_file_the_client_cannot_use_is_refused_before_connecting(
    tmp_path: Path,
) -> None:
    with pytest.raises(OSError):
        AdminClient("localhost:1", ca_file=str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="cert_file and key_file"):
        DialerClient("localhost:1", cert_file=str(tmp_path / "c.pem"))
    with pytest.raises(ValueError, match="channel the client opens"):
        AdminClient(grpc.aio.insecure_channel("localhost:1"), tls=True)


def _cli(port: int, *args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {"COLUMNS": "200", "CALLCREDIT_TOKEN": token}
    result = CliRunner().invoke(
        admin_cli, ["--target", f"localhost:{port}", "--timeout", str(SHORT), *args], env=env
    )
    return result.exit_code, result.stdout, result.stderr


def test_admin_cli_and_server_process_over_mutual_tls_log_no_secret(
    tmp_path: Path, pki: Pki
) -> None:
    config = write_config(
        tmp_path,
        f'tls_cert = "{pki.server_cert}"\ntls_key = "{pki.server_key}"\n'
        f'tls_client_ca = "{pki.ca}"\n' + TOKENS_TOML,
    )
    log = tmp_path / "server.log"
    args = ["--config", str(config), "--listen", "127.0.0.1:0", "--log-level", "DEBUG",
            "--database-url", f"sqlite:///{tmp_path / 'journal.db'}"]  # fmt: skip
    with serving(args, log) as server:
        port = server.port
        tls = ["--ca-file", str(pki.ca)]
        mine = ["--cert-file", str(pki.client_cert), "--key-file", str(pki.client_key)]
        ok = _cli(port, *tls, *mine, "tariff", "put", "t", "--currency", "VND",
                  "--rate", ":60000000:1/1", token=ADMIN_TOKEN)  # fmt: skip
        assert ok[0] == 0, ok
        ok = _cli(port, *tls, *mine, "account", "create", "acme-1", "--currency", "VND",
                  "--tariff", "t", token=ADMIN_TOKEN)  # fmt: skip
        assert ok[0] == 0, ok
        assert (
            _cli(port, *tls, *mine, "--json", "account", "show", "acme-1", token=ADMIN_TOKEN)[0]
            == 0
        )

        code, _, err = _cli(port, *tls, *mine, "account", "show", "acme-1")
        assert (code, err.split(":")[0:2]) == (1, ["error", " UNAUTHENTICATED"])
        code, _, err = _cli(port, *tls, *mine, "account", "show", "acme-1", token=ACME_TOKEN)
        assert (code, err.split(":")[0:2]) == (1, ["error", " PERMISSION_DENIED"])
        code, _, err = _cli(port, *tls, "account", "show", "acme-1", token=ADMIN_TOKEN)
        assert code == 3 and err.startswith("error: UNAVAILABLE"), err  # no client cert
        code, _, err = _cli(port, "--ca-file", str(tmp_path / "nope.pem"), "account", "show",
                            "acme-1", token=ADMIN_TOKEN)  # fmt: skip
        assert code == 2 and "nope.pem" in err and len(err.splitlines()) == 1
    text = log.read_text()
    assert "TLS mutual, auth on (3 tokens)" in text
    assert "refused /callcredit.v1.AdminService/GetAccount: no bearer token" in text
    for token in ALL_TOKENS:
        assert token not in text
        assert hash_token(token).removeprefix("sha256:") not in text
