"""callcredit-admin: the operator's command line for AdminService.

Global options come before the command::

    callcredit-admin [--target HOST:PORT] [--json] [--timeout SECONDS]
                     [--token TOKEN] [--tls] [--ca-file PEM] [--cert-file PEM --key-file PEM]
                     COMMAND ...

``--target`` defaults to 127.0.0.1:50051 or the CALLCREDIT_TARGET environment variable.
A server with tokens needs an admin token: prefer CALLCREDIT_TOKEN to ``--token``, which
other users of the machine can read in the process list. A server with TLS needs
``--tls`` (the system's CA roots) or ``--ca-file`` (its CA), and ``--cert-file`` and
``--key-file`` too when it requires client certificates; each has a CALLCREDIT_ variable.
Output is a table for people; ``--json`` prints the answer's proto message instead
(ProtoJSON with the .proto field names, every field present, enums by their full
names such as ``ACCOUNT_STATUS_ACTIVE``, int64 fields as JSON numbers — every value
callcredit accepts is below 2^53; a larger one would be quoted, as ProtoJSON does).

Exit codes:

    0  done
    1  the server refused the request; one line on stderr, ``error: REASON: message``
       (field violations follow, indented, for INVALID_ARGUMENT). A refused request
       changed nothing.
    2  usage error (unknown option, bad value, an unreadable --ca-file/--cert-file/
       --key-file), reported before anything is sent
    3  no answer: the server is unreachable, draining or failing (UNAVAILABLE), or did
       not answer within --timeout (DEADLINE_EXCEEDED). A top-up or adjustment may or
       may not have been applied: retry it with the same --idempotency-key.

Idempotency keys: ``topup`` and ``adjust`` move money, so each request carries a key
(docs/design.md, Idempotency). Pass ``--idempotency-key`` (scripts should: one key per
intended movement of money, e.g. the invoice number). Without it the CLI generates one
and prints it on stderr *before* sending, so that whatever happens next (exit 3, a
killed terminal) the operator can retry with that key and the money moves at most once.

Negative amounts: ``adjust ACCOUNT -500`` works as written (``adjust ACCOUNT -- -500``
too); the command does not mistake ``-500`` for an option.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from callcredit.admin import DEFAULT_TIMEOUT_SECONDS, AdminClient, RateSpec
from callcredit.errors import CallcreditError
from callcredit.v1 import admin_pb2

__all__ = ["EXIT_NO_ANSWER", "EXIT_REFUSED", "app", "main"]

DEFAULT_TARGET = "127.0.0.1:50051"
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_ANSWER = 3

# The codes that mean "the server gave no verdict": the request may or may not have
# been applied, unlike a refusal, which changed nothing.
_NO_ANSWER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _Settings:
    """The global options, handed to every command through the typer context."""

    target: str
    json_output: bool
    timeout_seconds: float
    token: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class StatusChoice(enum.StrEnum):
    """The statuses an operator may set (``--status``)."""

    active = "active"
    suspended = "suspended"
    closed = "closed"


_STATUS_VALUES: dict[StatusChoice, admin_pb2.AccountStatus.ValueType] = {
    StatusChoice.active: admin_pb2.ACCOUNT_STATUS_ACTIVE,
    StatusChoice.suspended: admin_pb2.ACCOUNT_STATUS_SUSPENDED,
    StatusChoice.closed: admin_pb2.ACCOUNT_STATUS_CLOSED,
}

app = typer.Typer(
    name="callcredit-admin",
    help="Manage callcredit accounts, tariffs and money; read calls and the ledger.",
    no_args_is_help=True,
    add_completion=False,
)
tariff_app = typer.Typer(help="Create, replace and read tariffs.", no_args_is_help=True)
account_app = typer.Typer(help="Create, read and change accounts.", no_args_is_help=True)
calls_app = typer.Typer(help="List an account's calls.", no_args_is_help=True)
call_app = typer.Typer(help="Read one call.", no_args_is_help=True)
entries_app = typer.Typer(help="Read an account's ledger.", no_args_is_help=True)
app.add_typer(tariff_app, name="tariff")
app.add_typer(account_app, name="account")
app.add_typer(calls_app, name="calls")
app.add_typer(call_app, name="call")
app.add_typer(entries_app, name="entries")


@app.callback()
def _global_options(
    ctx: typer.Context,
    target: Annotated[
        str,
        typer.Option(envvar="CALLCREDIT_TARGET", help="The server, HOST:PORT."),
    ] = DEFAULT_TARGET,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the answer as JSON, for scripts.")
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(min=0.001, help="Seconds to wait for each answer before exit 3."),
    ] = DEFAULT_TIMEOUT_SECONDS,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="CALLCREDIT_TOKEN",
            help="Admin bearer token (prefer the variable: a flag shows in process lists).",
            show_default=False,
        ),
    ] = None,
    tls: Annotated[
        bool,
        typer.Option("--tls", envvar="CALLCREDIT_TLS", help="Use TLS with the system's CAs."),
    ] = False,
    ca_file: Annotated[
        str | None,
        typer.Option(envvar="CALLCREDIT_CA_FILE", help="PEM CA of the server's certificate (TLS)."),
    ] = None,
    cert_file: Annotated[
        str | None,
        typer.Option(envvar="CALLCREDIT_CERT_FILE", help="PEM client certificate (mutual TLS)."),
    ] = None,
    key_file: Annotated[
        str | None,
        typer.Option(envvar="CALLCREDIT_KEY_FILE", help="PEM key of --cert-file."),
    ] = None,
) -> None:
    ctx.obj = _Settings(
        target=target,
        json_output=json_output,
        timeout_seconds=timeout,
        token=token or None,
        tls=tls,
        ca_file=ca_file or None,
        cert_file=cert_file or None,
        key_file=key_file or None,
    )


def main() -> None:
    """The ``callcredit-admin`` console script."""
    app()


# --- tariffs ---------------------------------------------------------------------------


@tariff_app.command("put")
def tariff_put(
    ctx: typer.Context,
    tariff_id: Annotated[str, typer.Argument(help="The tariff to create or replace.")],
    currency: Annotated[
        str | None,
        typer.Option(help="ISO 4217 code, e.g. VND; may come from --file instead."),
    ] = None,
    rate: Annotated[
        list[str] | None,
        typer.Option(
            help=(
                "PREFIX:PRICE_PER_MINUTE_MICROS[:FIRST/NEXT[:CONNECT_FEE]], repeatable. "
                "An empty prefix (':...') is the default rate; increments default to 1/1."
            ),
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="A Tariff as JSON (what 'tariff show --json' prints), instead of --rate.",
        ),
    ] = None,
) -> None:
    """Create or replace a tariff, whole: rates not given are removed."""
    if file is not None and rate:
        raise typer.BadParameter("give either --rate or --file, not both")
    if file is not None:
        tariff = _read_tariff_file(file, tariff_id, currency)
        rates: list[RateSpec | admin_pb2.Rate] = list(tariff.rates)
        currency = tariff.currency
    elif rate:
        rates = [_parse_rate(text) for text in rate]
    else:
        raise typer.BadParameter("give --rate at least once, or --file")
    if not currency:
        raise typer.BadParameter("give --currency (or a currency in --file)")
    stored = _request(ctx, lambda admin: admin.put_tariff(tariff_id, currency, rates))
    _output(ctx, stored, lambda: _tariff_table(stored))


@tariff_app.command("show")
def tariff_show(
    ctx: typer.Context,
    tariff_id: Annotated[str, typer.Argument(help="The tariff to read.")],
) -> None:
    """Show a tariff and its rates."""
    tariff = _request(ctx, lambda admin: admin.get_tariff(tariff_id))
    _output(ctx, tariff, lambda: _tariff_table(tariff))


def _parse_rate(text: str) -> RateSpec:
    """Parse one --rate; only the syntax is checked here, the limits are the server's."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 4:
        _bad_rate(text, "expected PREFIX:PRICE_PER_MINUTE_MICROS[:FIRST/NEXT[:CONNECT_FEE]]")
    prefix, price = parts[0], _rate_int(text, parts[1], "PRICE_PER_MINUTE_MICROS")
    first = next_ = 1
    if len(parts) >= 3:
        first_text, slash, next_text = parts[2].partition("/")
        if not slash:
            _bad_rate(text, f"increments must be FIRST/NEXT, got {parts[2]!r}")
        first = _rate_int(text, first_text, "FIRST")
        next_ = _rate_int(text, next_text, "NEXT")
    connect_fee = _rate_int(text, parts[3], "CONNECT_FEE") if len(parts) == 4 else 0
    return RateSpec(prefix, price, first, next_, connect_fee)


