"""callcredit-admin: the operator's command line for AdminService.

Global options come before the command::

    callcredit-admin [--target HOST:PORT] [--json] [--timeout SECONDS]
                     [--token TOKEN] [--tls] [--ca-file PEM] [--cert-file PEM --key-file PEM]
                     COMMAND ...

``--target`` defaults to 127.0.0.1:50051 or the CALLCREDIT_TARGET environment variable;
``--target a:50051,b:50051`` names a primary and its hot standbys (the primary is found).
A server with tokens needs an admin token: prefer CALLCREDIT_TOKEN to ``--token``, which
other users of the machine can read in the process list. A server with TLS needs
``--tls`` (the system's CA roots) or ``--ca-file`` (its CA), and ``--cert-file`` and
``--key-file`` too when it requires client certificates; each has a CALLCREDIT_ variable.
Output is a table for people, fitted to the terminal (its width, COLUMNS, or 80 columns
when piped): long values fold onto more lines, never cut, and a list too wide hides its
least useful columns and says which. An empty list says so in a sentence. ``--json``
prints the answer's proto message instead (ProtoJSON with the .proto field names, every
field present, enums by their full names such as ``ACCOUNT_STATUS_ACTIVE``, amounts as
exact integers of the minor unit, int64 fields as JSON numbers — every value callcredit
accepts is below 2^53; a larger one would be quoted, as ProtoJSON does).

Money is shown in the currency's own units (₫20,000; $12.50) and prices per second and
per minute (money.py). An amount given as an integer is minor units, as on the wire; one
with a decimal point is major units (``topup acme 12.50`` on a USD account is 1250).

Exit codes:

    0  done
    1  the server refused the request: one line on stderr, ``error: REASON: message``
       (with the field violations the message does not already say). A refused request
       changed nothing, so no retry hint: the same request would be refused again.
    2  usage error (unknown option, bad value, an unreadable --ca-file/--cert-file/
       --key-file), reported before anything is sent
    3  no answer: the server is unreachable (the line says why: refused, DNS, TLS),
       draining or failing (UNAVAILABLE), or did not answer within --timeout
       (DEADLINE_EXCEEDED). A top-up or adjustment may or may not have been applied:
       the line ends with the --idempotency-key to retry it with.

With ``--json`` a failure is ``{"error": {"reason", "code", "message", "target",
"field_violations"?, "idempotency_key"?}}`` on stdout instead, with the same exit code;
a usage error is ``{"error": {"reason": "USAGE", "message"}}``, exit 2.

Idempotency keys: ``topup`` and ``adjust`` move money, so each request carries a key
(docs/design.md, Idempotency). Pass ``--idempotency-key`` (scripts should: one key per
intended movement of money, e.g. the invoice number). Without it the CLI generates one
and prints it on stderr *before* sending, so that whatever happens next (exit 3, a
killed terminal) the operator can retry with that key and the money moves at most once.

Negative amounts: ``adjust ACCOUNT -500`` works as written (``adjust ACCOUNT -- -500``
too), and ``topup ACCOUNT -500`` is read the same way and refused as a usage error (a
top-up adds money); neither command mistakes ``-500`` for an option.
"""

from __future__ import annotations

import asyncio
import datetime
import enum
import json
import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn, Protocol, TypeVar, cast

import grpc
import typer
from google.protobuf import json_format
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich import box
from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

from callcredit.admin import DEFAULT_TIMEOUT_SECONDS, AdminClient, RateSpec
from callcredit.errors import CallcreditError
from callcredit.money import (
    AmountError,
    format_amount,
    format_price,
    needs_currency,
    parse_amount,
    parse_price,
)
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

# Click's base of usage errors, whether typer uses click or a copy of its own (0.2x
# vendors it): the class BadParameter derives from, by name.
_CLICK_EXCEPTION: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


