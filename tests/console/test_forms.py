"""The console's forms: amounts in the currency's major unit, keys, confirmation."""

from __future__ import annotations

import pytest

from callcredit_server.console.forms import (
    MoneyAction,
    MoneyKind,
    StatusAction,
    StatusChoice,
    new_idempotency_key,
    parse_money_form,
    parse_status_form,
)

KEY = new_idempotency_key()


def form(amount: str, **more: str) -> dict[str, str]:
    return {"amount": amount, "idempotency_key": KEY, "note": "", **more}


@pytest.mark.parametrize(
    ("kind", "amount", "currency", "minor"),
    [
        pytest.param(MoneyKind.top_up, "12.50", "USD", 1_250, id="usd-decimal"),
        pytest.param(MoneyKind.top_up, "100", "USD", 10_000, id="usd-integer-is-dollars"),
        pytest.param(MoneyKind.top_up, "20,000", "VND", 20_000, id="vnd-grouped"),
        pytest.param(MoneyKind.top_up, " 7 ", "JPY", 7, id="jpy-spaces"),
        pytest.param(MoneyKind.top_up, "1.005", "BHD", 1_005, id="three-decimals"),
        pytest.param(MoneyKind.adjust, "-5", "USD", -500, id="adjust-removes"),
        pytest.param(MoneyKind.adjust, "0.01", "USD", 1, id="adjust-one-cent"),
    ],
)
def test_amounts_are_read_in_major_units(
    kind: MoneyKind, amount: str, currency: str, minor: int
) -> None:
    action = parse_money_form(kind, form(amount), currency)
    assert action == MoneyAction(kind, minor, KEY, "", confirmed=False)


@pytest.mark.parametrize(
    ("kind", "amount", "currency", "says"),
    [
        pytest.param(MoneyKind.top_up, "", "USD", "Enter an amount", id="empty"),
        pytest.param(MoneyKind.top_up, "abc", "USD", "not", id="not-a-number"),
        pytest.param(MoneyKind.top_up, "1e5", "USD", "not", id="exponent"),
        pytest.param(MoneyKind.top_up, "0.001", "USD", "USD has 2 decimals", id="too-fine"),
        pytest.param(MoneyKind.top_up, "1.5", "VND", "no minor unit", id="vnd-decimals"),
        pytest.param(MoneyKind.top_up, "-5", "USD", "more than zero", id="negative-top-up"),
        pytest.param(MoneyKind.top_up, "0", "USD", "more than zero", id="zero-top-up"),
        pytest.param(MoneyKind.adjust, "0.00", "USD", "not be zero", id="zero-adjust"),
        pytest.param(MoneyKind.top_up, "10000000000000.01", "USD", "At most", id="too-much"),
        pytest.param(MoneyKind.top_up, "1" * 2000, "USD", "too long", id="huge-field"),
    ],
)
def test_unusable_amounts_say_why(kind: MoneyKind, amount: str, currency: str, says: str) -> None:
    error = parse_money_form(kind, form(amount), currency)
    assert not isinstance(error, MoneyAction)
    assert says in error.message


def test_the_note_and_the_key_are_checked() -> None:
    long_note = parse_money_form(MoneyKind.top_up, form("1", note="n" * 257), "USD")
    assert not isinstance(long_note, MoneyAction) and "256" in long_note.message
    for key in ("", "my-own-key", KEY + "0", KEY.upper()):
        wrong_key = parse_money_form(MoneyKind.top_up, form("1", idempotency_key=key), "USD")
        assert not isinstance(wrong_key, MoneyAction)
        assert "reload" in wrong_key.message


def test_only_confirmed_yes_confirms() -> None:
    assert parse_money_form(MoneyKind.top_up, form("1", confirmed="yes"), "USD") == MoneyAction(
        MoneyKind.top_up, 100, KEY, "", confirmed=True
    )
    unconfirmed = parse_money_form(MoneyKind.top_up, form("1", confirmed="1"), "USD")
    assert isinstance(unconfirmed, MoneyAction) and not unconfirmed.confirmed


def test_each_rendered_form_gets_its_own_key() -> None:
    assert new_idempotency_key() != new_idempotency_key()


def test_actions_describe_themselves_for_the_confirmation() -> None:
    top_up = MoneyAction(MoneyKind.top_up, 2_000_000, KEY, "", confirmed=False)
    assert top_up.describe("acme", "VND") == "Top up ₫2,000,000 to acme"
    removal = MoneyAction(MoneyKind.adjust, -1_250, KEY, "", confirmed=False)
    assert removal.describe("acme", "USD") == "Remove $12.50 from acme (adjustment)"
    assert StatusAction(StatusChoice.suspended, confirmed=False).describe("acme") == "Suspend acme"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param(
            {"status": "suspended"}, StatusAction(StatusChoice.suspended, False), id="suspend"
        ),
        pytest.param(
            {"status": "active", "confirmed": "yes"},
            StatusAction(StatusChoice.active, True),
            id="resume-confirmed",
        ),
    ],
)
def test_status_forms(fields: dict[str, str], expected: StatusAction) -> None:
    assert parse_status_form(fields) == expected


@pytest.mark.parametrize("status", ["closed", "", "ACTIVE"])
def test_other_statuses_are_refused(status: str) -> None:
    assert not isinstance(parse_status_form({"status": status}), StatusAction)
