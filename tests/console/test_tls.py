"""The console reaches a server with TLS and tokens as the other clients do: its CA
file and an admin token, which no page shows."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from callcredit_server.launch import serving
from tests.console.processes import console_process
from tests.security.conftest import ADMIN_TOKEN, TOKENS_TOML


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    """A callcredit-server with TLS and tokens; its target, its CA and a stranger CA."""
    folder = tmp_path_factory.mktemp("tls")
    ca, stranger = trustme.CA(), trustme.CA()
    certificate = ca.issue_cert("127.0.0.1", "localhost")
    files = {"cert": certificate.cert_chain_pems[0], "key": certificate.private_key_pem}
    files |= {"ca": ca.cert_pem, "stranger": stranger.cert_pem}
    for name, blob in files.items():
        blob.write_to_path(str(folder / f"{name}.pem"))
    (folder / "callcredit.toml").write_text(TOKENS_TOML)
    args = ["--listen", "127.0.0.1:0", "--database-url", f"sqlite:///{folder / 'journal.db'}"]
    args += ["--config", str(folder / "callcredit.toml"), "--log-level", "WARNING"]
    args += ["--tls-cert", str(folder / "cert.pem"), "--tls-key", str(folder / "key.pem")]
    with serving(args, folder / "server.log", kill=True) as server:
        yield server.target, folder / "ca.pem", folder / "stranger.pem"


def page(tmp_path: Path, target: str, ca: Path, token: str | None) -> httpx.Response:
    env = {"CALLCREDIT_TOKEN": token} if token else {}
    args = ["--ca-file", str(ca)]
    with console_process(tmp_path / "console.log", target, args=args, **env) as url:
        return httpx.get(f"{url}/accounts/nobody", timeout=30)


def test_with_the_servers_ca_and_an_admin_token_the_console_is_answered(
    tls_server: tuple[str, Path, Path], tmp_path: Path
) -> None:
    target, ca, _ = tls_server
    answer = page(tmp_path, target, ca, ADMIN_TOKEN)
    assert answer.status_code == 404 and "ACCOUNT_NOT_FOUND" in answer.text
    assert ADMIN_TOKEN not in answer.text


@pytest.mark.parametrize(
    ("use_stranger_ca", "token", "says"),
    [
        pytest.param(False, None, "UNAUTHENTICATED", id="no-token"),
        pytest.param(True, ADMIN_TOKEN, "The server did not answer", id="wrong-ca"),
    ],
)
def test_without_them_the_page_says_why(
    tls_server: tuple[str, Path, Path],
    tmp_path: Path,
    use_stranger_ca: bool,
    token: str | None,
    says: str,
) -> None:
    target, ca, stranger = tls_server
    answer = page(tmp_path, target, stranger if use_stranger_ca else ca, token)
    assert answer.status_code in (409, 503) and says in answer.text
    assert ADMIN_TOKEN not in answer.text
