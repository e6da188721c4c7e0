"""The workload every system runs, and what each run must add up to.

N call slots run a closed loop: each slot places a call (reserve), renews it R times,
releases it with a used_seconds, then at once places the next call. Every slot has at
most one operation outstanding, so N is also the number of operations in flight.

A driver (one per system) only moves operations between the wire and this module:

- `Workload.start()` fills every slot with its first operation (a reserve);
- the driver sends the operation described by the slot's fields (`kind`, `call_id`,
  `account`, `used`, `sequence`, and for the baselines `allowed`/`held` via
  `next_hold`);
- when the answer arrives it calls `Workload.answer(slot, ...)`, which records the
  latency and prepares the slot's next operation; False means the slot is idle (the run
  is stopping) and sends nothing more.

Money is int minor units everywhere. The tariff is one rate (19.66 đ/s, 6/6 s
increments); the baselines hold and charge with `cost()`, the same rule as callcredit
(docs/design.md, Money), so every system moves exactly the same money.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

PRICE_PER_MINUTE_MICROS = 1_179_600_000  # 19.66 đ/s
FIRST_INCREMENT_SECONDS = 6
NEXT_INCREMENT_SECONDS = 6
CONNECT_FEE = 0
REQUESTED_SECONDS = 60
"""Every reserve and renew asks for 60 s more than the call has used."""
RENEW_STEP_SECONDS = 20
"""Renew k reports used_seconds = 20 k; the release reports 20 R + 1..19."""
DESTINATION = "84901234567"

RESERVE = 0
RENEW = 1
RELEASE = 2
KIND_NAMES = ("reserve", "renew", "release")

MAX_ERRORS_KEPT = 20


def billed_seconds(seconds: int) -> int:
    """docs/design.md: first + ceil(max(0, s - first) / next) * next, 0 for 0."""
    if seconds == 0:
        return 0
    rest = max(0, seconds - FIRST_INCREMENT_SECONDS)
    return FIRST_INCREMENT_SECONDS + -(-rest // NEXT_INCREMENT_SECONDS) * NEXT_INCREMENT_SECONDS


def cost(seconds: int) -> int:
    """docs/design.md: connect_fee + ceil(billed * price_per_minute_micros / 60,000,000)."""
    if seconds == 0:
        return 0
    return CONNECT_FEE + -(-billed_seconds(seconds) * PRICE_PER_MINUTE_MICROS // 60_000_000)


RESERVE_HOLD = cost(REQUESTED_SECONDS)
"""What a reserve holds when funds allow the whole grant."""


class Histogram:
    """Latencies in bounded memory: log-linear buckets of 1/32 (~3%) over microseconds."""

    SUB_BITS = 5
    SIZE = 1_200  # reaches past 10^9 us

    def __init__(self) -> None:
        self.counts = [0] * self.SIZE
        self.total = 0

    def add(self, seconds: float) -> None:
        us = int(seconds * 1_000_000)
        if us < 64:
            index = us if us > 0 else 0
        else:
            shift = us.bit_length() - 6
            index = (shift << self.SUB_BITS) + (us >> shift)
        if index >= self.SIZE:
            index = self.SIZE - 1
        self.counts[index] += 1
        self.total += 1

    @classmethod
    def _upper_us(cls, index: int) -> int:
        if index < 64:
            return index
        shift = (index >> cls.SUB_BITS) - 1
        mantissa = index - (shift << cls.SUB_BITS)
        return ((mantissa + 1) << shift) - 1

    def quantile_ms(self, q: float) -> float:
        """The bucket bound at quantile q, in milliseconds (0.0 when empty)."""
        if self.total == 0:
            return 0.0
        rank = max(1, int(q * self.total + 0.999999))
        seen = 0
        for index, count in enumerate(self.counts):
            seen += count
            if seen >= rank:
                return self._upper_us(index) / 1000
        return self._upper_us(self.SIZE - 1) / 1000


class Slot:
    """One concurrent call of the closed loop, and the operation it has outstanding."""

    __slots__ = (
        "account",
        "allowed",
        "call_id",
        "call_number",
        "held",
        "index",
        "kind",
        "msg",
        "planned",
        "renews_done",
        "sent_at",
        "sequence",
        "used",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.kind = RESERVE
        self.call_id = ""
        self.call_number = 0
        self.account = ""
        self.used = 0
        """used_seconds the outstanding renew or release reports."""
        self.sequence = 0
        self.renews_done = 0
        self.allowed = 0
        """allowed_seconds of the call's last grant."""
        self.held = 0
        """The call's hold after its last grant."""
        self.planned = 0
        """used_seconds the release will report if every grant is whole."""
        self.sent_at = 0.0
        self.msg = 0
        """Drivers' scratch: which message carried the operation."""


