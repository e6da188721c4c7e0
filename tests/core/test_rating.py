"""Rating (docs/design.md, Money and Tariffs): billed seconds, cost, affordability, prefixes."""

from __future__ import annotations

import pytest

from callcredit_server.core import Tariff, billed_seconds, cost, max_affordable_seconds

from .helpers import PER_SECOND, rate

VND_19_66_PER_SECOND = 1_179_600_000  # 19.66 đ/s = 1,179.6 đ/min, in micros per minute


@pytest.mark.parametrize(
    ("first", "step", "seconds", "expected"),
    [
        pytest.param(60, 60, 0, 0, id="60/60-unused"),
        pytest.param(60, 60, 1, 60, id="60/60-1s-bills-a-minute"),
        pytest.param(60, 60, 59, 60, id="60/60-59s"),
        pytest.param(60, 60, 60, 60, id="60/60-60s"),
        pytest.param(60, 60, 61, 120, id="60/60-61s"),
        pytest.param(60, 60, 120, 120, id="60/60-120s"),
        pytest.param(60, 60, 121, 180, id="60/60-121s"),
        pytest.param(30, 6, 0, 0, id="30/6-unused"),
        pytest.param(30, 6, 1, 30, id="30/6-1s"),
        pytest.param(30, 6, 30, 30, id="30/6-30s"),
        pytest.param(30, 6, 31, 36, id="30/6-31s"),
        pytest.param(30, 6, 36, 36, id="30/6-36s"),
        pytest.param(30, 6, 37, 42, id="30/6-37s"),
        pytest.param(30, 6, 95, 96, id="30/6-95s"),
        pytest.param(6, 1, 1, 6, id="6/1-1s"),
        pytest.param(6, 1, 6, 6, id="6/1-6s"),
        pytest.param(6, 1, 7, 7, id="6/1-7s"),
        pytest.param(6, 1, 61, 61, id="6/1-61s"),
        pytest.param(1, 1, 0, 0, id="1/1-unused"),
        pytest.param(1, 1, 1, 1, id="1/1-1s"),
        pytest.param(1, 1, 59, 59, id="1/1-59s"),
        pytest.param(1, 1, 86_400, 86_400, id="1/1-a-day"),
        pytest.param(1, 60, 2, 61, id="1/60-2s"),
        pytest.param(3_600, 3_600, 3_601, 7_200, id="3600/3600-3601s"),
    ],
)
def test_billed_seconds(first: int, step: int, seconds: int, expected: int) -> None:
    assert billed_seconds(rate(first=first, step=step), seconds) == expected


@pytest.mark.parametrize(
    ("price", "first", "step", "fee", "seconds", "expected"),
    [
        pytest.param(PER_SECOND, 1, 1, 0, 0, 0, id="unused-costs-nothing"),
        pytest.param(PER_SECOND, 1, 1, 0, 1, 1, id="1/s-1s"),
        pytest.param(PER_SECOND, 1, 1, 0, 45, 45, id="1/s-45s"),
        pytest.param(PER_SECOND, 60, 60, 0, 1, 60, id="1/s-60/60-1s"),
        pytest.param(PER_SECOND, 60, 60, 0, 61, 120, id="1/s-60/60-61s"),
        pytest.param(PER_SECOND, 30, 6, 0, 31, 36, id="1/s-30/6-31s"),
        pytest.param(PER_SECOND, 6, 1, 0, 2, 6, id="1/s-6/1-2s"),
        pytest.param(PER_SECOND, 1, 1, 500, 0, 0, id="connect-fee-not-charged-unused"),
        pytest.param(PER_SECOND, 1, 1, 500, 1, 501, id="connect-fee-1s"),
        pytest.param(PER_SECOND, 1, 1, 500, 10, 510, id="connect-fee-10s"),
        pytest.param(PER_SECOND, 60, 60, 500, 61, 620, id="connect-fee-60/60-61s"),
        pytest.param(0, 1, 1, 0, 100, 0, id="free"),
        pytest.param(0, 1, 1, 7, 100, 7, id="free-minutes-connect-fee"),
        # 19.66 đ/s: fractions of a đồng round up, exact amounts do not.
        pytest.param(VND_19_66_PER_SECOND, 1, 1, 0, 1, 20, id="19.66/s-1s-19.66-up-to-20"),
        pytest.param(VND_19_66_PER_SECOND, 1, 1, 0, 3, 59, id="19.66/s-3s-58.98-up-to-59"),
        pytest.param(VND_19_66_PER_SECOND, 1, 1, 0, 50, 983, id="19.66/s-50s-exactly-983"),
        pytest.param(VND_19_66_PER_SECOND, 1, 1, 0, 58, 1_141, id="19.66/s-58s-1140.28"),
        pytest.param(VND_19_66_PER_SECOND, 1, 1, 0, 59, 1_160, id="19.66/s-59s-1159.94"),
        pytest.param(VND_19_66_PER_SECOND, 1, 1, 0, 60, 1_180, id="19.66/s-60s-1179.6"),
        pytest.param(VND_19_66_PER_SECOND, 60, 60, 0, 1, 1_180, id="19.66/s-60/60-1s"),
        pytest.param(VND_19_66_PER_SECOND, 60, 60, 0, 61, 2_360, id="19.66/s-60/60-61s"),
        pytest.param(VND_19_66_PER_SECOND, 30, 6, 100, 31, 808, id="19.66/s-30/6-fee-31s"),
        pytest.param(1, 1, 1, 0, 1, 1, id="one-micro-per-minute-rounds-up-to-1"),
        pytest.param(10**12, 1, 1, 10**9, 86_400, 2_440_000_000, id="largest-price-a-day"),
    ],
)
def test_cost(price: int, first: int, step: int, fee: int, seconds: int, expected: int) -> None:
    assert cost(rate(price=price, first=first, step=step, fee=fee), seconds) == expected


