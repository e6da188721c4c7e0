"""Money in the currency's own units (callcredit.money): exact both ways, Babel's data."""

from __future__ import annotations

import pytest

from callcredit.money import AmountError, format_amount, format_price, parse_amount, parse_price


@pytest.mark.parametrize(
    ("minor", "currency", "shown"),
    [
        (20_000, "VND", "₫20,000"),  # ISO 4217 exponent 0: no minor unit
        (1_250, "USD", "$12.50"),  # exponent 2
        (-500, "USD", "-$5.00"),
        (1_234_567, "BHD", "BHD1,234.567"),  # exponent 3
        (5, "JPY", "¥5"),
        (1_000, "XTS", "XTS10.00"),  # Babel knows it; CLDR gives 2 digits
        (1_000, "QQQ", "1,000 QQQ (minor units)"),  # unknown: the exact integer
    ],
)
def test_format_amount(minor: int, currency: str, shown: str) -> None:
    assert format_amount(minor, currency) == shown


@pytest.mark.parametrize(
    ("micros", "currency", "shown"),
    [
        (1_179_600_000, "VND", "₫19.66/s (₫1,179.6/min)"),
        (30_000_000, "VND", "₫0.5/s (₫30/min)"),
        (1_000_000, "USD", "$0.00016667/s ($0.01/min)"),  # per second: to a micro
        (0, "USD", "$0.00/s ($0.00/min)"),
    ],
)
def test_format_price(micros: int, currency: str, shown: str) -> None:
    assert format_price(micros, currency) == shown


@pytest.mark.parametrize(
    ("text", "currency", "minor"),
    [
        ("1250", "USD", 1_250),  # an integer: minor units, as on the wire
        ("12.50", "USD", 1_250),  # a decimal point: major units
        ("20,000", "VND", 20_000),
        ("20000.0", "VND", 20_000),
        ("-500", None, -500),
        ("1,234.5", "USD", 123_450),
    ],
)
def test_parse_amount(text: str, currency: str | None, minor: int) -> None:
    assert parse_amount(text, currency) == minor


@pytest.mark.parametrize(
    ("text", "currency", "complaint"),
    [
        ("20000.5", "VND", "VND has no minor unit"),
        ("1.234", "USD", "USD has 2 decimals"),
        ("1,5", "USD", "is not an amount"),  # a decimal comma is not taken for grouping
        ("1.5", None, "needs a known currency"),
        ("1e3", "USD", "is not an amount"),
    ],
)
def test_parse_amount_refuses(text: str, currency: str | None, complaint: str) -> None:
    with pytest.raises(AmountError, match=complaint):
        parse_amount(text, currency)


@pytest.mark.parametrize(
    ("text", "micros"),
    [("1179600000", 1_179_600_000), ("19.66/s", 1_179_600_000), ("1179.6/min", 1_179_600_000)],
)
def test_parse_price(text: str, micros: int) -> None:
    assert parse_price(text, "VND") == micros


@pytest.mark.parametrize("text", ["1.5", "-1/s", "1/h", "0.0000001/min", "x/s"])
def test_parse_price_refuses(text: str) -> None:
    with pytest.raises(AmountError):
        parse_price(text, "VND")