def next_hold(slot: Slot) -> tuple[int, int, int]:
    """For the baselines: the renew's (allowed, held, extra hold) by callcredit's rule:
    allowed = max(allowed, used + requested), hold = cost(allowed)."""
    allowed = max(slot.allowed, slot.used + REQUESTED_SECONDS)
    held = cost(allowed)
    return allowed, held, held - slot.held


@dataclass
class Workload:
    """The closed loop's state and counters for one run of one system."""

    calls: int
    renews: int
    accounts: list[str]
    tag: str
    """Prefix of every call_id, unique per run."""
    slots: list[Slot] = field(init=False)
    histogram: Histogram = field(default_factory=Histogram)
    measuring: bool = False
    stopping: bool = False
    measured_ops: int = 0
    total_ops: int = 0
    calls_started: int = 0
    calls_released: int = 0
    refused_reserves: int = 0
    cut_grants: int = 0
    """Renews refused (baselines) or answered with a final, shorter grant (callcredit)."""
    charged_total: int = 0
    """Sum of the `charged` every release answered."""
    charge_mismatches: int = 0
    """Releases whose charge differs from cost(used_seconds)."""
    error_count: int = 0
    errors: list[str] = field(default_factory=list)
    active: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if self.calls < 1 or self.renews < 0 or not self.accounts:
            raise ValueError("need calls >= 1, renews >= 0 and at least one account")
        self.slots = [Slot(index) for index in range(self.calls)]

    def start(self) -> list[Slot]:
        """Place every slot's first call; returns the slots, each with a reserve to send."""
        for slot in self.slots:
            self._begin(slot, time.perf_counter())
        self.active = len(self.slots)
        return self.slots

    def stop(self) -> None:
        """Start no new calls; calls in progress still run to their release."""
        self.stopping = True
        if self.active == 0:
            self.drained.set()

    def error(self, slot: Slot, message: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(f"{KIND_NAMES[slot.kind]} {slot.call_id}: {message}")

    def _begin(self, slot: Slot, now: float) -> bool:
        if self.stopping:
            self.active -= 1
            if self.active == 0:
                self.drained.set()
            return False
        number = self.calls_started
        self.calls_started = number + 1
        slot.call_number = number
        slot.call_id = f"{self.tag}-{number}"
        slot.account = self.accounts[number % len(self.accounts)]
        slot.kind = RESERVE
        slot.used = 0
        slot.sequence = 0
        slot.renews_done = 0
        slot.allowed = 0
        slot.held = 0
        slot.planned = self.renews * RENEW_STEP_SECONDS + 1 + number % 19
        slot.sent_at = now
        return True

    def _release(self, slot: Slot, now: float) -> bool:
        slot.kind = RELEASE
        slot.used = min(slot.planned, slot.allowed)
        slot.sent_at = now
        return True

    def answer(self, slot: Slot, ok: bool, allowed: int, held: int, charged: int) -> bool:
        """The outstanding operation was answered: ok False is a refusal (or, for a renew,
        a grant cut short). Prepares the next operation; False when the slot goes idle."""
        now = time.perf_counter()
        self.total_ops += 1
        if self.measuring:
            self.measured_ops += 1
            self.histogram.add(now - slot.sent_at)
        kind = slot.kind
        if kind == RESERVE:
            if not ok:
                self.refused_reserves += 1
                return self._begin(slot, now)
            slot.allowed = allowed
            slot.held = held
            if allowed < REQUESTED_SECONDS:
                self.cut_grants += 1
                return self._release(slot, now)
        elif kind == RENEW:
            if ok:
                slot.allowed = allowed
                slot.held = held
            if not ok or allowed < slot.used + REQUESTED_SECONDS:
                self.cut_grants += 1
                return self._release(slot, now)
        else:
            self.calls_released += 1
            self.charged_total += charged
            if charged != cost(slot.used):
                self.charge_mismatches += 1
                if len(self.errors) < MAX_ERRORS_KEPT:
                    self.errors.append(
                        f"release {slot.call_id}: charged {charged} for {slot.used} s, "
                        f"expected {cost(slot.used)}"
                    )
            return self._begin(slot, now)
        if slot.renews_done < self.renews:
            slot.renews_done += 1
            slot.kind = RENEW
            slot.sequence = slot.renews_done
            slot.used = slot.renews_done * RENEW_STEP_SECONDS
            slot.sent_at = now
            return True
        return self._release(slot, now)


@dataclass
class AccountTotals:
    """What a system holds at the end of a run, for `check()`."""

    accounts: int
    initial_total: int
    """Σ balances before the run."""
    balance_total: int
    min_balance: int
    negative_balances: int
    reserved_total: int
    nonzero_reserved: int
    open_holds: int
    """Holds (open calls) the system still records."""
    open_holds_total: int
    reserved_mismatches: int = 0
    """Accounts whose reserved differs from the sum of their open holds."""
    server_charged_total: int | None = None
    """Σ charges as the system recorded them, where it keeps them."""


def check(totals: AccountTotals | None, workload: Workload) -> list[str]:
    """Every problem that makes the run unfair to compare; empty when it adds up.

    No overdraft (every balance >= 0), nothing left reserved or held after every call was
    released, and the money that left the balances is exactly what the releases charged.
    `totals` None: a system without state (the echo server) is checked for shape only."""
    problems: list[str] = []
    if workload.error_count:
        problems.append(f"{workload.error_count} operations failed: {workload.errors[:3]}")
    if workload.charge_mismatches:
        problems.append(f"{workload.charge_mismatches} releases charged other than cost(used)")
    if workload.calls_released + workload.refused_reserves != workload.calls_started:
        problems.append(
            f"{workload.calls_started} calls placed but {workload.calls_released} released "
            f"and {workload.refused_reserves} refused"
        )
    if totals is None:
        return problems
    if totals.negative_balances:
        problems.append(
            f"overdraft: {totals.negative_balances} accounts below zero "
            f"(lowest {totals.min_balance:,})"
        )
    if totals.nonzero_reserved or totals.reserved_total:
        problems.append(
            f"{totals.nonzero_reserved} accounts still reserve money "
            f"(Σ reserved {totals.reserved_total:,})"
        )
    if totals.open_holds:
        problems.append(f"{totals.open_holds} holds still open (Σ {totals.open_holds_total:,})")
    if totals.reserved_mismatches:
        problems.append(f"{totals.reserved_mismatches} accounts: reserved != Σ of their holds")
    spent = totals.initial_total - totals.balance_total
    if spent != workload.charged_total:
        problems.append(
            f"balances fell by {spent:,} but releases charged {workload.charged_total:,}"
        )
    if (
        totals.server_charged_total is not None
        and totals.server_charged_total != workload.charged_total
    ):
        problems.append(
            f"the system recorded {totals.server_charged_total:,} of charges, "
            f"releases answered {workload.charged_total:,}"
        )
    return problems