@pytest.mark.parametrize(
    ("price", "first", "step", "fee", "limit", "budget", "expected"),
    [
        pytest.param(PER_SECOND, 1, 1, 0, 60, 1_000, 60, id="limit-binds"),
        pytest.param(PER_SECOND, 1, 1, 0, 60, 60, 60, id="budget-exactly-the-limit"),
        pytest.param(PER_SECOND, 1, 1, 0, 60, 30, 30, id="budget-binds"),
        pytest.param(PER_SECOND, 1, 1, 0, 60, 1, 1, id="one-second"),
        pytest.param(PER_SECOND, 1, 1, 0, 60, 0, 0, id="no-budget"),
        pytest.param(PER_SECOND, 1, 1, 0, 0, 1_000, 0, id="no-limit"),
        pytest.param(PER_SECOND, 60, 60, 0, 600, 59, 0, id="60/60-less-than-a-minute"),
        pytest.param(PER_SECOND, 60, 60, 0, 600, 60, 60, id="60/60-one-minute"),
        pytest.param(PER_SECOND, 60, 60, 0, 600, 119, 60, id="60/60-not-two-minutes"),
        pytest.param(PER_SECOND, 60, 60, 0, 600, 120, 120, id="60/60-two-minutes"),
        pytest.param(PER_SECOND, 60, 60, 0, 90, 120, 90, id="60/60-limit-mid-increment"),
        pytest.param(PER_SECOND, 30, 6, 0, 600, 41, 36, id="30/6-between-increments"),
        pytest.param(PER_SECOND, 1, 1, 10, 60, 10, 0, id="fee-only"),
        pytest.param(PER_SECOND, 1, 1, 10, 60, 11, 1, id="fee-and-a-second"),
        pytest.param(PER_SECOND, 1, 1, 10, 60, 40, 30, id="fee-and-30s"),
        pytest.param(VND_19_66_PER_SECOND, 1, 1, 0, 60, 1_180, 60, id="19.66/s-1180"),
        pytest.param(VND_19_66_PER_SECOND, 1, 1, 0, 60, 1_179, 59, id="19.66/s-1179"),
        pytest.param(VND_19_66_PER_SECOND, 1, 1, 0, 60, 1_160, 59, id="19.66/s-1160"),
        pytest.param(VND_19_66_PER_SECOND, 1, 1, 0, 60, 1_159, 58, id="19.66/s-1159"),
        pytest.param(VND_19_66_PER_SECOND, 1, 1, 0, 60, 19, 0, id="19.66/s-19"),
        pytest.param(0, 1, 1, 0, 600, 0, 600, id="free-needs-no-budget"),
        pytest.param(PER_SECOND, 1, 1, 0, 86_400, 86_399, 86_399, id="a-day-less-one"),
    ],
)
def test_max_affordable_seconds(
    price: int, first: int, step: int, fee: int, limit: int, budget: int, expected: int
) -> None:
    r = rate(price=price, first=first, step=step, fee=fee)
    assert max_affordable_seconds(r, limit, budget) == expected


LOOKUP = Tariff(
    "T",
    "VND",
    (
        rate(""),
        rate("84"),
        rate("849"),
        rate("8490"),
        rate("1234567890123456"),
    ),
)


@pytest.mark.parametrize(
    ("destination", "expected_prefix"),
    [
        pytest.param("84901234567", "8490", id="longest-of-three"),
        pytest.param("8491234567", "849", id="middle"),
        pytest.param("84812345", "84", id="shortest"),
        pytest.param("849", "849", id="destination-equals-prefix"),
        pytest.param("8", "", id="shorter-than-every-prefix"),
        pytest.param("15551234567", "", id="default-empty-prefix"),
        pytest.param("12345678901234567890", "1234567890123456", id="16-digit-prefix"),
        pytest.param("123456789012345", "", id="one-digit-short-of-16-digit-prefix"),
    ],
)
def test_longest_prefix(destination: str, expected_prefix: str) -> None:
    found = LOOKUP.rate_for(destination)
    assert found is not None
    assert found.prefix == expected_prefix


@pytest.mark.parametrize(
    ("destination", "expected_prefix"),
    [
        pytest.param("84901234567", "84", id="match"),
        pytest.param("15551234567", None, id="no-default-no-match"),
        pytest.param("8", None, id="partial-prefix-is-no-match"),
    ],
)
def test_without_default_prefix(destination: str, expected_prefix: str | None) -> None:
    tariff = Tariff("T", "VND", (rate("84"),))
    found = tariff.rate_for(destination)
    assert (found.prefix if found else None) == expected_prefix