class _UsageError(Protocol):
    """What main() reads of a click exception."""

    exit_code: int

    def format_message(self) -> str: ...


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
        typer.Option(
            envvar="CALLCREDIT_TARGET",
            help="The server, HOST:PORT; or HOST:PORT,HOST:PORT,... (hot standbys).",
        ),
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
    """The ``callcredit-admin`` console script.

    With ``--json`` a usage error is JSON on stdout too (reason ``USAGE``, exit 2), so
    a script reads every failure the same way.
    """
    if "--json" not in sys.argv[1:]:
        app()
        return
    try:
        code = app(standalone_mode=False)
    except _CLICK_EXCEPTION as err:
        usage = cast(_UsageError, err)
        error = {"reason": "USAGE", "message": usage.format_message()}
        typer.echo(json.dumps({"error": error}, indent=2, ensure_ascii=False))
        sys.exit(usage.exit_code)
    except typer.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


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
                "PREFIX:PRICE[:FIRST/NEXT[:CONNECT_FEE]], repeatable. PRICE is micros of "
                "the minor unit per minute (1179600000), or major units per second or "
                "minute (19.66/s, 1179.6/min). An empty prefix (':...') is the default "
                "rate; increments default to 1/1; CONNECT_FEE is an amount (see topup)."
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
        rates = [_parse_rate(text, currency) for text in rate]
    else:
        raise typer.BadParameter("give --rate at least once, or --file")
    if not currency:
        raise typer.BadParameter("give --currency (or a currency in --file)")
    stored = _request(ctx, lambda admin: admin.put_tariff(tariff_id, currency, rates))
    _output(ctx, stored, _tariff_table(stored))


@tariff_app.command("show")
def tariff_show(
    ctx: typer.Context,
    tariff_id: Annotated[str, typer.Argument(help="The tariff to read.")],
) -> None:
    """Show a tariff and its rates."""
    tariff = _request(ctx, lambda admin: admin.get_tariff(tariff_id))
    _output(ctx, tariff, _tariff_table(tariff))


@tariff_app.command("list")
def tariff_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="Tariffs per page, 1-1000; 0 means 100.")] = 0,
    page_token: Annotated[str, typer.Option(help="From the previous page's output.")] = "",
) -> None:
    """List tariffs by id, with their currency and number of rates."""
    page = _request(ctx, lambda admin: admin.list_tariffs(page_size=limit, page_token=page_token))
    _output(
        ctx,
        page,
        lambda width: _tariffs_table(page.tariffs, width),
        footer=f"next page: --page-token {page.next_page_token}" if page.next_page_token else "",
    )


def _parse_rate(text: str, currency: str | None) -> RateSpec:
    """Parse one --rate; only the syntax is checked here, the limits are the server's."""
    parts = text.split(":")
    if not 2 <= len(parts) <= 4:
        _bad_rate(text, "expected PREFIX:PRICE[:FIRST/NEXT[:CONNECT_FEE]]")
    try:
        price = parse_price(parts[1], currency)
        connect_fee = parse_amount(parts[3], currency) if len(parts) == 4 else 0
    except AmountError as err:
        _bad_rate(text, str(err))
    prefix = parts[0]
    first = next_ = 1
    if len(parts) >= 3:
        first_text, slash, next_text = parts[2].partition("/")
        if not slash:
            _bad_rate(text, f"increments must be FIRST/NEXT, got {parts[2]!r}")
        first = _rate_int(text, first_text, "FIRST")
        next_ = _rate_int(text, next_text, "NEXT")
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

_THRESHOLD_HELP = (
    "Announce LOW_BALANCE on the changefeed when available funds fall below this; "
    "an amount (see topup)"
)


