"""The Takeover command (core): open calls' validity restarts at a new primary's first
instant, so the seconds nobody answered their dialers do not expire them."""

from __future__ import annotations

from callcredit_server.codec import decode_command, encode_command
from callcredit_server.core import (
    CallState,
    Reason,
    StateMachine,
    Takeover,
    TakeoverResult,
    TickResult,
)
from callcredit_server.core.model import EntryKind
from tests.core.helpers import VALIDITY_SECONDS, Sim, refusal, state_of

VALIDITY_MS = VALIDITY_SECONDS * 1000


def world() -> Sim:
    sim = Sim()
    sim.put_tariff()
    return sim


def test_a_call_past_its_deadline_at_takeover_is_not_expired_but_restarted() -> None:
    sim = world()
    sim.open_account(balance=1_000)
    sim.reserve("late")
    sim.advance(ms=VALIDITY_MS - 1_000)
    sim.reserve("fresh")
    sim.advance(ms=5_000)  # the old primary died; 5 s pass before the new one serves
    step = sim.apply(Takeover(epoch=2))
    assert (step.outcome, step.changed, step.entries) == (TakeoverResult(restarted=2), True, [])
    assert step.calls == []  # O(1) in the journal: no history row is rewritten
    for call_id in ("late", "fresh"):
        assert sim.call(call_id).state is CallState.ACTIVE
        assert sim.call(call_id).expires_at_ms == sim.now_ms + VALIDITY_MS
    sim.advance(ms=VALIDITY_MS)  # a whole validity from the takeover: still open
    assert sim.tick().outcome == TickResult(expired=0, forgotten=0)
    sim.advance(ms=1)
    step = sim.tick()
    assert [e.kind for e in step.entries] == [EntryKind.EXPIRY_CHARGE] * 2


def test_a_takeover_with_no_open_call_is_still_journalled() -> None:
    sim = world()
    step = sim.apply(Takeover(epoch=1))
    assert (step.outcome, step.changed) == (TakeoverResult(restarted=0), True)


def test_an_epoch_below_1_is_invalid() -> None:
    sim = world()
    assert refusal(sim.apply(Takeover(epoch=0))).reason is Reason.INVALID_ARGUMENT


def test_replaying_a_takeover_rebuilds_the_same_state() -> None:
    sim = world()
    sim.open_account(balance=1_000)
    sim.reserve("c")
    sim.advance(ms=VALIDITY_MS + 7)
    sim.apply(Takeover(epoch=3))
    kind, body = encode_command(Takeover(epoch=3))
    assert (kind, decode_command(kind, body)) == ("Takeover", Takeover(epoch=3))
    replayed = StateMachine.from_image(sim.machine.image())
    assert state_of(replayed) == state_of(sim.machine)


def test_a_takeover_rebuilds_the_expiry_heap_once_with_only_the_open_calls() -> None:
    sim = world()
    sim.open_account(balance=10_000)
    for n in range(5):
        sim.reserve(f"c{n}")
    sim.release("c0", used_seconds=1)
    sim.advance(ms=1_000)
    sim.renew("c1", sequence=1, used_seconds=1)  # leaves its first deadline in the heap
    sim.advance(ms=3_000)
    sim.apply(Takeover(epoch=2))
    restarted_ms = sim.now_ms + VALIDITY_MS
    open_calls = [sim.call(f"c{n}") for n in range(1, 5)]
    assert sorted(sim.machine._expiries) == [
        (restarted_ms, c.call_seq, c.call_id) for c in open_calls
    ]
    assert sim.machine.next_expiry_ms() == restarted_ms
