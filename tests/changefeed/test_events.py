"""The state machine's events: what each step emits, thresholds, burn rate, replay."""

from __future__ import annotations

import random

import orjson

from callcredit_server.core import (
    Command,
    CreateAccount,
    Release,
    StateMachine,
    TopUp,
    UpdateAccount,
)
from callcredit_server.core.events import Event, EventKind, event_from_image, event_image
from callcredit_server.core.model import burn_rate_per_minute, seconds_until_empty
from tests.core.helpers import PER_SECOND, VALIDITY_SECONDS, Sim, rate, reserve


def kinds(events: list[Event]) -> list[EventKind]:
    return [e.kind for e in events]


def funded(balance: int = 1_000, threshold: int = 0) -> Sim:
    sim = Sim()
    sim.put_tariff()
    sim.apply(CreateAccount("A", "VND", "T", 0, 0, threshold))
    if balance:
        sim.top_up(balance)
    return sim


def test_each_change_emits_its_event_with_the_account_after_it() -> None:
    sim = Sim()
    sim.put_tariff()
    created = sim.apply(CreateAccount("A", "VND", "T", 0, 0))
    assert kinds(created.events) == [EventKind.ACCOUNT_CREATED]
    step = sim.apply(TopUp("A", 500, "k", "r"))
    (event,) = step.events
    assert event.kind is EventKind.BALANCE_CHANGED
    assert event.entry is not None and event.entry.amount == 500
    assert (event.account.balance, event.account.available) == (500, 500)
    started = sim.reserve("c1")
    (event,) = started.events
    assert event.kind is EventKind.CALL_STARTED and event.call is not None
    assert event.account.available == 500 - 60 and event.account.burn_micros == PER_SECOND
    sim.advance(10)
    assert sim.renew("c1", 1, 10).events == []  # a renewal that crosses nothing is silent
    ended = sim.release("c1", 30)
    assert kinds(ended.events) == [EventKind.BALANCE_CHANGED, EventKind.CALL_ENDED]
    charge, end = ended.events
    assert charge.entry is not None and charge.entry.amount == -30
    assert end.call is not None and end.call.charged == 30
    assert (end.account.balance, end.account.available, end.account.burn_micros) == (470, 470, 0)
    updated = sim.suspend()
    (event,) = updated.events
    assert event.kind is EventKind.ACCOUNT_UPDATED
    assert event.previous_status is not None and event.previous_status.value == "ACTIVE"
    assert event.account.status.value == "SUSPENDED"


def test_an_expiry_emits_its_charge_and_the_end() -> None:
    sim = funded()
    sim.reserve("c1")
    sim.advance(VALIDITY_SECONDS + 1)
    step = sim.tick()
    assert kinds(step.events) == [EventKind.BALANCE_CHANGED, EventKind.CALL_ENDED]


def test_a_no_op_update_emits_nothing() -> None:
    sim = funded()
    assert sim.apply(UpdateAccount("A", credit_limit=0)).events == []


def test_low_balance_once_per_crossing_then_restored_re_arms() -> None:
    sim = funded(balance=1_000, threshold=800)
    # Each call holds 60 s = 60 units: 1000 -> 940 -> 880 -> 820 -> 760 (crossing).
    seen: list[EventKind] = []
    for i in range(8):
        seen += [e.kind for e in sim.reserve(f"c{i}").events]
    assert seen.count(EventKind.LOW_BALANCE) == 1
    assert sim.view().available < 800
    for i in range(8):
        seen += [e.kind for e in sim.release(f"c{i}", 0).events]
    assert seen.count(EventKind.BALANCE_RESTORED) == 1
    assert seen.index(EventKind.BALANCE_RESTORED) > seen.index(EventKind.LOW_BALANCE)
    seen.clear()
    for i in range(8, 12):  # re-armed: the next crossing is told again
        seen += [e.kind for e in sim.reserve(f"c{i}").events]
    assert seen.count(EventKind.LOW_BALANCE) == 1


def test_a_threshold_set_below_or_turned_off_restores() -> None:
    sim = funded(balance=100)
    step = sim.apply(UpdateAccount("A", low_balance_threshold=500))
    assert kinds(step.events) == [EventKind.ACCOUNT_UPDATED, EventKind.LOW_BALANCE]
    assert sim.view().low_balance_threshold == 500
    step = sim.apply(UpdateAccount("A", low_balance_threshold=0))
    assert kinds(step.events) == [EventKind.ACCOUNT_UPDATED, EventKind.BALANCE_RESTORED]


def test_a_release_does_not_cross_and_cross_back_within_its_step() -> None:
    # The hold is freed before the charge is posted; only the end of the step counts.
    sim = funded(balance=1_000, threshold=900)
    sim.reserve("c1")  # available 940
    sim.advance(50)
    step = sim.release("c1", 50)  # available 950
    assert EventKind.LOW_BALANCE not in kinds(step.events)


def test_burn_rate_and_seconds_until_empty() -> None:
    sim = Sim()
    sim.put_tariff([rate(price=PER_SECOND), rate(prefix="84", price=3 * PER_SECOND // 2)])
    sim.open_account(balance=10_000)
    sim.reserve("c1", destination="1555")
    step = sim.reserve("c2")
    assert step.events[-1].account.burn_micros == PER_SECOND * 5 // 2
    assert burn_rate_per_minute(PER_SECOND * 5 // 2) == 150
    assert burn_rate_per_minute(1) == 1  # rounded up: never shown as free
    available = sim.view().available
    assert seconds_until_empty(available, PER_SECOND * 5 // 2) == available * 60 // 150
    assert seconds_until_empty(available, 0) is None
    assert sim.machine.accounts["A"].burn_micros == PER_SECOND * 5 // 2
    sim.release("c1", 0)
    assert sim.machine.accounts["A"].burn_micros == 3 * PER_SECOND // 2


def test_replay_yields_the_same_events_and_an_image_keeps_the_threshold_state() -> None:
    rng = random.Random(7)
    sim = funded(balance=2_000, threshold=1_900)
    log: list[tuple[int, Command]] = []
    first: list[Event] = []
    open_calls: list[str] = []
    for i in range(300):
        sim.advance(ms=rng.randrange(0, 3_000))
        choice = rng.random()
        if choice < 0.4 or not open_calls:
            command: Command = reserve(f"c{i}")
            open_calls.append(f"c{i}")
        elif choice < 0.8:
            command = Release(open_calls.pop(rng.randrange(len(open_calls))), rng.randrange(30))
        else:
            command = TopUp("A", rng.randrange(1, 120), f"k{i}", "")
        step = sim.machine.apply(command, sim.now_ms)
        log.append((sim.now_ms, command))
        first += step.events
    assert EventKind.LOW_BALANCE in kinds(first) and EventKind.BALANCE_RESTORED in kinds(first)
    again: list[Event] = []
    replayed = funded(balance=2_000, threshold=1_900).machine
    for now_ms, command in log:
        again += replayed.apply(command, now_ms).events
    assert again == first
    restored = StateMachine.from_image(sim.machine.image())
    assert restored.accounts["A"].low == sim.machine.accounts["A"].low
    assert restored.accounts["A"].burn_micros == sim.machine.accounts["A"].burn_micros
    # Through JSON, as stored.
    assert [event_from_image(orjson.loads(orjson.dumps(event_image(e)))) for e in first] == first