def _rate_int(rate: str, text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        _bad_rate(rate, f"{name} must be an integer, got {text!r}")


def _bad_rate(rate: str, problem: str) -> NoReturn:
    raise typer.BadParameter(f"{rate!r}: {problem}", param_hint="'--rate'")


def _read_tariff_file(path: Path, tariff_id: str, currency: str | None) -> admin_pb2.Tariff:
    """Read a Tariff from JSON; its id and currency, when present, must agree with the
    command line, so that a file meant for one tariff cannot silently replace another."""
    try:
        tariff = json_format.Parse(path.read_text(encoding="utf-8"), admin_pb2.Tariff())
    except (OSError, json_format.ParseError) as exc:
        raise typer.BadParameter(f"{path}: {exc}", param_hint="'--file'") from exc
    if tariff.tariff_id and tariff.tariff_id != tariff_id:
        raise typer.BadParameter(
            f"{path} is for tariff {tariff.tariff_id!r}, not {tariff_id!r}", param_hint="'--file'"
        )
    if currency and tariff.currency and currency != tariff.currency:
        raise typer.BadParameter(
            f"{path} says currency {tariff.currency!r}, --currency says {currency!r}",
            param_hint="'--file'",
        )
    if currency:
        tariff.currency = currency
    return tariff


# --- accounts --------------------------------------------------------------------------


@account_app.command("create")
def account_create(
    ctx: typer.Context,
    account_id: Annotated[str, typer.Argument(help="The new account's id.")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code; the tariff's currency.")],
    tariff: Annotated[str, typer.Option(help="The tariff new calls are rated with.")],
    credit_limit: Annotated[
        int, typer.Option(help="How far below zero the balance may go (minor units).")
    ] = 0,
    max_concurrent_calls: Annotated[
        int, typer.Option(help="Most calls open at once; 0 means no cap.")
    ] = 0,
) -> None:
    """Open an account with a zero balance."""
    account = _request(
        ctx,
        lambda admin: admin.create_account(
            account_id,
            currency=currency,
            tariff_id=tariff,
            credit_limit=credit_limit,
            max_concurrent_calls=max_concurrent_calls,
        ),
    )
    _output(ctx, account, lambda: _account_table(account))


@account_app.command("show")
def account_show(
    ctx: typer.Context,
    account_id: Annotated[str, typer.Argument(help="The account to read.")],
) -> None:
    """Show an account's balance, holds and limits."""
    account = _request(ctx, lambda admin: admin.get_account(account_id))
    _output(ctx, account, lambda: _account_table(account))


@account_app.command("update")
def account_update(
    ctx: typer.Context,
    account_id: Annotated[str, typer.Argument(help="The account to change.")],
    status: Annotated[
        StatusChoice | None,
        typer.Option(
            case_sensitive=False,
            help="suspended stops new calls and hangs up open ones; closed is final.",
        ),
    ] = None,
    tariff: Annotated[str | None, typer.Option(help="New tariff for future calls.")] = None,
    credit_limit: Annotated[
        int | None, typer.Option(help="New credit limit (minor units).")
    ] = None,
    max_concurrent_calls: Annotated[
        int | None, typer.Option(help="New cap on open calls; 0 means no cap.")
    ] = None,
) -> None:
    """Change an account's status, tariff, credit limit or call cap; only what is given."""
    if status is None and tariff is None and credit_limit is None and max_concurrent_calls is None:
        raise typer.BadParameter(
            "nothing to change: give --status, --tariff, --credit-limit or --max-concurrent-calls"
        )
    account = _request(
        ctx,
        lambda admin: admin.update_account(
            account_id,
            status=None if status is None else _STATUS_VALUES[status],
            tariff_id=tariff,
            credit_limit=credit_limit,
            max_concurrent_calls=max_concurrent_calls,
        ),
    )
    _output(ctx, account, lambda: _account_table(account))


# --- money -----------------------------------------------------------------------------

_IdempotencyKeyOption = Annotated[
    str | None,
    typer.Option(
        help="Reuse the key of an earlier attempt to retry it safely; generated if omitted."
    ),
]


@app.command("topup")
def topup(
    ctx: typer.Context,
    account_id: Annotated[str, typer.Argument(help="The account to credit.")],
    amount: Annotated[int, typer.Argument(help="Minor units to add, > 0.")],
    idempotency_key: _IdempotencyKeyOption = None,
    reference: Annotated[str, typer.Option(help="Payment reference kept on the entry.")] = "",
) -> None:
    """Add money to an account."""
    key = _idempotency_key(idempotency_key, "top-up")
    account = _request(
        ctx,
        lambda admin: admin.top_up(account_id, amount, idempotency_key=key, reference=reference),
    )
    _output(ctx, account, lambda: _account_table(account))


# ignore_unknown_options: "-500" is not an option of this command, so the parser hands
# it on as the AMOUNT argument instead of refusing it as an unknown option.
@app.command("adjust", context_settings={"ignore_unknown_options": True})
def adjust(
    ctx: typer.Context,
    account_id: Annotated[str, typer.Argument(help="The account to adjust.")],
    amount: Annotated[int, typer.Argument(help="Signed minor units: -500 removes 500.")],
    idempotency_key: _IdempotencyKeyOption = None,
    reason: Annotated[str, typer.Option(help="Why; kept as the entry's reference.")] = "",
) -> None:
    """Add or remove money (a correction); a removal must leave available >= 0."""
    key = _idempotency_key(idempotency_key, "adjustment")
    account = _request(
        ctx, lambda admin: admin.adjust(account_id, amount, idempotency_key=key, reason=reason)
    )
    _output(ctx, account, lambda: _account_table(account))


def _idempotency_key(given: str | None, what: str) -> str:
    """The key to send: the operator's, or a new one announced before it is used."""
    if given is not None:
        return given
    key = str(uuid.uuid4())
    typer.echo(
        f"note: {what} idempotency key {key}; to retry, pass --idempotency-key {key}",
        err=True,
    )
    return key


# --- calls and the ledger --------------------------------------------------------------


@calls_app.command("list")
def calls_list(
    ctx: typer.Context,
    account_id: Annotated[str, typer.Argument(help="The account whose calls to list.")],
    active: Annotated[bool, typer.Option("--active", help="Only calls still ACTIVE.")] = False,
    limit: Annotated[int, typer.Option(help="Calls per page, 1-1000; 0 means 100.")] = 0,
    page_token: Annotated[str, typer.Option(help="From the previous page's output.")] = "",
) -> None:
    """List an account's calls, newest first, one page at a time."""
    settings = _settings(ctx)

    async def fetch(admin: AdminClient) -> tuple[admin_pb2.ListCallsResponse, str]:
        page = await admin.list_calls(
            account_id, active_only=active, limit=limit, page_token=page_token
        )
        return page, await _currency(admin, settings, account_id)

    page, currency = _request(ctx, fetch)
    _output(ctx, page, lambda: _calls_table(account_id, page, currency))
    if page.next_page_token and not settings.json_output:
        typer.echo(f"next page: --page-token {page.next_page_token}")


@call_app.command("show")
def call_show(
    ctx: typer.Context,
    call_id: Annotated[str, typer.Argument(help="The call to read.")],
) -> None:
    """Show one call: its state, time, money and frozen rate."""
    settings = _settings(ctx)

    async def fetch(admin: AdminClient) -> tuple[admin_pb2.Call, str]:
        call = await admin.get_call(call_id)
        return call, await _currency(admin, settings, call.account_id)

    call, currency = _request(ctx, fetch)
    _output(ctx, call, lambda: _call_table(call, currency))


@entries_app.command("list")
def entries_list(
    ctx: typer.Context,
    account_id: Annotated[str, typer.Argument(help="The account whose ledger to list.")],
    after: Annotated[
        int, typer.Option(help="Only entries with a greater entry id; the last one seen.")
    ] = 0,
    limit: Annotated[int, typer.Option(help="Entries per page, 1-1000; 0 means 100.")] = 0,
) -> None:
    """List an account's ledger entries, oldest first."""
    settings = _settings(ctx)

    async def fetch(admin: AdminClient) -> tuple[list[admin_pb2.LedgerEntry], str]:
        entries = await admin.list_entries(account_id, after_entry_id=after, limit=limit)
        return entries, await _currency(admin, settings, account_id)

    entries, currency = _request(ctx, fetch)
    _output(
        ctx,
        admin_pb2.ListEntriesResponse(entries=entries),
        lambda: _entries_table(account_id, entries, currency),
    )


async def _currency(admin: AdminClient, settings: _Settings, account_id: str) -> str:
    """The account's currency, for tables: calls and entries carry amounts without it.

    JSON output skips the extra read; scripts know their accounts.
    """
    if settings.json_output:
        return ""
    return (await admin.get_account(account_id)).currency


# --- running requests ------------------------------------------------------------------


class _BadOption(Exception):
    """A global option that cannot be used (a TLS file); nothing was sent."""


def _settings(ctx: typer.Context) -> _Settings:
    settings = ctx.find_object(_Settings)
    assert settings is not None, "the app callback sets the settings"
    return settings


def _request(ctx: typer.Context, send: Callable[[AdminClient], Awaitable[_T]]) -> _T:
    """Run ``send`` against the server; a CallcreditError becomes one line and an exit.

    Each command is one short asyncio.run: the CLI does one thing and exits, so it
    needs no loop of its own beyond the request.
    """
    settings = _settings(ctx)

    async def run() -> _T:
        try:
            admin = AdminClient(
                settings.target,
                timeout_seconds=settings.timeout_seconds,
                token=settings.token,
                tls=settings.tls,
                ca_file=settings.ca_file,
                cert_file=settings.cert_file,
                key_file=settings.key_file,
            )
        except (OSError, ValueError) as err:  # a TLS file unreadable, or half a pair
            raise _BadOption(str(err)) from err
        async with admin:
            return await send(admin)

    try:
        return asyncio.run(run())
    except _BadOption as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except CallcreditError as err:
        no_answer = err.code in _NO_ANSWER_CODES
        line = f"error: {err}"
        if no_answer:
            line += f" (target {settings.target})"
        typer.echo(line, err=True)
        for field, description in err.field_violations:
            typer.echo(f"  {field}: {description}", err=True)
        raise typer.Exit(EXIT_NO_ANSWER if no_answer else EXIT_REFUSED) from None


# --- output ----------------------------------------------------------------------------


def _output(ctx: typer.Context, message: Message, table: Callable[[], Table]) -> None:
    """Print ``message`` as JSON or the table built for it."""
    if _settings(ctx).json_output:
        data = json_format.MessageToDict(
            message,
            always_print_fields_with_no_presence=True,
            preserving_proto_field_name=True,
            unquote_int64_if_possible=True,
        )
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        # Made per call, not at import: it must write to the sys.stdout of the moment.
        Console().print(table())


def _account_table(account: admin_pb2.Account) -> Table:
    currency = account.currency
    cap = str(account.max_concurrent_calls) if account.max_concurrent_calls else "no cap"
    return _fields_table(
        f"Account {account.account_id}",
        [
            ("status", _enum_label(admin_pb2.AccountStatus.DESCRIPTOR, account.status)),
            ("tariff", account.tariff_id),
            ("balance", _money(account.balance, currency)),
            ("reserved", _money(account.reserved, currency)),
            ("available", _money(account.available, currency)),
            ("credit limit", _money(account.credit_limit, currency)),
            ("active calls", f"{account.active_calls} (max: {cap})"),
        ],
    )


def _tariff_table(tariff: admin_pb2.Tariff) -> Table:
    table = Table(
        "prefix",
        "price per minute (micros)",
        "increments (s)",
        "connect fee",
        title=Text(f"Tariff {tariff.tariff_id} ({tariff.currency})"),
        box=box.SIMPLE,
    )
    for rate in tariff.rates:
        table.add_row(
            Text(rate.prefix or "(default)"),
            Text(str(rate.price_per_minute_micros)),
            Text(f"{rate.first_increment_seconds}/{rate.next_increment_seconds}"),
            Text(_money(rate.connect_fee, tariff.currency)),
        )
    return table


def _call_table(call: admin_pb2.Call, currency: str) -> Table:
    rate = call.rate
    return _fields_table(
        f"Call {call.call_id}",
        [
            ("account", call.account_id),
            ("destination", call.destination),
            ("state", _enum_label(admin_pb2.CallState.DESCRIPTOR, call.state)),
            ("allowed seconds", str(call.allowed_seconds)),
            ("used seconds", str(call.used_seconds)),
            ("final grant", "yes" if call.final else "no"),
            ("held", _money(call.held, currency)),
            ("charged", _money(call.charged, currency)),
            ("shortfall", _money(call.shortfall, currency)),
            (
                "rate",
                f"prefix {rate.prefix or '(default)'}: {rate.price_per_minute_micros} micros/min, "
                f"{rate.first_increment_seconds}/{rate.next_increment_seconds} s, "
                f"connect fee {_money(rate.connect_fee, currency)}",
            ),
            ("started", _time(call.HasField("started_at"), call.started_at)),
            ("ended", _time(call.HasField("ended_at"), call.ended_at)),
            ("expires", _time(call.HasField("expires_at"), call.expires_at)),
            ("last sequence", str(call.last_sequence)),
        ],
    )


def _calls_table(account_id: str, page: admin_pb2.ListCallsResponse, currency: str) -> Table:
    table = Table(
        "call",
        "destination",
        "state",
        "allowed s",
        "used s",
        f"held ({currency})",
        f"charged ({currency})",
        "started",
        title=Text(f"Calls of {account_id}"),
        box=box.SIMPLE,
    )
    for call in page.calls:
        table.add_row(
            Text(call.call_id),
            Text(call.destination),
            Text(_enum_label(admin_pb2.CallState.DESCRIPTOR, call.state)),
            Text(str(call.allowed_seconds)),
            Text(str(call.used_seconds)),
            Text(str(call.held)),
            Text(str(call.charged)),
            Text(_time(call.HasField("started_at"), call.started_at)),
        )
    return table


def _entries_table(account_id: str, entries: list[admin_pb2.LedgerEntry], currency: str) -> Table:
    table = Table(
        "entry",
        "kind",
        f"amount ({currency})",
        f"balance after ({currency})",
        "call",
        "reference",
        "at",
        title=Text(f"Ledger of {account_id}"),
        box=box.SIMPLE,
    )
    for entry in entries:
        table.add_row(
            Text(str(entry.entry_id)),
            Text(_enum_label(admin_pb2.EntryKind.DESCRIPTOR, entry.kind)),
            Text(str(entry.amount)),
            Text(str(entry.balance_after)),
            Text(entry.call_id),
            Text(entry.reference),
            Text(_time(entry.HasField("created_at"), entry.created_at)),
        )
    return table


def _fields_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A two-column name/value table for one message.

    Every cell is a Text, never a str: rich would read markup such as "[red]" in an id or
    a reference as styling.
    """
    table = Table(show_header=False, title=Text(title), box=box.SIMPLE)
    for name, value in rows:
        table.add_row(Text(name), Text(value))
    return table


def _money(amount: int, currency: str) -> str:
    """Minor units as the integer they are, with the currency: no rounding, no float."""
    return f"{amount} {currency}"


def _enum_label(descriptor: EnumDescriptor, number: int) -> str:
    """An enum value without its buf-style prefix (ACCOUNT_STATUS_ACTIVE -> ACTIVE).

    A number this client does not know (a newer server) is shown as the number.
    """
    value = descriptor.values_by_number.get(number)
    if value is None:
        return str(number)
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", descriptor.name).upper() + "_"
    return value.name.removeprefix(prefix)


def _time(present: bool, timestamp: Timestamp) -> str:
    """A timestamp in UTC to the second, or "-" when the field is unset."""
    if not present:
        return "-"
    return timestamp.ToDatetime(tzinfo=datetime.UTC).isoformat(sep=" ", timespec="seconds")


if __name__ == "__main__":
    main()