@account_app.command("create")
def account_create(
    ctx: typer.Context,
    account_id: Annotated[str, typer.Argument(help="The new account's id.")],
    currency: Annotated[str, typer.Option(help="ISO 4217 code; the tariff's currency.")],
    tariff: Annotated[str, typer.Option(help="The tariff new calls are rated with.")],
    credit_limit: Annotated[
        str, typer.Option(help="How far below zero the balance may go; an amount (see topup).")
    ] = "0",
    max_concurrent_calls: Annotated[
        int, typer.Option(help="Most calls open at once; 0 means no cap.")
    ] = 0,
    low_balance_threshold: Annotated[
        str, typer.Option(help=_THRESHOLD_HELP + "; 0 means off.")
    ] = "0",
) -> None:
    """Open an account with a zero balance."""
    limit = _amount(credit_limit, currency, "--credit-limit")
    threshold = _amount(low_balance_threshold, currency, "--low-balance-threshold")
    account = _request(
        ctx,
        lambda admin: admin.create_account(
            account_id,
            currency=currency,
            tariff_id=tariff,
            credit_limit=limit,
            max_concurrent_calls=max_concurrent_calls,
            low_balance_threshold=threshold,
        ),
    )
    _output(ctx, account, _account_table(account))


@account_app.command("show")
def account_show(
    ctx: typer.Context,
    account_id: Annotated[str, typer.Argument(help="The account to read.")],
) -> None:
    """Show an account's balance, holds and limits."""
    account = _request(ctx, lambda admin: admin.get_account(account_id))
    _output(ctx, account, _account_table(account))


@account_app.command("list")
def account_list(
    ctx: typer.Context,
    prefix: Annotated[str, typer.Option(help="Only accounts whose id starts with this.")] = "",
    status: Annotated[
        StatusChoice | None, typer.Option(case_sensitive=False, help="Only accounts with this.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Accounts per page, 1-1000; 0 means 100.")] = 0,
    page_token: Annotated[str, typer.Option(help="From the previous page's output.")] = "",
) -> None:
    """List accounts by id, with their balances."""
    page = _request(
        ctx,
        lambda admin: admin.list_accounts(
            page_size=limit,
            page_token=page_token,
            account_id_prefix=prefix,
            status=(
                admin_pb2.ACCOUNT_STATUS_UNSPECIFIED if status is None else _STATUS_VALUES[status]
            ),
        ),
    )
    filters = ", ".join(f for f in (f"id {prefix}*" if prefix else "", status or "") if f)
    empty = f"No accounts ({filters})." if filters else "No accounts."
    _output(
        ctx,
        page,
        lambda width: _accounts_table(page.accounts, width, empty),
        footer=f"next page: --page-token {page.next_page_token}" if page.next_page_token else "",
    )


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
        str | None, typer.Option(help="New credit limit; an amount (see topup).")
    ] = None,
    max_concurrent_calls: Annotated[
        int | None, typer.Option(help="New cap on open calls; 0 means no cap.")
    ] = None,
    low_balance_threshold: Annotated[
        str | None, typer.Option(help=_THRESHOLD_HELP + "; 0 turns it off.")
    ] = None,
) -> None:
    """Change an account's status, tariff, credit limit, call cap or low-balance
    threshold; only what is given."""
    amounts = {"--credit-limit": credit_limit, "--low-balance-threshold": low_balance_threshold}
    if (
        status is None
        and tariff is None
        and max_concurrent_calls is None
        and not any(text is not None for text in amounts.values())
    ):
        raise typer.BadParameter(
            "nothing to change: give --status, --tariff, --credit-limit, "
            "--max-concurrent-calls or --low-balance-threshold"
        )
    major = any(text is not None and _needs_currency(text, hint) for hint, text in amounts.items())

    async def send(admin: AdminClient) -> admin_pb2.Account:
        currency = (await admin.get_account(account_id)).currency if major else None
        limit = None if credit_limit is None else _amount(credit_limit, currency, "--credit-limit")
        threshold = None
        if low_balance_threshold is not None:
            threshold = _amount(low_balance_threshold, currency, "--low-balance-threshold")
        return await admin.update_account(
            account_id,
            status=None if status is None else _STATUS_VALUES[status],
            tariff_id=tariff,
            credit_limit=limit,
            max_concurrent_calls=max_concurrent_calls,
            low_balance_threshold=threshold,
        )

    account = _request(ctx, send)
    _output(ctx, account, _account_table(account))


# --- money -----------------------------------------------------------------------------

_IdempotencyKeyOption = Annotated[
    str | None,
    typer.Option(
        help="Reuse the key of an earlier attempt to retry it safely; generated if omitted."
    ),
]


