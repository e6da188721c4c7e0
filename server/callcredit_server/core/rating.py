"""Rating: how many seconds are billed and what they cost, in integers only.

A call's cost is computed once from its total used seconds (docs/design.md, Money), so
rounding cannot drift across renewals.
"""

from __future__ import annotations

from typing import Final, Protocol

MICROS_PER_MINUTE: Final = 60_000_000  # price is micros of the minor unit per minute


class Rated(Protocol):
    """What rating needs from a rate."""

    @property
    def price_per_minute_micros(self) -> int: ...
    @property
    def first_increment_seconds(self) -> int: ...
    @property
    def next_increment_seconds(self) -> int: ...
    @property
    def connect_fee(self) -> int: ...


def billed_seconds(rate: Rated, seconds: int) -> int:
    """`first + ceil(max(0, s - first) / next) * next`, and 0 for an unused call."""
    if seconds <= 0:
        return 0
    first = rate.first_increment_seconds
    step = rate.next_increment_seconds
    rest = max(0, seconds - first)
    return first + -(-rest // step) * step


def cost(rate: Rated, seconds: int) -> int:
    """Minor units owed for a call of `seconds` in total: connect fee + rounded-up price."""
    if seconds <= 0:
        return 0
    # billed_seconds(), inlined: this runs several times per step.
    first = rate.first_increment_seconds
    if seconds > first:
        step = rate.next_increment_seconds
        billed = first + -((first - seconds) // step) * step
    else:
        billed = first
    return rate.connect_fee + -((-billed * rate.price_per_minute_micros) // MICROS_PER_MINUTE)


def max_affordable_seconds(rate: Rated, limit_seconds: int, budget: int) -> int:
    """The largest duration <= limit_seconds whose cost fits in budget (0 if none).

    cost() never decreases with seconds, so a binary search over [0, limit] finds it
    in at most ~17 steps for the 86,400-second ceiling.
    """
    return affordable(rate, limit_seconds, budget)[0]


def affordable(rate: Rated, limit_seconds: int, budget: int) -> tuple[int, int]:
    """(max_affordable_seconds(...), the cost of that many seconds), in one search.

    The usual case, a budget that covers the whole limit, costs one cost().
    """
    if limit_seconds <= 0:
        return 0, 0
    top = cost(rate, limit_seconds)
    if top <= budget:
        return limit_seconds, top
    one = cost(rate, 1)
    if budget < one:
        return 0, 0
    low, low_cost, high = 1, one, limit_seconds  # cost(low) <= budget < cost(high)
    while high - low > 1:
        mid = (low + high) // 2
        mid_cost = cost(rate, mid)
        if mid_cost <= budget:
            low, low_cost = mid, mid_cost
        else:
            high = mid
    return low, low_cost
