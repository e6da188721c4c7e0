"""The admin library and the callcredit-admin CLI, against a fake AdminService.

The fake is a real gRPC server on a free port (a plain threaded grpc.server, so the
CLI's own asyncio.run never shares a loop with it). It records every request and
answers canned messages, or refuses with a rich google.rpc.Status as the real server
does. The CLI runs in-process through typer's CliRunner, and twice as a real process,
to prove the console entry point prints no traceback and no gRPC log noise.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from typer.testing import CliRunner, Result

from callcredit.admin import AdminClient, RateSpec
from callcredit.cli import EXIT_NO_ANSWER, EXIT_REFUSED, app
from callcredit.errors import DOMAIN, CallcreditError
from callcredit.money import format_price
from callcredit.v1 import admin_pb2, admin_pb2_grpc

_M = TypeVar("_M", bound=Message)

EXIT_USAGE = 2

RATE_DEFAULT = admin_pb2.Rate(
    prefix="",
    price_per_minute_micros=1_500_000,
    first_increment_seconds=60,
    next_increment_seconds=60,
    connect_fee=0,
)
RATE_MOBILE = admin_pb2.Rate(
    prefix="8490",
    price_per_minute_micros=1_180_000,
    first_increment_seconds=6,
    next_increment_seconds=1,
    connect_fee=500,
)
TARIFF = admin_pb2.Tariff(tariff_id="vn-std", currency="VND", rates=[RATE_DEFAULT, RATE_MOBILE])
ACCOUNT = admin_pb2.Account(
    account_id="acme",
    currency="VND",
    status=admin_pb2.ACCOUNT_STATUS_SUSPENDED,
    tariff_id="vn-std",
    balance=1_500_000,
    reserved=200_000,
    available=1_300_000,
    credit_limit=0,
    max_concurrent_calls=10,
    active_calls=2,
)
STARTED_AT = Timestamp(seconds=1_735_732_800)  # 2025-01-01 12:00:00 UTC
CALL = admin_pb2.Call(
    call_id="call-1",
    account_id="acme",
    destination="84901234567",
    state=admin_pb2.CALL_STATE_EXPIRED,
    allowed_seconds=120,
    used_seconds=75,
    held=0,
    charged=1_975,
    shortfall=0,
    rate=RATE_MOBILE,
    started_at=STARTED_AT,
    ended_at=Timestamp(seconds=STARTED_AT.seconds + 130),
    last_sequence=3,
)
ENTRIES = [
    admin_pb2.LedgerEntry(
        entry_id=7,
        account_id="acme",
        kind=admin_pb2.ENTRY_KIND_TOP_UP,
        amount=2_000_000,
        balance_after=2_000_000,
        reference="inv-2025-001",
        created_at=STARTED_AT,
        idempotency_key="key-1",
    ),
    admin_pb2.LedgerEntry(
        entry_id=9,
        account_id="acme",
        kind=admin_pb2.ENTRY_KIND_EXPIRY_CHARGE,
        amount=-2_400,
        balance_after=1_997_600,
        call_id="call-1",
        created_at=STARTED_AT,
    ),
]

# Wide enough that rich never wraps a cell; FORCE_COLOR unset so output is plain text.
CLI_ENV: dict[str, str | None] = {"COLUMNS": "200", "FORCE_COLOR": None, "TTY_COMPATIBLE": None}


class FakeAdmin(admin_pb2_grpc.AdminServiceServicer):
    """Records each request; answers canned messages or the refusal it is given."""

    def __init__(self) -> None:
        self.target = ""
        self.requests: list[Message] = []
        self.deadlines_seconds: list[float | None] = []
        self.refusal: status_pb2.Status | None = None
        self.delay_seconds = 0.0
        self.empty = False  # lists answer no items
        self.calls = [CALL]
        self.account = ACCOUNT  # what GetAccount answers

    def sent(self, kind: type[_M]) -> list[_M]:
        """The requests of one type, in the order they arrived."""
        return [request for request in self.requests if isinstance(request, kind)]

    def _answer(self, request: Message, context: grpc.ServicerContext, response: _M) -> _M:
        self.requests.append(request)
        self.deadlines_seconds.append(context.time_remaining())
        time.sleep(self.delay_seconds)
        if self.refusal is not None:
            context.abort_with_status(rpc_status.to_status(self.refusal))
        return response

    def CreateAccount(
        self, request: admin_pb2.CreateAccountRequest, context: grpc.ServicerContext
    ) -> admin_pb2.CreateAccountResponse:
        return self._answer(request, context, admin_pb2.CreateAccountResponse(account=ACCOUNT))

    def GetAccount(
        self, request: admin_pb2.GetAccountRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetAccountResponse:
        return self._answer(request, context, admin_pb2.GetAccountResponse(account=self.account))

    def UpdateAccount(
        self, request: admin_pb2.UpdateAccountRequest, context: grpc.ServicerContext
    ) -> admin_pb2.UpdateAccountResponse:
        return self._answer(request, context, admin_pb2.UpdateAccountResponse(account=ACCOUNT))

    def TopUp(
        self, request: admin_pb2.TopUpRequest, context: grpc.ServicerContext
    ) -> admin_pb2.TopUpResponse:
        return self._answer(request, context, admin_pb2.TopUpResponse(account=ACCOUNT))

    def Adjust(
        self, request: admin_pb2.AdjustRequest, context: grpc.ServicerContext
    ) -> admin_pb2.AdjustResponse:
        return self._answer(request, context, admin_pb2.AdjustResponse(account=ACCOUNT))

    def PutTariff(
        self, request: admin_pb2.PutTariffRequest, context: grpc.ServicerContext
    ) -> admin_pb2.PutTariffResponse:
        return self._answer(request, context, admin_pb2.PutTariffResponse(tariff=request.tariff))

    def GetTariff(
        self, request: admin_pb2.GetTariffRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetTariffResponse:
        return self._answer(request, context, admin_pb2.GetTariffResponse(tariff=TARIFF))

    def GetCall(
        self, request: admin_pb2.GetCallRequest, context: grpc.ServicerContext
    ) -> admin_pb2.GetCallResponse:
        return self._answer(request, context, admin_pb2.GetCallResponse(call=CALL))

    def ListCalls(
        self, request: admin_pb2.ListCallsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListCallsResponse:
        if self.empty:
            return self._answer(request, context, admin_pb2.ListCallsResponse())
        page = admin_pb2.ListCallsResponse(calls=self.calls, next_page_token="page-2")
        return self._answer(request, context, page)

    def ListEntries(
        self, request: admin_pb2.ListEntriesRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListEntriesResponse:
        entries = [] if self.empty else ENTRIES
        return self._answer(request, context, admin_pb2.ListEntriesResponse(entries=entries))

    def ListAccounts(
        self, request: admin_pb2.ListAccountsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListAccountsResponse:
        if self.empty:
            return self._answer(request, context, admin_pb2.ListAccountsResponse())
        page = admin_pb2.ListAccountsResponse(accounts=[ACCOUNT], next_page_token="MTphY21l")
        return self._answer(request, context, page)

    def ListTariffs(
        self, request: admin_pb2.ListTariffsRequest, context: grpc.ServicerContext
    ) -> admin_pb2.ListTariffsResponse:
        summary = admin_pb2.TariffSummary(tariff_id="vn-std", currency="VND", rate_count=2)
        tariffs = [] if self.empty else [summary]
        return self._answer(request, context, admin_pb2.ListTariffsResponse(tariffs=tariffs))

    def WatchEvents(
        self, request: admin_pb2.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[admin_pb2.WatchEventsResponse]:
        yield self._answer(request, context, admin_pb2.WatchEventsResponse(cursor="1.0"))


@pytest.fixture
def fake() -> Iterator[FakeAdmin]:
    servicer = FakeAdmin()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    servicer.target = f"127.0.0.1:{port}"
    yield servicer
    server.stop(grace=None).wait()


@pytest.fixture
def closed_target() -> str:
    """An address nothing listens on: a port the OS just handed out and took back."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


