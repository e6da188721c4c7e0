"""Money as people read and write it: the currency's own units, symbol and grouping.

The contract carries every amount as an ``int`` of the currency's minor unit and every
price in micros of the minor unit per minute (docs/design.md, Money). People think in
the major unit: 20,000 ₫ (VND has no minor unit, ISO 4217 exponent 0), $12.50 (USD,
exponent 2). This module converts both ways, exactly (``Decimal``, never ``float``),
with the currency data of Babel (CLDR), not a hand-kept table::

    format_amount(20_000, "VND")         -> "₫20,000"
    format_amount(1_250, "USD")          -> "$12.50"
    format_price(1_179_600_000, "VND")   -> "₫19.66/s (₫1,179.6/min)"
    parse_amount("12.50", "USD")         -> 1250      (a decimal point: major units)
    parse_amount("1250", "USD")          -> 1250      (an integer: minor units, as on the wire)
    parse_price("19.66/s", "VND")        -> 1_179_600_000

Input is unambiguous by its form: a plain integer is minor units (what scripts and the
wire use); a number with a decimal point is major units; a price with ``/s`` or
``/min`` is major units per second or per minute, a plain integer micros per minute.
A currency that Babel does not know is shown as minor units with its code.
"""

from __future__ import annotations

import re
from decimal import Decimal

from babel.numbers import format_currency, get_currency_precision, is_currency

__all__ = [
    "MICROS",
    "AmountError",
    "exponent",
    "format_amount",
    "format_price",
    "needs_currency",
    "parse_amount",
    "parse_price",
]

LOCALE = "en_US"
"""Output is English throughout; the locale fixes grouping (1,234) and symbol placement."""

MICROS = 1_000_000
"""Prices are micros (millionths) of the minor unit."""

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
"""Digits, optionally grouped by commas in threes, optionally a decimal part."""


class AmountError(ValueError):
    """Text that is not an amount or price in the currency (the message says why)."""


def exponent(currency: str) -> int | None:
    """The currency's ISO 4217 exponent (digits of its minor unit); None if unknown."""
    if not is_currency(currency):
        return None
    return int(get_currency_precision(currency))


def format_amount(minor: int, currency: str) -> str:
    """Minor units in the major unit, with symbol and grouping: ``₫20,000``, ``-$5.00``."""
    digits = exponent(currency)
    if digits is None:
        return f"{minor:,} {currency} (minor units)".strip()
    return str(format_currency(Decimal(minor).scaleb(-digits), currency, locale=LOCALE))


def format_price(micros_per_minute: int, currency: str) -> str:
    """A price per second and per minute in the major unit: ``₫19.66/s (₫1,179.6/min)``.

    Per minute is exact; per second is rounded to a micro of the minor unit.
    """
    digits = exponent(currency)
    if digits is None:
        return f"{micros_per_minute:,} micros of {currency} minor units/min"
    per_minute = Decimal(micros_per_minute).scaleb(-6 - digits)
    per_second = (Decimal(micros_per_minute) / 60).quantize(Decimal(1)).scaleb(-6 - digits)
    return f"{_major(per_second, currency, digits)}/s ({_major(per_minute, currency, digits)}/min)"


def _major(value: Decimal, currency: str, digits: int) -> str:
    """At least the currency's own digits, more only where the value has them."""
    exact = value.normalize()
    places = max(digits, -int(exact.as_tuple().exponent))
    pattern = "¤#,##0" + ("." + "0" * digits + "#" * (places - digits) if places else "")
    return str(
        format_currency(value, currency, format=pattern, locale=LOCALE, currency_digits=False)
    )


def needs_currency(text: str) -> bool:
    """Whether ``text`` is in major units (a decimal point), so parsing it needs the
    currency; AmountError if it is not an amount at all."""
    if not _NUMBER.fullmatch(text.strip()):
        raise AmountError(f"{text!r} is not an amount (e.g. 20000, 20,000 or 12.50)")
    return "." in text


def parse_amount(text: str, currency: str | None) -> int:
    """Minor units from ``1250`` (minor units) or ``12.50`` / ``1,234.5`` (major units).

    A decimal point needs the currency (to know its exponent) and at most its digits.
    """
    cleaned = text.strip()
    number = Decimal(cleaned.replace(",", ""))
    if not needs_currency(cleaned):
        return int(number)
    digits = None if currency is None else exponent(currency)
    if digits is None:
        raise AmountError(f"{text!r}: a decimal amount needs a known currency; give minor units")
    minor = number.scaleb(digits)
    if minor != minor.to_integral_value():
        unit = "has no minor unit" if digits == 0 else f"has {digits} decimals"
        raise AmountError(f"{text!r}: {currency} {unit}")
    return int(minor)


def parse_price(text: str, currency: str | None) -> int:
    """Micros of the minor unit per minute, from ``1179600000`` (micros per minute) or
    ``19.66/s`` / ``1179.6/min`` (major units per second or minute)."""
    cleaned = text.strip()
    number, slash, unit = cleaned.partition("/")
    if not slash:
        if not cleaned.isascii() or not cleaned.isdigit():
            raise AmountError(f"{text!r} is not a price (micros per minute, 19.66/s or 1.5/min)")
        return int(cleaned)
    seconds = {"s": 1, "min": 60}.get(unit)
    if seconds is None or not _NUMBER.fullmatch(number) or number.startswith("-"):
        raise AmountError(f"{text!r} is not a price (micros per minute, 19.66/s or 1.5/min)")
    digits = None if currency is None else exponent(currency)
    if digits is None:
        raise AmountError(f"{text!r}: a price per /s or /min needs a known currency")
    micros = Decimal(number.replace(",", "")).scaleb(digits + 6) * (60 // seconds)
    if micros != micros.to_integral_value():
        raise AmountError(f"{text!r}: finer than a micro of the {currency} minor unit")
    return int(micros)
