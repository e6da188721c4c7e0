"""`callcredit-server`: start the balance authority, or check and prune its journal.

    callcredit-server [--config FILE] [--listen HOST:PORT] [...]    serve
    callcredit-server verify [--database-url URL] [--snapshot-dir DIR]
    callcredit-server prune  [--database-url URL] [--snapshot-dir DIR]
                             [--archive FILE] [--yes]
    callcredit-server upgrade-journal [--database-url URL]
    callcredit-server hash-token [--generate]

Every flag can also be given as an environment variable CALLCREDIT_<FLAG>
(e.g. CALLCREDIT_DATABASE_URL) or as a key of the --config TOML file (the
flag's name with '_' for '-', e.g. database_url), which also holds the
tokens and tenants. A flag wins over the environment, which wins over the
file. Settings that cannot work together are refused at start, one line
each, exit 2 (docs/operations.md).

Without --config there are no tokens and no TLS, and the server may listen
only on a loopback address; any other needs TLS and tokens, or --insecure.

On SIGTERM or SIGINT the server drains: health turns NOT_SERVING and new
reserves are refused with UNAVAILABLE while renewals and releases are answered
for up to --drain-seconds (less once no call is open, or no dialer has been
connected for 6 s; a second signal ends the drain at once); then it closes every
stream, makes everything queued durable, and exits 0. If the
journal cannot be written it stays up, refusing work with UNAVAILABLE and
reporting NOT_SERVING on the health service, until it is restarted.
"""

from __future__ import annotations

import asyncio
import getpass
import gzip
import json
import logging
import signal
import sys
from pathlib import Path

import typer

from callcredit_server import logs
from callcredit_server.app import (
    DEFAULT_DATABASE_URL,
    LOG_LEVELS,
    Settings,
    load_settings,
    run_loop,
    start,
)
from callcredit_server.auth import MIN_TOKEN_LENGTH, hash_token, new_token
from callcredit_server.core import InvariantViolation
from callcredit_server.journal import SCHEMA_VERSION, Journal, JournalError, upgrade_journal
from callcredit_server.launch import write_ready_file
from callcredit_server.recovery import settle_heap, verify
from callcredit_server.snapshot import SnapshotError, list_snapshots, read_snapshot

app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)
# By name: `python -m callcredit_server.cli` runs this module as __main__.
log = logging.getLogger("callcredit_server.cli")
_DEFAULTS = Settings()
_EXPLICIT = ("COMMANDLINE", "ENVIRONMENT")  # click ParameterSource names (typer vendors click)

DATABASE_URL = typer.Option(
    DEFAULT_DATABASE_URL,
    envvar="CALLCREDIT_DATABASE_URL",
    help="SQLAlchemy URL of the journal: a SQLite file (default) or "
    "postgresql+psycopg://user@host/db.",
)
SNAPSHOT_DIR = typer.Option(
    "",
    envvar="CALLCREDIT_SNAPSHOT_DIR",
    help="Folder of snapshots (each journal uses a subfolder named by its id); "
    "default: 'snapshots' beside a SQLite journal, else $STATE_DIRECTORY/snapshots "
    "(systemd), $XDG_STATE_HOME/callcredit/snapshots or ~/.local/state/callcredit/snapshots.",
)