_AMOUNT_HELP = (
    "An integer is minor units, as on the wire and in --json (USD 1250 = $12.50); a "
    "decimal point means major units (12.50 = $12.50; VND has no minor unit, so 20000 "
    "and 20000.0 are both 20,000 ₫). Commas may group thousands: 20,000."
)


# ignore_unknown_options (topup and adjust alike): "-500" is not an option of the
# command, so the parser hands it on as AMOUNT instead of refusing it as an option.
@app.command("topup", context_settings={"ignore_unknown_options": True}, epilog=_AMOUNT_HELP)
def topup(
    ctx: typer.Context,
    account_id: Annotated[str, typer.Argument(help="The account to credit.")],
    amount: Annotated[str, typer.Argument(help="The amount to add, > 0 (below).")],
    idempotency_key: _IdempotencyKeyOption = None,
    reference: Annotated[str, typer.Option(help="Payment reference kept on the entry.")] = "",
) -> None:
    """Add money to an account."""
    if amount.lstrip().startswith("-"):
        raise typer.BadParameter(
            "a top-up adds money: give a positive amount (adjust removes money)",
            param_hint="'AMOUNT'",
        )
    _move_money(ctx, account_id, amount, "top-up", idempotency_key, reference)


@app.command("adjust", context_settings={"ignore_unknown_options": True}, epilog=_AMOUNT_HELP)
def adjust(
    ctx: typer.Context,
    account_id: Annotated[str, typer.Argument(help="The account to adjust.")],
    amount: Annotated[str, typer.Argument(help="Signed: -500 removes 500 (below).")],
    idempotency_key: _IdempotencyKeyOption = None,
    reason: Annotated[str, typer.Option(help="Why; kept as the entry's reference.")] = "",
) -> None:
    """Add or remove money (a correction); a removal must leave available >= 0."""
    _move_money(ctx, account_id, amount, "adjustment", idempotency_key, reason)


def _move_money(
    ctx: typer.Context,
    account_id: str,
    amount_text: str,
    what: str,
    idempotency_key: str | None,
    reference: str,
) -> None:
    """A top-up or an adjustment; a decimal amount first reads the account's currency."""
    major = _needs_currency(amount_text, "AMOUNT")  # a usage error before a key is announced
    key = _idempotency_key(idempotency_key, what)

    async def send(admin: AdminClient) -> admin_pb2.Account:
        currency = (await admin.get_account(account_id)).currency if major else None
        amount = _amount(amount_text, currency, "AMOUNT")
        if what == "top-up":
            return await admin.top_up(account_id, amount, idempotency_key=key, reference=reference)
        return await admin.adjust(account_id, amount, idempotency_key=key, reason=reference)

    account = _request(ctx, send, idempotency_key=key)
    _output(ctx, account, _account_table(account))


def _needs_currency(text: str, hint: str) -> bool:
    """Whether an amount is in major units (so its currency must be read first)."""
    try:
        return needs_currency(text)
    except AmountError as err:
        raise typer.BadParameter(str(err), param_hint=f"'{hint}'") from err


def _amount(text: str, currency: str | None, hint: str) -> int:
    try:
        return parse_amount(text, currency)
    except AmountError as err:
        raise typer.BadParameter(str(err), param_hint=f"'{hint}'") from err


