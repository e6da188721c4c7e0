"""`callcredit-server`: start the balance authority.

Every flag can also be given as an environment variable CALLCREDIT_<FLAG>
(e.g. CALLCREDIT_DATABASE_URL). The process stops cleanly on SIGTERM or SIGINT:
it stops taking requests, makes everything queued durable, and exits. If the
journal cannot be written it stays up, refusing work with UNAVAILABLE and
reporting NOT_SERVING on the health service, until it is restarted.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import typer

from callcredit_server.app import DEFAULT_DATABASE_URL, Settings, start
from callcredit_server.core import InvariantViolation
from callcredit_server.journal import JournalError

app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


@app.command()
def serve(
    listen: str = typer.Option(
        "127.0.0.1:50051", envvar="CALLCREDIT_LISTEN", help="HOST:PORT to serve gRPC on."
    ),
    database_url: str = typer.Option(
        DEFAULT_DATABASE_URL,
        envvar="CALLCREDIT_DATABASE_URL",
        help="SQLAlchemy URL of the journal: a SQLite file (default) or "
        "postgresql+psycopg://user@host/db.",
    ),
    grant_seconds: int = typer.Option(
        60, envvar="CALLCREDIT_GRANT_SECONDS", help="Grant when a request names none."
    ),
    max_grant_seconds: int = typer.Option(
        600, envvar="CALLCREDIT_MAX_GRANT_SECONDS", help="The most one grant gives."
    ),
    validity_seconds: int = typer.Option(
        120,
        envvar="CALLCREDIT_VALIDITY_SECONDS",
        help="How long a call may stay silent before it expires.",
    ),
    retention_seconds: int = typer.Option(
        86_400,
        envvar="CALLCREDIT_RETENTION_SECONDS",
        help="Idempotency and reconciliation window.",
    ),
    log_level: str = typer.Option("INFO", envvar="CALLCREDIT_LOG_LEVEL"),
) -> None:
    """Serve CreditControlService and AdminService until SIGTERM/SIGINT."""
    settings = Settings(
        listen=listen,
        database_url=database_url,
        grant_seconds=grant_seconds,
        max_grant_seconds=max_grant_seconds,
        validity_seconds=validity_seconds,
        retention_seconds=retention_seconds,
    )
    problems = settings.problems()
    if problems:
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(_serve(settings))
    except (RuntimeError, JournalError, InvariantViolation) as exc:
        # Cannot bind, cannot read the journal, or the journal replays to a broken
        # state: nothing was served; say why in one line.
        typer.echo(f"error: callcredit-server could not start: {exc}", err=True)
        raise typer.Exit(1) from exc


async def _serve(settings: Settings) -> None:
    running = await start(settings)
    print(f"callcredit-server listening on port {running.port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # After a journal failure the server stays up answering UNAVAILABLE (health
    # NOT_SERVING) until the operator fixes the fault and restarts it.
    await stop.wait()
    await running.stop()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
