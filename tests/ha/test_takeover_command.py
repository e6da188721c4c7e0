"""The Takeover command (core): open calls' validity restarts at a new primary's first
instant, so the seconds nobody answered their dialers do not expire them."""

from __future__ import annotations

from pathlib import Path

from callcredit_server.codec import decode_command, encode_command
from callcredit_server.core import (
    CallState,
    Command,
    Reason,
    StateMachine,
    Takeover,
    TakeoverResult,
    TickResult,
)
from callcredit_server.core.machine import Step
from callcredit_server.core.model import EntryKind
from callcredit_server.journal import Journal, JournalRecord, Projected
from callcredit_server.projector import open_projector
from callcredit_server.recovery import verify
from callcredit_server.service import _live
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


class Journalled(Sim):
    """A Sim that keeps the journal records its changes would be."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[JournalRecord] = []

    def apply(self, command: Command) -> Step:
        step = super().apply(command)
        if step.changed:
            seq = len(self.records) + 1
            self.records.append(JournalRecord(seq, self.now_ms, command))
        return step


def test_verify_accepts_an_open_call_whose_row_predates_the_takeover(tmp_path: Path) -> None:
    """The Takeover writes no call row: the history check of `callcredit-server verify`
    takes an open call's row with an earlier deadline, but not a row of another call."""
    sim = Journalled()
    sim.put_tariff()
    sim.open_account(balance=1_000)
    sim.reserve("c")
    sim.advance(ms=5_000)
    sim.apply(Takeover(epoch=2))
    restarted_ms = sim.call("c").expires_at_ms
    assert restarted_ms is not None
    with Journal(f"sqlite:///{tmp_path / 'journal.db'}") as journal:
        journal.append(sim.records)
        assert not verify(journal, None).history_checked  # nothing projected yet
        projector = open_projector(journal, None)
        while projector.step():
            pass
        checked = verify(journal, None)
        assert (checked.problems, checked.history_checked) == ([], True)
        row = journal.get_call("c")
        assert row is not None and row.expires_at_ms == restarted_ms - 5_000
        sim.top_up(1)  # a record of another change, given a row of the call that is not its:
        late = sim.records[-1]
        journal.append([late])
        projector.step()
        tampered = row._replace(destination=row.destination + "9")
        journal.project([Projected(late.seq, late.at_ms, (), (), (tampered,))], late.seq)
        problems = verify(journal, None).problems
    assert problems == ["call c: history row differs from the replayed call"]


def test_list_calls_shows_an_open_call_as_memory_holds_it_and_drops_one_ended_since() -> None:
    """ListCalls reads rows, then swaps each open one for the live call (`service._live`):
    with active_only, a call that ended between the two reads is left out."""
    sim = world()
    sim.open_account(balance=1_000)
    sim.reserve("ends")
    sim.reserve("stays")
    rows = [sim.machine.calls[c].record() for c in ("ends", "stays")]  # as the history read
    sim.advance(ms=5_000)
    sim.apply(Takeover(epoch=2))
    sim.release("ends", used_seconds=3)
    live = _live(sim.machine, rows, active_only=True)
    assert [c.call_id for c in live] == ["stays"]
    assert rows[1].expires_at_ms is not None
    assert live[0].expires_at_ms == sim.now_ms + VALIDITY_MS > rows[1].expires_at_ms
    everything = _live(sim.machine, rows, active_only=False)
    assert [c.state for c in everything] == [CallState.RELEASED, CallState.ACTIVE]