def refusal(
    code: grpc.StatusCode,
    reason: str,
    message: str,
    violations: Sequence[tuple[str, str]] = (),
) -> status_pb2.Status:
    """A google.rpc.Status as the server sends it: ErrorInfo, plus BadRequest if any."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    details = [info]
    if violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=text)
                    for field, text in violations
                ]
            )
        )
        details.append(bad)
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def run_cli(target: str, *args: str) -> Result:
    return CliRunner().invoke(app, ["--target", target, *args], env=CLI_ENV)


def run_json(target: str, *args: str) -> Any:
    result = run_cli(target, "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# --- tariffs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "expected"),
    [
        pytest.param(
            ":1500000",
            admin_pb2.Rate(
                prefix="",
                price_per_minute_micros=1_500_000,
                first_increment_seconds=1,
                next_increment_seconds=1,
            ),
            id="default-prefix-per-second",
        ),
        pytest.param(
            "84:1200000:60/60",
            admin_pb2.Rate(
                prefix="84",
                price_per_minute_micros=1_200_000,
                first_increment_seconds=60,
                next_increment_seconds=60,
            ),
            id="increments",
        ),
        pytest.param("8490:1180000:6/1:500", RATE_MOBILE, id="connect-fee"),
    ],
)
def test_tariff_put_sends_each_rate(fake: FakeAdmin, rate: str, expected: admin_pb2.Rate) -> None:
    result = run_cli(fake.target, "tariff", "put", "vn-std", "--currency", "VND", "--rate", rate)

    assert result.exit_code == 0, result.output
    [request] = fake.sent(admin_pb2.PutTariffRequest)
    assert request.tariff == admin_pb2.Tariff(tariff_id="vn-std", currency="VND", rates=[expected])
    assert format_price(expected.price_per_minute_micros, "VND") in result.stdout


def test_tariff_put_sends_rates_in_order_and_shows_them(fake: FakeAdmin) -> None:
    result = run_cli(
        fake.target,
        "tariff",
        "put",
        "vn-std",
        "--currency",
        "VND",
        "--rate",
        ":1500000:60/60",
        "--rate",
        "8490:1180000:6/1:500",
    )

    assert result.exit_code == 0, result.output
    assert [r.tariff for r in fake.sent(admin_pb2.PutTariffRequest)] == [TARIFF]
    for shown in ("Tariff vn-std (VND)", "(default)", "60/60", "8490", "6/1", "₫500"):
        assert shown in result.stdout


def test_tariff_put_from_the_file_tariff_show_prints(fake: FakeAdmin, tmp_path: Path) -> None:
    tariff_file = tmp_path / "tariff.json"
    tariff_file.write_text(json.dumps(run_json(fake.target, "tariff", "show", "vn-std")))

    result = run_cli(fake.target, "tariff", "put", "vn-std", "--file", str(tariff_file))

    assert result.exit_code == 0, result.output
    assert [r.tariff for r in fake.sent(admin_pb2.PutTariffRequest)] == [TARIFF]


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        pytest.param(["--currency", "VND"], "--rate", id="no-rates"),
        pytest.param(["--rate", ":1"], "--currency", id="no-currency"),
        pytest.param(["--currency", "VND", "--rate", "84"], "--rate", id="no-price"),
        pytest.param(["--currency", "VND", "--rate", "84:1.5"], "not a price", id="float-price"),
        pytest.param(["--currency", "VND", "--rate", "84:0.1/h"], "not a price", id="per-hour"),
        pytest.param(
            ["--currency", "VND", "--rate", "84:1/s:1/1:0.5"], "no minor unit", id="fee-fraction"
        ),
        pytest.param(["--currency", "VND", "--rate", "84:1:60"], "FIRST/NEXT", id="no-slash"),
        pytest.param(["--currency", "VND", "--rate", "84:1:6/1:2:3"], "--rate", id="extra-part"),
    ],
)
def test_tariff_put_usage_errors_send_nothing(
    fake: FakeAdmin, args: list[str], complaint: str
) -> None:
    result = run_cli(fake.target, "tariff", "put", "vn-std", *args)

    assert result.exit_code == EXIT_USAGE
    assert complaint in result.stderr
    assert fake.requests == []


@pytest.mark.parametrize(
    ("content", "args"),
    [
        pytest.param({"tariff_id": "other", "currency": "VND"}, [], id="other-tariff"),
        pytest.param({"currency": "USD"}, ["--currency", "VND"], id="other-currency"),
        pytest.param({"rates": [{"prefix": "84", "bogus": 1}]}, [], id="unknown-field"),
        pytest.param({"currency": "VND"}, ["--rate", ":1"], id="file-and-rate"),
    ],
)
def test_tariff_put_refuses_a_file_that_disagrees(
    fake: FakeAdmin, tmp_path: Path, content: dict[str, Any], args: list[str]
) -> None:
    tariff_file = tmp_path / "tariff.json"
    tariff_file.write_text(json.dumps(content))

    result = run_cli(fake.target, "tariff", "put", "vn-std", "--file", str(tariff_file), *args)

    assert result.exit_code == EXIT_USAGE
    assert fake.requests == []


def test_tariff_show(fake: FakeAdmin) -> None:
    result = run_cli(fake.target, "tariff", "show", "vn-std")

    assert result.exit_code == 0, result.output
    assert fake.sent(admin_pb2.GetTariffRequest) == [admin_pb2.GetTariffRequest(tariff_id="vn-std")]
    assert "₫0.025/s (₫1.5/min)" in result.stdout
    assert "₫0.019667/s (₫1.18/min)" in result.stdout


def test_tariff_show_json_keeps_int64_numbers(fake: FakeAdmin) -> None:
    data = run_json(fake.target, "tariff", "show", "vn-std")

    assert data["tariff_id"] == "vn-std"
    assert data["rates"][0] == {
        "prefix": "",
        "price_per_minute_micros": 1_500_000,
        "first_increment_seconds": 60,
        "next_increment_seconds": 60,
        "connect_fee": 0,
    }


# --- accounts --------------------------------------------------------------------------


def test_account_create_sends_every_field(fake: FakeAdmin) -> None:
    result = run_cli(
        fake.target,
        "account",
        "create",
        "acme",
        "--currency",
        "VND",
        "--tariff",
        "vn-std",
        "--credit-limit",
        "50000",
        "--max-concurrent-calls",
        "10",
    )

    assert result.exit_code == 0, result.output
    assert fake.sent(admin_pb2.CreateAccountRequest) == [
        admin_pb2.CreateAccountRequest(
            account_id="acme",
            currency="VND",
            tariff_id="vn-std",
            credit_limit=50_000,
            max_concurrent_calls=10,
        )
    ]


def test_account_create_takes_a_low_balance_threshold_as_an_amount(fake: FakeAdmin) -> None:
    result = run_cli(
        fake.target,
        "account",
        "create",
        "acme",
        "--currency",
        "USD",
        "--tariff",
        "us-std",
        "--low-balance-threshold",
        "25.50",
    )

    assert result.exit_code == 0, result.output
    [request] = fake.sent(admin_pb2.CreateAccountRequest)
    assert request.low_balance_threshold == 2_550
    assert fake.sent(admin_pb2.GetAccountRequest) == []  # the currency was given


def test_account_create_needs_currency_and_tariff(fake: FakeAdmin) -> None:
    result = run_cli(fake.target, "account", "create", "acme", "--currency", "VND")

    assert result.exit_code == EXIT_USAGE
    assert fake.requests == []


def test_account_show_table_has_money_with_currency_and_bare_enums(fake: FakeAdmin) -> None:
    result = run_cli(fake.target, "account", "show", "acme")

    assert result.exit_code == 0, result.output
    assert fake.sent(admin_pb2.GetAccountRequest) == [
        admin_pb2.GetAccountRequest(account_id="acme")
    ]
    for shown in ("Account acme", "SUSPENDED", "₫1,500,000", "₫200,000", "₫1,300,000"):
        assert shown in result.stdout
    assert "ACCOUNT_STATUS" not in result.stdout


def test_account_show_has_the_threshold_burn_rate_and_time_until_empty(fake: FakeAdmin) -> None:
    plain = run_cli(fake.target, "account", "show", "acme")
    assert plain.exit_code == 0, plain.output
    lines = plain.stdout.splitlines()
    for label, value in (
        ("low-balance threshold", "off"),
        ("burn rate", "₫0/min"),
        ("empty in", "nothing burns"),
    ):
        assert any(label in line and value in line for line in lines), (label, plain.stdout)

    fake.account = admin_pb2.Account(
        account_id="acme",
        currency="VND",
        available=1_300_000,
        low_balance_threshold=100_000,
        burn_rate_per_minute=1_200,
        seconds_until_empty=65_000,
    )
    burning = run_cli(fake.target, "account", "show", "acme")
    assert burning.exit_code == 0, burning.output
    lines = burning.stdout.splitlines()
    for label, value in (
        ("low-balance threshold", "₫100,000"),
        ("burn rate", "₫1,200/min"),
        ("empty in", "18 h 03 min"),
    ):
        assert any(label in line and value in line for line in lines), (label, burning.stdout)


def test_account_show_json(fake: FakeAdmin) -> None:
    data = run_json(fake.target, "account", "show", "acme")

    assert data == {
        "account_id": "acme",
        "currency": "VND",
        "status": "ACCOUNT_STATUS_SUSPENDED",
        "tariff_id": "vn-std",
        "balance": 1_500_000,
        "reserved": 200_000,
        "available": 1_300_000,
        "credit_limit": 0,
        "max_concurrent_calls": 10,
        "active_calls": 2,
        "low_balance_threshold": 0,
        "burn_rate_per_minute": 0,
    }
    assert json_format.ParseDict(data, admin_pb2.Account()) == ACCOUNT


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ["--status", "suspended"],
            admin_pb2.UpdateAccountRequest(
                account_id="acme", status=admin_pb2.ACCOUNT_STATUS_SUSPENDED
            ),
            id="status",
        ),
        pytest.param(
            ["--status", "ACTIVE"],
            admin_pb2.UpdateAccountRequest(
                account_id="acme", status=admin_pb2.ACCOUNT_STATUS_ACTIVE
            ),
            id="status-any-case",
        ),
        pytest.param(
            ["--credit-limit", "0"],
            admin_pb2.UpdateAccountRequest(account_id="acme", credit_limit=0),
            id="zero-is-sent",
        ),
        pytest.param(
            ["--tariff", "vn-cheap", "--max-concurrent-calls", "0"],
            admin_pb2.UpdateAccountRequest(
                account_id="acme", tariff_id="vn-cheap", max_concurrent_calls=0
            ),
            id="tariff-and-cap",
        ),
        pytest.param(
            ["--low-balance-threshold", "50000"],
            admin_pb2.UpdateAccountRequest(account_id="acme", low_balance_threshold=50_000),
            id="threshold",
        ),
        pytest.param(
            ["--low-balance-threshold", "0"],
            admin_pb2.UpdateAccountRequest(account_id="acme", low_balance_threshold=0),
            id="threshold-off-is-sent",
        ),
    ],
)
def test_account_update_sets_only_the_fields_given(
    fake: FakeAdmin, args: list[str], expected: admin_pb2.UpdateAccountRequest
) -> None:
    result = run_cli(fake.target, "account", "update", "acme", *args)

    assert result.exit_code == 0, result.output
    [request] = fake.sent(admin_pb2.UpdateAccountRequest)
    # Equality of proto3 messages compares presence of optional fields too.
    assert request == expected
    assert [field.name for field, _ in request.ListFields()] == [
        field.name for field, _ in expected.ListFields()
    ]


@pytest.mark.parametrize(
    "args",
    [pytest.param([], id="nothing"), pytest.param(["--status", "open"], id="bad-status")],
)
def test_account_update_usage_errors_send_nothing(fake: FakeAdmin, args: list[str]) -> None:
    result = run_cli(fake.target, "account", "update", "acme", *args)

    assert result.exit_code == EXIT_USAGE
    assert fake.requests == []


# --- money -----------------------------------------------------------------------------


def test_topup_with_a_key_sends_it_and_says_nothing_else(fake: FakeAdmin) -> None:
    result = run_cli(
        fake.target,
        "topup",
        "acme",
        "2000000",
        "--idempotency-key",
        "inv-2025-001",
        "--reference",
        "bank 42",
    )

    assert result.exit_code == 0, result.output
    assert fake.sent(admin_pb2.TopUpRequest) == [
        admin_pb2.TopUpRequest(
            account_id="acme",
            amount=2_000_000,
            idempotency_key="inv-2025-001",
            reference="bank 42",
        )
    ]
    assert result.stderr == ""
    assert "₫1,500,000" in result.stdout


def test_topup_without_a_key_prints_the_generated_one(fake: FakeAdmin) -> None:
    result = run_cli(fake.target, "--json", "topup", "acme", "100")

    assert result.exit_code == 0, result.output
    [request] = fake.sent(admin_pb2.TopUpRequest)
    assert request.idempotency_key
    assert result.stderr == f"note: top-up idempotency key {request.idempotency_key} (generated)\n"
    # The note goes to stderr, so --json output stays parseable.
    assert json.loads(result.stdout)["account_id"] == "acme"


def test_generated_keys_differ_between_runs(fake: FakeAdmin) -> None:
    for _ in range(2):
        assert run_cli(fake.target, "adjust", "acme", "100").exit_code == 0

    first, second = fake.sent(admin_pb2.AdjustRequest)
    assert first.idempotency_key != second.idempotency_key


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["acme", "-500"], id="bare"),
        pytest.param(["acme", "--", "-500"], id="after-double-dash"),
        pytest.param(["--reason", "refund dup", "acme", "-500"], id="option-first"),
        pytest.param(["acme", "-500", "--reason", "refund dup"], id="option-last"),
    ],
)
def test_adjust_takes_a_negative_amount(fake: FakeAdmin, args: list[str]) -> None:
    result = run_cli(fake.target, "adjust", "--idempotency-key", "adj-1", *args)

    assert result.exit_code == 0, result.output
    [request] = fake.sent(admin_pb2.AdjustRequest)
    assert request.account_id == "acme"
    assert request.amount == -500
    assert request.idempotency_key == "adj-1"


def test_a_decimal_amount_is_major_units_of_the_accounts_currency(fake: FakeAdmin) -> None:
    result = run_cli(fake.target, "topup", "acme", "20,000.0", "--idempotency-key", "k")

    assert result.exit_code == 0, result.output
    assert fake.sent(admin_pb2.GetAccountRequest) == [
        admin_pb2.GetAccountRequest(account_id="acme")
    ]
    assert [r.amount for r in fake.sent(admin_pb2.TopUpRequest)] == [20_000]


def test_a_credit_limit_takes_the_same_amounts(fake: FakeAdmin) -> None:
    result = run_cli(fake.target, "account", "update", "acme", "--credit-limit", "1,000.0")

    assert result.exit_code == 0, result.output
    [request] = fake.sent(admin_pb2.UpdateAccountRequest)
    assert request == admin_pb2.UpdateAccountRequest(account_id="acme", credit_limit=1_000)


def test_a_low_balance_threshold_takes_the_same_amounts(fake: FakeAdmin) -> None:
    result = run_cli(
        fake.target, "account", "update", "acme", "--low-balance-threshold", "100,000.0"
    )

    assert result.exit_code == 0, result.output
    assert fake.sent(admin_pb2.GetAccountRequest) == [
        admin_pb2.GetAccountRequest(account_id="acme")
    ]
    [request] = fake.sent(admin_pb2.UpdateAccountRequest)
    assert request == admin_pb2.UpdateAccountRequest(
        account_id="acme", low_balance_threshold=100_000
    )
    refused = run_cli(fake.target, "account", "update", "acme", "--low-balance-threshold", "lots")
    assert refused.exit_code == EXIT_USAGE


def test_a_fraction_of_a_currency_without_minor_units_is_refused(fake: FakeAdmin) -> None:
    result = run_cli(fake.target, "adjust", "acme", "-0.5", "--idempotency-key", "k")

    assert result.exit_code == EXIT_USAGE
    assert "'-0.5': VND has no minor unit" in result.stderr
    assert fake.sent(admin_pb2.AdjustRequest) == []


def test_a_rate_in_major_units_per_second(fake: FakeAdmin) -> None:
    rate = "84:19.66/s:6/6"
    result = run_cli(fake.target, "tariff", "put", "vn-std", "--currency", "VND", "--rate", rate)

    assert result.exit_code == 0, result.output
    [request] = fake.sent(admin_pb2.PutTariffRequest)
    assert request.tariff.rates[0].price_per_minute_micros == 1_179_600_000
    assert "₫19.66/s (₫1,179.6/min)" in result.stdout


def test_adjust_sends_the_reason(fake: FakeAdmin) -> None:
    result = run_cli(
        fake.target, "adjust", "acme", "750", "--idempotency-key", "adj-2", "--reason", "goodwill"
    )

    assert result.exit_code == 0, result.output
    assert fake.sent(admin_pb2.AdjustRequest) == [
        admin_pb2.AdjustRequest(
            account_id="acme", amount=750, idempotency_key="adj-2", reason="goodwill"
        )
    ]


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["topup", "acme", "1.5x"], id="topup-not-a-number"),
        pytest.param(["topup", "acme", "-100"], id="topup-negative"),
        pytest.param(["adjust", "acme", "-5x"], id="adjust-not-a-number"),
        pytest.param(["adjust", "acme", "5", "--reasn", "typo"], id="adjust-unknown-option"),
    ],
)
def test_money_commands_refuse_what_is_not_an_integer(fake: FakeAdmin, args: list[str]) -> None:
    result = run_cli(fake.target, *args)

    assert result.exit_code == EXIT_USAGE
    assert fake.requests == []


# --- calls and the ledger --------------------------------------------------------------


def test_calls_list_sends_the_filters_and_shows_the_next_page(fake: FakeAdmin) -> None:
    result = run_cli(
        fake.target, "calls", "list", "acme", "--active", "--limit", "20", "--page-token", "p1"
    )

    assert result.exit_code == 0, result.output
    assert fake.sent(admin_pb2.ListCallsRequest) == [
        admin_pb2.ListCallsRequest(account_id="acme", active_only=True, limit=20, page_token="p1")
    ]
    for shown in ("call-1", "84901234567", "EXPIRED", "₫1,975", "held", "2025-01-01 12:00:00"):
        assert shown in result.stdout
    assert "next page: --page-token page-2" in result.stdout


def test_calls_list_json_is_the_page(fake: FakeAdmin) -> None:
    data = run_json(fake.target, "calls", "list", "acme")

    assert data["next_page_token"] == "page-2"
    [call] = data["calls"]
    assert call["state"] == "CALL_STATE_EXPIRED"
    assert call["charged"] == 1_975
    assert call["started_at"] == "2025-01-01T12:00:00Z"
    # JSON needs no currency, so no extra GetAccount is sent.
    assert fake.sent(admin_pb2.GetAccountRequest) == []


def test_call_show(fake: FakeAdmin) -> None:
    result = run_cli(fake.target, "call", "show", "call-1")

    assert result.exit_code == 0, result.output
    assert fake.sent(admin_pb2.GetCallRequest) == [admin_pb2.GetCallRequest(call_id="call-1")]
    for shown in (
        "Call call-1",
        "EXPIRED",
        "₫1,975",
        "prefix 8490: ₫0.019667/s (₫1.18/min)",
        "6/1",
        "2025-01-01 12:02:10",
    ):
        assert shown in result.stdout


def test_call_show_json(fake: FakeAdmin) -> None:
    data = run_json(fake.target, "call", "show", "call-1")

    assert json_format.ParseDict(data, admin_pb2.Call()) == CALL
    assert data["rate"]["price_per_minute_micros"] == 1_180_000


def test_entries_list_sends_the_cursor(fake: FakeAdmin) -> None:
    result = run_cli(fake.target, "entries", "list", "acme", "--after", "6", "--limit", "2")

    assert result.exit_code == 0, result.output
    assert fake.sent(admin_pb2.ListEntriesRequest) == [
        admin_pb2.ListEntriesRequest(account_id="acme", after_entry_id=6, limit=2)
    ]
    for shown in ("TOP_UP", "EXPIRY_CHARGE", "-₫2,400", "₫1,997,600", "inv-2025-001", "amount"):
        assert shown in result.stdout


def test_entries_list_json(fake: FakeAdmin) -> None:
    data = run_json(fake.target, "entries", "list", "acme")

    assert [entry["entry_id"] for entry in data["entries"]] == [7, 9]
    assert data["entries"][1]["amount"] == -2_400
    assert data["entries"][0]["kind"] == "ENTRY_KIND_TOP_UP"


def test_target_comes_from_the_environment(fake: FakeAdmin) -> None:
    result = CliRunner().invoke(
        app, ["account", "show", "acme"], env={**CLI_ENV, "CALLCREDIT_TARGET": fake.target}
    )

    assert result.exit_code == 0, result.output
    assert len(fake.sent(admin_pb2.GetAccountRequest)) == 1


def test_timeout_becomes_the_deadline(fake: FakeAdmin) -> None:
    result = run_cli(fake.target, "--timeout", "2.5", "account", "show", "acme")

    assert result.exit_code == 0, result.output
    [deadline_seconds] = fake.deadlines_seconds
    assert deadline_seconds is not None
    # The server reads the deadline off its own clock: allow it a few ms of skew.
    assert 0 < deadline_seconds <= 2.5 + 0.1


# --- refusals and failures -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status", "line"),
    [
        pytest.param(
            ["adjust", "acme", "-9000000", "--idempotency-key", "adj-3"],
            refusal(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS", "available 1300000"),
            "error: INSUFFICIENT_FUNDS: available 1300000\n",
            id="insufficient-funds",
        ),
        pytest.param(
            ["account", "show", "nobody"],
            refusal(grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", "no account 'nobody'"),
            "error: ACCOUNT_NOT_FOUND: no account 'nobody'\n",
            id="not-found",
        ),
        pytest.param(
            ["topup", "acme", "5", "--idempotency-key", "inv-1"],
            refusal(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_CONFLICT", "amount differs"),
            "error: IDEMPOTENCY_KEY_CONFLICT: amount differs\n",
            id="key-conflict",
        ),
    ],
)
def test_a_refusal_is_one_line_and_exit_1(
    fake: FakeAdmin, args: list[str], status: status_pb2.Status, line: str
) -> None:
    fake.refusal = status

    result = run_cli(fake.target, *args)

    assert result.exit_code == EXIT_REFUSED
    assert result.stderr == line
    assert result.stdout == ""


def test_invalid_argument_lists_the_field_violations(fake: FakeAdmin) -> None:
    fake.refusal = refusal(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "2 fields are invalid",
        [("account_id", "1-128 characters of [A-Za-z0-9._:@-]"), ("currency", "ISO 4217 code")],
    )

    result = run_cli(fake.target, "account", "create", "bad id", "--currency", "x", "--tariff", "t")

    assert result.exit_code == EXIT_REFUSED
    assert result.stderr == (
        "error: INVALID_ARGUMENT: 2 fields are invalid (account_id: 1-128 characters of "
        "[A-Za-z0-9._:@-]; currency: ISO 4217 code)\n"
    )


def test_invalid_argument_says_its_detail_once(fake: FakeAdmin) -> None:
    fake.refusal = refusal(
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "amount: must be positive",
        [("amount", "must be positive")],
    )

    result = run_cli(fake.target, "topup", "acme", "0", "--idempotency-key", "k")

    assert result.exit_code == EXIT_REFUSED
    assert result.stderr == "error: INVALID_ARGUMENT: amount: must be positive\n"


def test_a_refused_money_movement_has_no_retry_hint(fake: FakeAdmin) -> None:
    fake.refusal = refusal(grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_CLOSED", "closed")

    result = run_cli(fake.target, "topup", "acme", "5")

    assert result.exit_code == EXIT_REFUSED
    note, line = result.stderr.splitlines()
    assert note.startswith("note: top-up idempotency key ")
    assert line == "error: ACCOUNT_CLOSED: closed"


def test_an_unanswered_money_movement_says_how_to_retry(fake: FakeAdmin) -> None:
    fake.delay_seconds = 1.0

    result = run_cli(fake.target, "--timeout", "0.2", "adjust", "acme", "-5")

    assert result.exit_code == EXIT_NO_ANSWER
    [request] = fake.sent(admin_pb2.AdjustRequest)
    key = request.idempotency_key
    assert result.stderr.splitlines()[-1].endswith(
        f"; it may or may not have been applied: retry with --idempotency-key {key}"
    )


def test_json_errors_are_json_on_stdout(fake: FakeAdmin) -> None:
    fake.refusal = refusal(
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "x: bad", [("x", "bad")]
    )

    result = run_cli(fake.target, "--json", "account", "show", "acme")

    assert result.exit_code == EXIT_REFUSED
    assert result.stderr == ""
    assert json.loads(result.stdout) == {
        "error": {
            "reason": "INVALID_ARGUMENT",
            "code": "INVALID_ARGUMENT",
            "message": "x: bad",
            "target": fake.target,
            "field_violations": [{"field": "x", "description": "bad"}],
        }
    }


def test_json_errors_of_an_unreachable_server(closed_target: str) -> None:
    result = run_cli(closed_target, "--json", "topup", "acme", "5", "--idempotency-key", "k")

    assert result.exit_code == EXIT_NO_ANSWER
    error = json.loads(result.stdout)["error"]
    assert (error["reason"], error["idempotency_key"]) == ("UNAVAILABLE", "k")


def test_a_draining_server_is_exit_3(fake: FakeAdmin) -> None:
    fake.refusal = refusal(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", "draining")

    result = run_cli(fake.target, "account", "show", "acme")

    assert result.exit_code == EXIT_NO_ANSWER
    assert result.stderr == f"error: UNAVAILABLE: draining (target {fake.target})\n"


def test_an_unreachable_server_is_exit_3(closed_target: str) -> None:
    result = run_cli(closed_target, "account", "show", "acme")

    assert result.exit_code == EXIT_NO_ANSWER
    assert result.stderr == (
        f"error: UNAVAILABLE: cannot reach {closed_target}: connection refused "
        "(is the server running, on this port?)\n"
    )


def test_no_answer_within_the_timeout_is_exit_3(fake: FakeAdmin) -> None:
    fake.delay_seconds = 1.0

    result = run_cli(
        fake.target, "--timeout", "0.2", "topup", "acme", "5", "--idempotency-key", "k"
    )

    assert result.exit_code == EXIT_NO_ANSWER
    assert result.stderr.startswith("error: DEADLINE_EXCEEDED")


def run_process(target: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: its own interpreter, real stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "callcredit.cli", "--target", target, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def test_process_prints_only_the_error_line_when_refused(fake: FakeAdmin) -> None:
    fake.refusal = refusal(grpc.StatusCode.FAILED_PRECONDITION, "ACCOUNT_CLOSED", "closed")

    done = run_process(fake.target, "topup", "acme", "5", "--idempotency-key", "k")

    assert done.returncode == EXIT_REFUSED
    assert done.stderr == "error: ACCOUNT_CLOSED: closed\n"


def test_process_exits_3_without_a_traceback_when_unreachable(closed_target: str) -> None:
    done = run_process(closed_target, "account", "show", "acme")

    assert done.returncode == EXIT_NO_ANSWER
    [line] = done.stderr.splitlines()
    assert line.startswith("error: UNAVAILABLE: ")


def test_process_usage_errors_are_json_too_with_json(fake: FakeAdmin) -> None:
    done = run_process(fake.target, "--json", "topup", "acme", "12x")

    assert done.returncode == EXIT_USAGE
    assert json.loads(done.stdout) == {
        "error": {
            "reason": "USAGE",
            "message": "Invalid value for 'AMOUNT': '12x' is not an amount "
            "(e.g. 20000, 20,000 or 12.50)",
        }
    }
    assert fake.requests == []


def test_process_with_json_exits_with_the_commands_code(fake: FakeAdmin) -> None:
    fake.refusal = refusal(grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND", "no account")

    refused = run_process(fake.target, "--json", "account", "show", "x")
    fake.refusal = None
    shown = run_process(fake.target, "--json", "account", "show", "acme")

    assert refused.returncode == EXIT_REFUSED
    assert json.loads(refused.stdout)["error"]["reason"] == "ACCOUNT_NOT_FOUND"
    assert shown.returncode == 0
    assert json.loads(shown.stdout)["account_id"] == "acme"


# --- the library -----------------------------------------------------------------------


async def test_client_returns_the_proto_messages(fake: FakeAdmin) -> None:
    async with AdminClient(fake.target) as admin:
        tariff = await admin.put_tariff(
            "vn-std", "VND", [RateSpec("", 1_500_000, 60, 60), RATE_MOBILE]
        )
        account = await admin.top_up("acme", 2_000_000, idempotency_key="inv-1")
        page = await admin.list_calls("acme", active_only=True)
        entries = await admin.list_entries("acme", after_entry_id=6)

    assert tariff == TARIFF
    assert account == ACCOUNT
    assert list(page.calls) == [CALL]
    assert page.next_page_token == "page-2"
    assert entries == ENTRIES


async def test_client_translates_a_refusal_once(fake: FakeAdmin) -> None:
    fake.refusal = refusal(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS", "short")

    async with AdminClient(fake.target) as admin:
        with pytest.raises(CallcreditError) as caught:
            await admin.adjust("acme", -5, idempotency_key="adj-1", reason="x")

    assert caught.value.reason == "INSUFFICIENT_FUNDS"
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(caught.value.__cause__, grpc.RpcError)


async def test_client_leaves_a_borrowed_channel_open(fake: FakeAdmin) -> None:
    async with grpc.aio.insecure_channel(fake.target) as channel:
        async with AdminClient(channel) as admin:
            await admin.get_account("acme")
        async with AdminClient(channel) as admin:
            await admin.get_call("call-1")

    assert fake.sent(admin_pb2.GetAccountRequest) == [
        admin_pb2.GetAccountRequest(account_id="acme")
    ]
    assert fake.sent(admin_pb2.GetCallRequest) == [admin_pb2.GetCallRequest(call_id="call-1")]


# --- lists, and a terminal 80 columns wide ---------------------------------------------


def run_narrow(target: str, *args: str, columns: int = 80) -> Result:
    """The CLI rendering at a fixed width, as in a terminal that wide (or piped)."""
    env = {**CLI_ENV, "COLUMNS": str(columns)}
    return CliRunner().invoke(app, ["--target", target, *args], env=env)


def test_account_list_sends_the_filters_and_shows_the_next_page(fake: FakeAdmin) -> None:
    result = run_cli(
        fake.target, "account", "list", "--prefix", "ac", "--status", "suspended", "--limit", "5"
    )

    assert result.exit_code == 0, result.output
    assert fake.sent(admin_pb2.ListAccountsRequest) == [
        admin_pb2.ListAccountsRequest(
            page_size=5, account_id_prefix="ac", status=admin_pb2.ACCOUNT_STATUS_SUSPENDED
        )
    ]
    for shown in ("acme", "SUSPENDED", "₫1,500,000", "₫1,300,000"):
        assert shown in result.stdout
    assert result.stdout.endswith("next page: --page-token MTphY21l\n")


def test_tariff_list(fake: FakeAdmin) -> None:
    result = run_cli(fake.target, "tariff", "list")

    assert result.exit_code == 0, result.output
    assert "vn-std" in result.stdout
    assert run_json(fake.target, "tariff", "list")["tariffs"] == [
        {"tariff_id": "vn-std", "currency": "VND", "rate_count": 2}
    ]


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["account", "list"], "No accounts.\n"),
        (
            ["account", "list", "--prefix", "zz", "--status", "closed"],
            "No accounts (id zz*, closed).\n",
        ),
        (["tariff", "list"], "No tariffs.\n"),
        (["calls", "list", "acme"], "No calls.\n"),
        (["calls", "list", "acme", "--active"], "No active calls.\n"),
        (["entries", "list", "acme"], "No ledger entries.\n"),
        (["entries", "list", "acme", "--after", "9"], "No ledger entries after entry 9.\n"),
    ],
)
def test_empty_results_say_so(fake: FakeAdmin, args: list[str], sentence: str) -> None:
    fake.empty = True

    result = run_cli(fake.target, *args)

    assert result.exit_code == 0, result.output
    assert result.stdout == sentence


LONG_CALL = admin_pb2.Call(
    call_id="example-1a2b3c4d-12-with-a-much-longer-suffix-than-usual",
    account_id="acme",
    destination="84901234567",
    state=admin_pb2.CALL_STATE_RELEASED,
    allowed_seconds=120,
    used_seconds=75,
    charged=1_975_000,
    rate=RATE_MOBILE,
    started_at=STARTED_AT,
)


@pytest.mark.parametrize(
    "args",
    [
        ["calls", "list", "acme"],
        ["entries", "list", "acme"],
        ["account", "list"],
        ["account", "show", "acme"],
        ["tariff", "show", "vn-std"],
        ["call", "show", "call-1"],
    ],
)
@pytest.mark.parametrize("columns", [80, 60])
def test_tables_fit_the_terminal_without_cutting_a_value(
    fake: FakeAdmin, args: list[str], columns: int
) -> None:
    fake.calls = [CALL, LONG_CALL]

    result = run_narrow(fake.target, *args, columns=columns)

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= columns, result.stdout
    assert "…" not in result.stdout


def test_a_narrow_table_hides_columns_by_rank_and_says_which(fake: FakeAdmin) -> None:
    fake.calls = [CALL, LONG_CALL]

    wide = run_narrow(fake.target, "calls", "list", "acme", columns=200)
    narrow = run_narrow(fake.target, "calls", "list", "acme", columns=80)

    assert "not shown" not in wide.stdout
    assert "84901234567" in wide.stdout
    assert "not shown at 80 columns: held, destination, allowed s" in narrow.stdout
    # Every value is whole, the long id folded onto more lines of its column.
    first_cells = [re.split(r"\s{2,}", line.strip())[0] for line in narrow.stdout.splitlines()]
    start = next(i for i, cell in enumerate(first_cells) if cell.startswith("example-"))
    assert "".join(first_cells[start : start + 3]) == LONG_CALL.call_id
    for value in ("RELEASED", "₫1,975,000", "EXPIRED", "2025-01-01 12:00:00"):
        assert value in narrow.stdout


def test_rate_help_keeps_every_field_at_80_columns() -> None:
    result = CliRunner().invoke(app, ["tariff", "put", "--help"], env={**CLI_ENV, "COLUMNS": "80"})

    assert result.exit_code == 0
    assert "CONNECT_FEE" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