@app.callback(invoke_without_command=True)
def serve(
    context: typer.Context,
    config: str = typer.Option(
        "",
        envvar="CALLCREDIT_CONFIG",
        help="TOML file of settings (keys: the flags below with '_' for '-'), "
        "\\[\\[tokens]] and \\[tenants.NAME]. Flags and environment override it.",
    ),
    listen: str = typer.Option(
        _DEFAULTS.listen,
        envvar="CALLCREDIT_LISTEN",
        help="HOST:PORT to serve gRPC on. A non-loopback address needs TLS and tokens, "
        "or --insecure.",
    ),
    database_url: str = DATABASE_URL,
    grant_seconds: int = typer.Option(
        _DEFAULTS.grant_seconds,
        envvar="CALLCREDIT_GRANT_SECONDS",
        help="Grant when a request names none.",
    ),
    max_grant_seconds: int = typer.Option(
        _DEFAULTS.max_grant_seconds,
        envvar="CALLCREDIT_MAX_GRANT_SECONDS",
        help="The most one grant gives.",
    ),
    validity_seconds: int = typer.Option(
        _DEFAULTS.validity_seconds,
        envvar="CALLCREDIT_VALIDITY_SECONDS",
        help="How long a call may stay silent before it expires.",
    ),
    retention_seconds: int = typer.Option(
        _DEFAULTS.retention_seconds,
        envvar="CALLCREDIT_RETENTION_SECONDS",
        help="Idempotency and reconciliation window.",
    ),
    snapshot_dir: str = SNAPSHOT_DIR,
    snapshot_every_records: int = typer.Option(
        _DEFAULTS.snapshot_every_records,
        envvar="CALLCREDIT_SNAPSHOT_EVERY_RECORDS",
        help="Write a snapshot every N journal records (0: never).",
    ),
    event_loop: str = typer.Option(
        _DEFAULTS.event_loop,
        envvar="CALLCREDIT_EVENT_LOOP",
        help="auto (uvloop where installed: less CPU per message), uvloop or asyncio.",
    ),
    log_level: str = typer.Option(
        _DEFAULTS.log_level, envvar="CALLCREDIT_LOG_LEVEL", help=", ".join(LOG_LEVELS) + "."
    ),
    tls_cert: str = typer.Option(
        "",
        envvar="CALLCREDIT_TLS_CERT",
        help="PEM certificate chain of the server: serve TLS (needs --tls-key).",
    ),
    tls_key: str = typer.Option(
        "", envvar="CALLCREDIT_TLS_KEY", help="PEM private key of --tls-cert."
    ),
    tls_client_ca: str = typer.Option(
        "",
        envvar="CALLCREDIT_TLS_CLIENT_CA",
        help="PEM CA bundle: mutual TLS, every client must present a certificate it signed "
        "(needs --tls-cert).",
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        envvar="CALLCREDIT_INSECURE",
        help="Allow a non-loopback --listen without TLS and tokens (a trusted network only).",
    ),
    check_config: bool = typer.Option(
        False,
        "--check-config",
        help="Validate the settings, print them (tokens by name only) and exit.",
    ),
    log_format: str = typer.Option(
        "text", envvar="CALLCREDIT_LOG_FORMAT", help="text, or json: one JSON object per line."
    ),
    metrics_listen: str = typer.Option(
        _DEFAULTS.metrics_listen,
        envvar="CALLCREDIT_METRICS_LISTEN",
        help="HOST:PORT to serve Prometheus metrics on (GET /metrics); default: off.",
    ),
    drain_seconds: float = typer.Option(
        _DEFAULTS.drain_seconds,
        envvar="CALLCREDIT_DRAIN_SECONDS",
        help="On SIGTERM, answer renewals and releases this long before exiting.",
    ),
    ha: bool = typer.Option(
        False,
        "--ha",
        envvar="CALLCREDIT_HA",
        help="Hot standby: run as one of several servers on one PostgreSQL journal; the "
        "holder of the lease serves, the others tail the journal and take over when it "
        "expires. Exits 3 when deposed.",
    ),
    lease_seconds: float = typer.Option(
        _DEFAULTS.lease_seconds,
        envvar="CALLCREDIT_LEASE_SECONDS",
        help="--ha: how long the primary's lease lasts without a renewal (1-60).",
    ),
    lease_renew_seconds: float = typer.Option(
        _DEFAULTS.lease_renew_seconds,
        envvar="CALLCREDIT_LEASE_RENEW_SECONDS",
        help="--ha: how often the primary renews its lease (at most half --lease-seconds).",
    ),
    advertise: str = typer.Option(
        "",
        envvar="CALLCREDIT_ADVERTISE",
        help="--ha: HOST:PORT clients should use for this server (standbys send clients "
        "there); default: --listen's.",
    ),
    ready_file: str = typer.Option(
        "",
        envvar="CALLCREDIT_READY_FILE",
        help='Once serving, write {"port": N, "pid": P} here (atomically); removed on exit.',
    ),
) -> None:
    """Serve CreditControlService and AdminService until SIGTERM/SIGINT."""
    if context.invoked_subcommand is not None:
        level = log_level.upper() if log_level.upper() in LOG_LEVELS else "INFO"
        logs.configure(level, "text")
        return
    if log_format not in logs.FORMATS:
        typer.echo(f"error: --log-format must be one of {', '.join(logs.FORMATS)}", err=True)
        raise typer.Exit(2)
    explicit = {
        name: value
        for name, value in context.params.items()
        if name in _SETTING_NAMES and _source(context, name) in _EXPLICIT
    }
    settings, problems = load_settings(explicit, config)
    if problems:
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    if check_config:
        for line in settings.describe():
            typer.echo(line)
        return
    logs.configure(settings.log_level, log_format)
    try:
        code = run_loop(settings.event_loop, _serve(settings, log_format, ready_file))
    except (RuntimeError, OSError, JournalError, InvariantViolation) as exc:
        # Cannot bind, cannot read a TLS file or the journal, or the journal replays to
        # a broken state: nothing was served; say why in one line.
        typer.echo(f"error: callcredit-server could not start: {exc}", err=True)
        raise typer.Exit(1) from exc
    if ready_file:
        Path(ready_file).unlink(missing_ok=True)  # it serves no more
    if code:
        raise typer.Exit(code)


