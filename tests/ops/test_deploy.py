"""What docs/operations.md tells an operator to set up, done exactly as written.

- The systemd unit (deploy/callcredit.service, shown whole in the docs) parses with
  `systemd-analyze verify` without a warning (skipped without systemd, except under CI).
- The openssl commands make a CA, a server certificate with SANs and a client
  certificate, and a server serves mutual TLS with them.
- An empty PostgreSQL database gets its tables on the first start.
- The snapshot directory does not depend on the working directory.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy

from callcredit.admin import AdminClient
from callcredit.errors import CallcreditError
from callcredit_server.app import Settings, start
from callcredit_server.journal import engine_url, history_url
from callcredit_server.launch import serving
from tests.conftest import missing_component
from tests.service.conftest import FakeClock
from tests.test_docs import marked_block

REPO = Path(__file__).resolve().parents[2]
OPERATIONS = REPO / "docs" / "operations.md"
UNIT = REPO / "deploy" / "callcredit.service"


def test_the_docs_show_the_unit_file_as_it_is() -> None:
    assert marked_block(OPERATIONS, "systemd-unit") == UNIT.read_text(encoding="utf-8")


def test_the_systemd_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        missing_component("systemd-analyze not installed (apt-get install systemd)")
    # The unit as shipped, its /opt/callcredit installation replaced by this one:
    # systemd-analyze checks that ExecStart's program exists and is executable.
    installed = str(Path(sys.executable).parent) + "/"
    unit = tmp_path / "callcredit.service"
    unit.write_text(UNIT.read_text().replace("/opt/callcredit/bin/", installed))

    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # an unknown key or a bad value is only a warning


def make_pki(folder: Path) -> None:
    """Run the docs' openssl block in `folder`, as an operator pastes it into sh."""
    subprocess.run(
        ["sh", "-e"],
        input=marked_block(OPERATIONS, "openssl"),
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_the_openssl_commands_make_certificates_a_server_serves_mutual_tls_with(
    tmp_path: Path,
) -> None:
    make_pki(tmp_path)
    ca, cert, key = (str(tmp_path / name) for name in ("ca.pem", "dialer-1.pem", "dialer-1.key"))
    args = ["--listen", "127.0.0.1:0", "--database-url", f"sqlite:///{tmp_path / 'j.db'}"]
    args += ["--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.key")]
    args += ["--tls-client-ca", ca]
    with serving(args, tmp_path / "server.log") as server:
        port = server.port
        for host in ("localhost", "127.0.0.1"):  # a DNS and an IP subjectAltName
            async with AdminClient(
                f"{host}:{port}", ca_file=ca, cert_file=cert, key_file=key
            ) as admin:
                with pytest.raises(CallcreditError) as answered:
                    await admin.get_account("nobody")
            assert answered.value.reason == "ACCOUNT_NOT_FOUND"  # the server answered
        async with AdminClient(f"localhost:{port}", timeout_seconds=3, ca_file=ca) as admin:
            with pytest.raises(CallcreditError) as refused:
                await admin.get_account("nobody")
        assert refused.value.reason == "UNAVAILABLE"  # no client certificate: no handshake
        assert "a client certificate it does not accept?" in refused.value.message


async def test_an_empty_database_gets_its_tables_on_the_first_start(
    database_url: str, tmp_path: Path
) -> None:
    engine = sqlalchemy.create_engine(database_url)
    try:
        assert sqlalchemy.inspect(engine).get_table_names() == []
        settings = Settings(
            listen="127.0.0.1:0", database_url=database_url, snapshot_dir=str(tmp_path / "s")
        )
        running = await start(settings, clock_ms=FakeClock())
        await running.stop(grace_seconds=0.1)
        tables = sorted(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    journal = ["journal", "journal_lease", "journal_meta"]
    history = ["calls", "events", "history_meta", "ledger_entries", "projection"]
    apart = history_url(engine_url(database_url))
    if apart is None:  # PostgreSQL: one database
        assert tables == sorted(journal + history)
        return
    assert tables == journal  # SQLite: the history in the file beside the journal's
    engine = sqlalchemy.create_engine(apart)
    try:
        assert sorted(sqlalchemy.inspect(engine).get_table_names()) == history
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("environ", "root"),
    [
        ({"STATE_DIRECTORY": "/var/lib/callcredit"}, "/var/lib/callcredit/snapshots"),
        ({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}, "/var/lib/a/snapshots"),
        (
            {"XDG_STATE_HOME": "/home/op/.state", "HOME": "/home/op"},
            "/home/op/.state/callcredit/snapshots",
        ),
        (
            {"XDG_STATE_HOME": "relative", "HOME": "/home/op"},
            "/home/op/.local/state/callcredit/snapshots",
        ),
        ({"HOME": "/home/op"}, "/home/op/.local/state/callcredit/snapshots"),
    ],
)
def test_the_snapshot_default_of_a_server_database_does_not_depend_on_the_cwd(
    environ: dict[str, str], root: str
) -> None:
    settings = Settings(database_url="postgresql+psycopg://u@db.internal/callcredit")
    assert settings.snapshot_root(environ) == Path(root)


def test_a_sqlite_journal_keeps_its_snapshots_beside_it_and_a_flag_wins() -> None:
    beside = Settings(database_url="sqlite:////var/lib/callcredit/journal.db")
    flagged = Settings(database_url="postgresql+psycopg://u@h/d", snapshot_dir="/srv/snaps")
    assert beside.snapshot_root({}) == Path("/var/lib/callcredit/snapshots")
    assert flagged.snapshot_root({}) == Path("/srv/snaps")
