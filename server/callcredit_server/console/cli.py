"""`callcredit-console`: the web console, a separate process and a client of the server.

    callcredit-console [--target HOST:PORT] [--listen HOST:PORT] [--config FILE]
                       [--tls] [--ca-file PEM] [--cert-file PEM --key-file PEM]
    callcredit-console hash-password

The console reaches the server with an admin token (CALLCREDIT_TOKEN, --token, or
token_file in --config) and the same TLS options as callcredit-admin. It serves on
127.0.0.1:8080 by default, without a login; on any address other than 127.0.0.1, ::1
or localhost every page needs a login with the operator password (its hash in
--config, from `callcredit-console hash-password`) or the admin token. Every flag is
also read from CALLCREDIT_CONSOLE_<FLAG> (CALLCREDIT_TARGET and CALLCREDIT_TOKEN as
the CLI reads them), or from the --config TOML file; a flag wins over the environment,
which wins over the file.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import secrets
import socket
import sys
from pathlib import Path

import typer
import uvicorn

from callcredit_server.console.app import create_app
from callcredit_server.console.security import hash_password
from callcredit_server.console.settings import DEFAULT_LISTEN, DEFAULT_TARGET, load_settings
from callcredit_server.launch import write_ready_file

__all__ = ["MIN_PASSWORD_CHARS", "app", "main"]

log = logging.getLogger("callcredit.console")

MIN_PASSWORD_CHARS = 12
"""An operator password guards money; ten guesses a minute against twelve characters."""

LISTEN_BACKLOG = 128

SHUTDOWN_GRACE_SECONDS = 2
"""Open live pages are cut after this on SIGTERM (the browser reconnects to the next one)."""

app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


@app.callback(invoke_without_command=True)
def serve(
    context: typer.Context,
    config: str = typer.Option(
        "",
        envvar="CALLCREDIT_CONSOLE_CONFIG",
        help="TOML file: the flags' keys (target, listen, ...), token_file, "
        "operator_password_hash.",
    ),
    target: str = typer.Option(
        None, envvar="CALLCREDIT_TARGET", help=f"The server, HOST:PORT [{DEFAULT_TARGET}]."
    ),
    listen: str = typer.Option(
        None,
        envvar="CALLCREDIT_CONSOLE_LISTEN",
        help=f"HOST:PORT to serve on [{DEFAULT_LISTEN}]; other than loopback needs a login.",
    ),
    token: str = typer.Option(
        None,
        envvar="CALLCREDIT_TOKEN",
        help="Admin token (prefer the variable: a flag shows in process lists).",
    ),
    tls: bool = typer.Option(
        None, "--tls", envvar="CALLCREDIT_TLS", help="Reach the server over TLS."
    ),
    ca_file: str = typer.Option(
        None, envvar="CALLCREDIT_CA_FILE", help="PEM CA of the server's certificate (TLS)."
    ),
    cert_file: str = typer.Option(
        None, envvar="CALLCREDIT_CERT_FILE", help="PEM client certificate, for mutual TLS."
    ),
    key_file: str = typer.Option(
        None, envvar="CALLCREDIT_KEY_FILE", help="PEM key of --cert-file."
    ),
    log_level: str = typer.Option(None, envvar="CALLCREDIT_CONSOLE_LOG_LEVEL", help="[INFO]"),
    ready_file: str = typer.Option(
        "",
        help="Once serving, write {port, pid} here (callcredit_server.launch reads it).",
    ),
) -> None:
    """Serve the console until SIGTERM or SIGINT."""
    if context.invoked_subcommand is not None:
        return
    given = {
        "target": target,
        "listen": listen,
        "token": token,
        "tls": tls,
        "ca_file": ca_file,
        "cert_file": cert_file,
        "key_file": key_file,
        "log_level": log_level,
    }
    settings, problems = load_settings(
        {key: value for key, value in given.items() if value is not None}, config
    )
    if problems:
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(2)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((settings.host, settings.port))
        listener.listen(LISTEN_BACKLOG)  # connections wait here until the app has started
    except OSError as exc:
        typer.echo(f"error: cannot listen on {settings.listen}: {exc}", err=True)
        raise typer.Exit(1) from exc
    host, port = listener.getsockname()[:2]

    def on_started() -> None:
        if ready_file:
            write_ready_file(Path(ready_file), port)

    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, on_started),
            log_level=settings.log_level.lower(),
            access_log=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
            log_config=None,
        )
    )
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    log.info(
        "callcredit-console for %s listening on http://%s:%d (%s)",
        settings.target,
        shown,
        port,
        "login required" if settings.login_required else "loopback, no login",
    )
    asyncio.run(server.serve(sockets=[listener]))


@app.command("hash-password")
def hash_password_command() -> None:
    """Print the operator_password_hash of a password read from standard input (a prompt
    on a terminal), for the console's --config file."""
    password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline()
    password = password.rstrip("\n")
    if len(password) < MIN_PASSWORD_CHARS:
        typer.echo(f"error: a password needs at least {MIN_PASSWORD_CHARS} characters", err=True)
        raise typer.Exit(2)
    typer.echo(hash_password(password, secrets.token_bytes(16)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