def _source(context: typer.Context, name: str) -> str:
    source = context.get_parameter_source(name)
    return source.name if source is not None else ""


_SETTING_NAMES = frozenset(Settings.__dataclass_fields__) - {"tokens"}


EXIT_DEPOSED = 3  # --ha: this server lost the lease; restarted, it comes back as a standby


async def _serve(settings: Settings, log_format: str, ready_file: str) -> int:
    running = await start(settings)
    settle_heap()  # here, not in start(): a test process starts and stops many servers
    message = f"callcredit-server listening on port {running.port}"
    logs.announce(log_format, message, port=running.port)
    if ready_file:
        write_ready_file(Path(ready_file), running.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # After a journal failure the server stays up answering UNAVAILABLE (health
    # NOT_SERVING) until the operator fixes the fault and restarts it. A deposed
    # --ha primary exits instead: its supervisor restarts it as a standby.
    deposed = running.standby.deposed if running.standby is not None else asyncio.Event()
    signalled = asyncio.create_task(stop.wait())
    lost = asyncio.create_task(deposed.wait())
    await asyncio.wait((signalled, lost), return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    lost.cancel()
    if deposed.is_set():
        await running.stop()
        log.critical("stopped: deposed, exiting %d", EXIT_DEPOSED)
        return EXIT_DEPOSED
    stop.clear()
    draining = asyncio.create_task(running.drain(settings.drain_seconds))
    again = asyncio.create_task(stop.wait())  # a second signal cuts the drain short
    await asyncio.wait((draining, again), return_when=asyncio.FIRST_COMPLETED)
    for task in (draining, again):
        task.cancel()
    await running.stop()
    log.info("stopped: journal flushed, exiting")
    return 0


def _snapshot_dir(database_url: str, snapshot_dir: str, journal: Journal) -> Path:
    settings = Settings(database_url=database_url, snapshot_dir=snapshot_dir)
    return settings.snapshot_root() / journal.journal_id


def _open(database_url: str) -> Journal:
    try:
        return Journal(database_url)
    except JournalError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command("verify")
def verify_command(database_url: str = DATABASE_URL, snapshot_dir: str = SNAPSHOT_DIR) -> None:
    """Replay the journal without serving and check every invariant; exit 1 on a problem.

    Safe while the server runs (it only reads).
    """
    with _open(database_url) as journal:
        directory = _snapshot_dir(database_url, snapshot_dir, journal)
        result = verify(journal, directory)
    for problem in result.problems:
        typer.echo(f"problem: {problem}", err=True)
    typer.echo(
        f"{result.records} journal records replayed, {result.snapshots_checked} snapshots "
        f"compared, {len(result.problems)} problems"
    )
    raise typer.Exit(1 if result.problems else 0)


@app.command("prune")
def prune_command(
    database_url: str = DATABASE_URL,
    snapshot_dir: str = SNAPSHOT_DIR,
    archive: str = typer.Option(
        "", help="Write the pruned records to this gzip JSON-lines file first."
    ),
    yes: bool = typer.Option(False, "--yes", help="Really delete (without it: a dry run)."),
) -> None:
    """Delete the journal records that the newest valid snapshot covers.

    Start-up then replays from that snapshot, so it must stay: keep the snapshot
    folder with the database (backups included). Safe while the server runs. Never
    past the changefeed's projection: the events of records it has not projected yet
    are derived from those records (and the projector restarts from a snapshot at or
    before its watermark), so only snapshots at or before the watermark count.
    """
    with _open(database_url) as journal:
        directory = _snapshot_dir(database_url, snapshot_dir, journal)
        projected = journal.projected_through()
        usable_through = min(journal.last_seq(), projected)
        covered = 0
        for found in list_snapshots(directory):
            try:
                covered = read_snapshot(found.path)[0]
            except SnapshotError as exc:
                typer.echo(f"skipping damaged snapshot: {exc}", err=True)
                continue
            if covered <= usable_through:
                break
            covered = 0
        already = journal.pruned_through()
        if covered <= already:
            typer.echo(
                f"nothing to prune: no valid snapshot beyond seq {already} and at or "
                f"before the changefeed's projection (seq {projected}) in {directory}"
            )
            return
        if not yes:
            typer.echo(f"would prune seq {already + 1}..{covered} (snapshot in {directory}); "
                       "run again with --yes")  # fmt: skip
            return
        if archive:
            with gzip.open(archive, "wt") as out:
                for row in journal.records(already, covered):  # seq, last_seq, at_ms, body, chain
                    out.write(json.dumps(row) + "\n")
        deleted = journal.prune(covered)
    typer.echo(f"pruned {deleted} journal records through seq {covered}")


@app.command("upgrade-journal")
def upgrade_journal_command(database_url: str = DATABASE_URL) -> None:
    """Convert a version-2 journal (one row per record) to version 3; exit 1 on a problem.

    Offline: stop every server on the journal first (a hot standby setup's lease must
    have expired). Every record's checksum is verified while it is copied; the
    version-2 journal is replaced only at the end, in one transaction, so a failed or
    interrupted conversion leaves it as it was (run it again). A journal already at
    version 3 is left as it is.
    """
    try:
        result = upgrade_journal(database_url)
    except JournalError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if result.found_version == SCHEMA_VERSION:
        typer.echo(f"the journal is already at schema version {SCHEMA_VERSION}: nothing to do")
        return
    last = result.first_seq + result.records - 1
    typer.echo(
        f"verified and converted {result.records} journal records (seq {result.first_seq}.."
        f"{last}) into {result.rows} rows: the journal is at schema version {SCHEMA_VERSION}"
    )


@app.command("hash-token")
def hash_token_command(
    generate: bool = typer.Option(
        False, "--generate", help="Make a new random token and print it with its hash."
    ),
) -> None:
    """Print the sha256:<hex> hash of a token, for a \\[\\[tokens]] entry of --config.

    The token is read from standard input (a prompt on a terminal), never from the
    command line, so it stays out of shell history and process lists. The server
    stores and logs only hashes; give the token itself to the client
    (CALLCREDIT_TOKEN, --token, or DialerClient(token=...)).
    """
    if generate:
        token = new_token()
        typer.echo(f"token: {token}")
        typer.echo(f"hash:  {hash_token(token)}")
        return
    token = getpass.getpass("token: ") if sys.stdin.isatty() else sys.stdin.readline()
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        typer.echo(
            f"error: a token needs at least {MIN_TOKEN_LENGTH} characters; "
            "--generate makes a random one",
            err=True,
        )
        raise typer.Exit(2)
    typer.echo(hash_token(token))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