def _idempotency_key(given: str | None, what: str) -> str:
    """The key to send: the operator's, or a new one announced before it is used."""
    if given is not None:
        return given
    key = str(uuid.uuid4())
    # Before sending: whatever happens next (a killed terminal), the key is on screen.
    typer.echo(f"note: {what} idempotency key {key} (generated)", err=True)
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
    empty = f"No {'active ' if active else ''}calls{' on this page' if page_token else ''}."
    _output(
        ctx,
        page,
        lambda width: _calls_table(account_id, page, currency, width, empty),
        footer=f"next page: --page-token {page.next_page_token}" if page.next_page_token else "",
    )


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
    _output(ctx, call, _call_table(call, currency))


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
    empty = f"No ledger entries{f' after entry {after}' if after else ''}."
    footer = ""
    if entries and len(entries) == (limit or 100):
        footer = f"next page: --after {entries[-1].entry_id}"
    _output(
        ctx,
        admin_pb2.ListEntriesResponse(entries=entries),
        lambda width: _entries_table(account_id, entries, currency, width, empty),
        footer=footer,
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


def _request(
    ctx: typer.Context,
    send: Callable[[AdminClient], Awaitable[_T]],
    *,
    idempotency_key: str | None = None,
) -> _T:
    """Run ``send`` against the server; a CallcreditError becomes one line and an exit.

    Each command is one short asyncio.run: the CLI does one thing and exits, so it
    needs no loop of its own beyond the request. ``idempotency_key`` is the key of a
    money movement: named again, as the way to retry, only when there was no answer
    (a refusal changed nothing, and a retry would be refused the same way).
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
        _fail(settings, EXIT_USAGE, {"reason": "USAGE", "message": str(err)})
    except CallcreditError as err:
        no_answer = err.code in _NO_ANSWER_CODES
        error: dict[str, object] = {
            "reason": err.reason,
            "code": err.code.name,
            "message": err.message,
            "target": settings.target,
        }
        if err.field_violations:
            error["field_violations"] = [
                {"field": field, "description": description}
                for field, description in err.field_violations
            ]
        if no_answer and idempotency_key is not None:
            error["idempotency_key"] = idempotency_key
        _fail(settings, EXIT_NO_ANSWER if no_answer else EXIT_REFUSED, error, err)


def _fail(
    settings: _Settings,
    code: int,
    error: dict[str, object],
    err: CallcreditError | None = None,
) -> NoReturn:
    """Report a failure and exit ``code``: ``{"error": {...}}`` on stdout with --json,
    else one line on stderr (error_line)."""
    if settings.json_output:
        typer.echo(json.dumps({"error": error}, indent=2, ensure_ascii=False))
    else:
        typer.echo(_error_line(settings, error, err), err=True)
    raise typer.Exit(code)


def _error_line(settings: _Settings, error: dict[str, object], err: CallcreditError | None) -> str:
    """``error: REASON: message``, the field violations the message does not already
    say, the target when the server gave no answer, and how to retry a money movement."""
    if err is None:
        return f"error: {error['message']}"
    line = f"error: {err}"
    extra = [f"{f}: {d}" for f, d in err.field_violations if f"{f}: {d}" not in err.message]
    if extra:
        line += f" ({'; '.join(extra)})"
    if err.code in _NO_ANSWER_CODES and settings.target not in err.message:
        line += f" (target {settings.target})"
    key = error.get("idempotency_key")
    if key is not None:
        line += f"; it may or may not have been applied: retry with --idempotency-key {key}"
    return line


# --- output ----------------------------------------------------------------------------


_FOLD_AT = 20
"""Cells longer than this (a long id) fold rather than push other columns out."""


@dataclass(frozen=True, slots=True)
class _Column:
    """A column of a list table. ``hide`` 0: always shown; otherwise, when the table is
    wider than the terminal, the highest ``hide`` goes first."""

    header: str
    hide: int = 0
    right: bool = False


def _output(
    ctx: typer.Context,
    message: Message,
    render: Callable[[int], RenderableType],
    *,
    footer: str = "",
) -> None:
    """Print ``message`` as JSON, or what ``render`` makes of it for a terminal this wide
    (its width, COLUMNS, or 80 when piped), and then ``footer`` if any."""
    if _settings(ctx).json_output:
        data = json_format.MessageToDict(
            message,
            always_print_fields_with_no_presence=True,
            preserving_proto_field_name=True,
            unquote_int64_if_possible=True,
        )
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return
    # Made per call, not at import: it must write to the sys.stdout of the moment.
    console = Console()
    console.print(render(console.width))
    if footer:
        typer.echo(footer)


def _list_table(
    title: str,
    columns: Sequence[_Column],
    rows: Sequence[Sequence[str]],
    width: int,
    empty: str,
) -> RenderableType:
    """A table that fits ``width``: columns are hidden by their ``hide`` rank until the
    widest cells fit (a caption names them), and what still does not fit folds onto more
    lines; never an ellipsis. No rows: the ``empty`` sentence instead."""
    if not rows:
        return Text(empty)
    natural = [
        max(len(column.header), *(min(len(row[i]), _FOLD_AT) for row in rows))
        for i, column in enumerate(columns)
    ]
    shown = list(range(len(columns)))
    hidden: list[str] = []

    def needed() -> int:  # each cell is padded by one space a side, plus a border a column
        return sum(natural[i] + 3 for i in shown) + 1

    while needed() > width:
        candidates = [i for i in shown if columns[i].hide]
        if not candidates:
            break
        drop = max(candidates, key=lambda i: (columns[i].hide, i))
        shown.remove(drop)
        hidden.append(columns[drop].header)
    caption = f"not shown at {width} columns: {', '.join(hidden)} (--json has all)"
    table = Table(
        title=Text(title),
        caption=Text(caption) if hidden else None,
        box=box.SIMPLE,
    )
    for i in shown:
        column = columns[i]
        table.add_column(
            Text(column.header), justify="right" if column.right else "left", overflow="fold"
        )
    for row in rows:
        table.add_row(*(Text(row[i]) for i in shown))
    return table


def _account_table(account: admin_pb2.Account) -> Callable[[int], RenderableType]:
    currency = account.currency
    cap = str(account.max_concurrent_calls) if account.max_concurrent_calls else "no cap"
    threshold = (
        _money(account.low_balance_threshold, currency) if account.low_balance_threshold else "off"
    )
    empty_in = "nothing burns"
    if account.HasField("seconds_until_empty"):
        empty_in = _seconds(account.seconds_until_empty)
    return _fields_table(
        f"Account {account.account_id} ({currency})",
        [
            ("status", _enum_label(admin_pb2.AccountStatus.DESCRIPTOR, account.status)),
            ("tariff", account.tariff_id),
            ("balance", _money(account.balance, currency)),
            ("reserved", _money(account.reserved, currency)),
            ("available", _money(account.available, currency)),
            ("credit limit", _money(account.credit_limit, currency)),
            ("active calls", f"{account.active_calls} (max: {cap})"),
            ("low-balance threshold", threshold),
            ("burn rate", f"{_money(account.burn_rate_per_minute, currency)}/min"),
            ("empty in", empty_in),
        ],
    )


def _accounts_table(
    accounts: Sequence[admin_pb2.Account], width: int, empty: str
) -> RenderableType:
    columns = [
        _Column("account"),
        _Column("status"),
        _Column("tariff", hide=2),
        _Column("balance", right=True),
        _Column("reserved", hide=3, right=True),
        _Column("available", right=True),
        _Column("calls", hide=1, right=True),
    ]
    rows = [
        [
            a.account_id,
            _enum_label(admin_pb2.AccountStatus.DESCRIPTOR, a.status),
            a.tariff_id,
            _money(a.balance, a.currency),
            _money(a.reserved, a.currency),
            _money(a.available, a.currency),
            str(a.active_calls),
        ]
        for a in accounts
    ]
    return _list_table("Accounts", columns, rows, width, empty)


def _tariff_table(tariff: admin_pb2.Tariff) -> Callable[[int], RenderableType]:
    columns = [
        _Column("prefix"),
        _Column("price"),
        _Column("increments (s)"),
        _Column("connect fee", right=True),
    ]
    rows = [
        [
            rate.prefix or "(default)",
            format_price(rate.price_per_minute_micros, tariff.currency),
            f"{rate.first_increment_seconds}/{rate.next_increment_seconds}",
            _money(rate.connect_fee, tariff.currency),
        ]
        for rate in tariff.rates
    ]
    title = f"Tariff {tariff.tariff_id} ({tariff.currency})"
    return lambda width: _list_table(title, columns, rows, width, f"{title} has no rates.")


def _tariffs_table(tariffs: Sequence[admin_pb2.TariffSummary], width: int) -> RenderableType:
    columns = [_Column("tariff"), _Column("currency"), _Column("rates", right=True)]
    rows = [[t.tariff_id, t.currency, f"{t.rate_count:,}"] for t in tariffs]
    return _list_table("Tariffs", columns, rows, width, "No tariffs.")


def _call_table(call: admin_pb2.Call, currency: str) -> Callable[[int], RenderableType]:
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
                f"prefix {rate.prefix or '(default)'}: "
                f"{format_price(rate.price_per_minute_micros, currency)}, "
                f"{rate.first_increment_seconds}/{rate.next_increment_seconds} s, "
                f"connect fee {_money(rate.connect_fee, currency)}",
            ),
            ("started (UTC)", _time(call.HasField("started_at"), call.started_at)),
            ("ended (UTC)", _time(call.HasField("ended_at"), call.ended_at)),
            ("expires (UTC)", _time(call.HasField("expires_at"), call.expires_at)),
            ("last sequence", str(call.last_sequence)),
        ],
    )


def _calls_table(
    account_id: str, page: admin_pb2.ListCallsResponse, currency: str, width: int, empty: str
) -> RenderableType:
    columns = [
        _Column("call"),
        _Column("destination", hide=3),
        _Column("state"),
        _Column("allowed s", hide=2, right=True),
        _Column("used s", right=True),
        _Column("held", hide=4, right=True),
        _Column("charged", right=True),
        _Column("started (UTC)", hide=1),
    ]
    rows = [
        [
            call.call_id,
            call.destination,
            _enum_label(admin_pb2.CallState.DESCRIPTOR, call.state),
            str(call.allowed_seconds),
            str(call.used_seconds),
            _money(call.held, currency),
            _money(call.charged, currency),
            _time(call.HasField("started_at"), call.started_at),
        ]
        for call in page.calls
    ]
    return _list_table(f"Calls of {account_id}", columns, rows, width, empty)


def _entries_table(
    account_id: str,
    entries: Sequence[admin_pb2.LedgerEntry],
    currency: str,
    width: int,
    empty: str,
) -> RenderableType:
    columns = [
        _Column("entry", right=True),
        _Column("kind"),
        _Column("amount", right=True),
        _Column("balance after", right=True),
        _Column("call", hide=2),
        _Column("reference", hide=3),
        _Column("at (UTC)", hide=1),
    ]
    rows = [
        [
            str(entry.entry_id),
            _enum_label(admin_pb2.EntryKind.DESCRIPTOR, entry.kind),
            _money(entry.amount, currency),
            _money(entry.balance_after, currency),
            entry.call_id,
            entry.reference,
            _time(entry.HasField("created_at"), entry.created_at),
        ]
        for entry in entries
    ]
    return _list_table(f"Ledger of {account_id}", columns, rows, width, empty)


def _fields_table(title: str, rows: list[tuple[str, str]]) -> Callable[[int], RenderableType]:
    """A two-column name/value table for one message; long values fold.

    Every cell is a Text, never a str: rich would read markup such as "[red]" in an id or
    a reference as styling.
    """

    def render(width: int) -> RenderableType:
        del width  # rich fits two columns itself: the values fold
        table = Table(show_header=False, title=Text(title), box=box.SIMPLE)
        table.add_column(no_wrap=True)
        table.add_column(overflow="fold")
        for name, value in rows:
            table.add_row(Text(name), Text(value))
        return table

    return render


def _seconds(seconds: int) -> str:
    """A duration as the largest units that matter: "2 h 05 min", "4 min 10 s", "9 s"."""
    hours, rest = divmod(max(0, seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _money(amount: int, currency: str) -> str:
    """Minor units in the currency's own units, symbol and grouping (money.py)."""
    return format_amount(amount, currency)


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
    """A timestamp in UTC to the second (``2025-01-01 12:00:00``), or "-" when unset."""
    if not present:
        return "-"
    return timestamp.ToDatetime(tzinfo=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


if __name__ == "__main__":
    main()
