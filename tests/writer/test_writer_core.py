"""The writer core on its own: plain calls, no event loop, no ports, no sleeps.

Streams are plain strings and answers plain values: the core treats both as opaque.
"""

from __future__ import annotations

import pytest

from callcredit_server.core import (
    AccountStatus,
    CallState,
    Command,
    CreateAccount,
    GrantPush,
    GrantResult,
    PutTariff,
    Reason,
    Refused,
    Release,
    StateMachine,
    Tariff,
    Termination,
    Tick,
    TopUp,
    UpdateAccount,
)
from callcredit_server.core.outcomes import AccessReason
from callcredit_server.writer_core import WriterCore
from tests.core.helpers import RETENTION_MS, T0_MS, VALIDITY_SECONDS, rate, renew, reserve

Core = WriterCore[str, str]


def funded(*accounts: tuple[str, int], last_seq: int = 0) -> Core:
    """A core over a machine with a 1-unit-per-second tariff and `accounts` topped up."""
    core: Core = WriterCore(StateMachine(events=False), last_seq)  # as the server's
    setup: list[Command] = [PutTariff(Tariff("t", "VND", (rate(),)))]
    for account_id, amount in accounts:
        setup.append(CreateAccount(account_id, "VND", "t", 0, 0))
        setup.append(TopUp(account_id, amount, f"seed-{account_id}", ""))
    core.apply(setup, T0_MS)
    core.durable(core.take_records(len(core.records))[-1].seq)
    return core


def topup(account_id: str, amount: int, key: str) -> TopUp:
    return TopUp(account_id, amount, key, "")


# ------------------------------------------------------------------ journal seqs


def test_each_change_is_a_record_with_the_next_seq_and_a_refusal_is_none() -> None:
    core = funded(("A", 100), last_seq=41)
    assert core.durable_seq == core.next_seq - 1 == 41 + 3  # tariff, account, top-up
    outcomes, _ = core.apply(
        [reserve("c1"), reserve("c1", destination="999"), reserve("c2")], T0_MS
    )
    assert isinstance(outcomes[0], GrantResult) and isinstance(outcomes[2], GrantResult)
    assert isinstance(outcomes[1], Refused) and outcomes[1].reason is Reason.CALL_ID_CONFLICT
    assert [(r.seq, r.at_ms, r.command) for r in core.records] == [
        (45, T0_MS, reserve("c1")),
        (46, T0_MS, reserve("c2")),
    ]
    assert core.next_seq == 47


def test_take_records_hands_over_the_oldest_first_up_to_a_limit() -> None:
    core = funded(("A", 1_000))
    core.apply([reserve(f"c{n}") for n in range(3)], T0_MS)
    first = core.take_records(2)
    assert [r.seq for r in first] == [4, 5]
    assert [r.seq for r in core.take_records(2)] == [6]
    assert core.take_records(2) == [] and core.records == []


def test_a_round_is_never_applied_before_the_machines_time() -> None:
    core = funded(("A", 100))
    assert core.round_time(T0_MS - 5_000) == T0_MS
    assert core.round_time(T0_MS + 5) == T0_MS + 5


# ------------------------------------------------------------- holding answers


def test_an_answer_waits_for_every_record_that_existed_when_it_was_produced() -> None:
    core = funded(("A", 100))
    core.apply([reserve("c1")], T0_MS)  # record 4
    assert core.hold("answer-1") is False
    core.apply([reserve("c2")], T0_MS)  # record 5
    assert core.hold("answer-2") is False
    assert core.hold("read-after-2") is False  # a read sees record 5: it waits for it
    assert core.durable(core.take_records(1)[-1].seq) == ["answer-1"]
    assert core.durable(core.take_records(1)[-1].seq) == ["answer-2", "read-after-2"]
    assert core.durable_seq == 5


def test_an_answer_that_reflects_only_durable_records_is_released_at_once() -> None:
    core = funded(("A", 100))
    assert core.hold("read") is True  # nothing to wait for: the caller releases it
    core.apply([reserve("c1", destination="bad destination")], T0_MS)  # refused: no record
    assert core.records == [] and core.hold("refusal") is True
    assert core.durable(core.durable_seq) == []


def test_durable_beyond_what_was_applied_or_backwards_is_a_bug() -> None:
    core = funded(("A", 100))
    core.apply([reserve("c1")], T0_MS)
    with pytest.raises(ValueError, match="durable up to 5"):
        core.durable(5)  # only record 4 exists
    with pytest.raises(ValueError, match="durable up to 2"):
        core.durable(2)  # 3 already is


def test_a_failed_writer_drops_every_held_answer() -> None:
    core = funded(("A", 100))
    core.apply([reserve("c1")], T0_MS)
    core.hold("one")
    core.hold("two")
    assert core.drop_held() == ["one", "two"]
    assert core.durable(core.take_records(1)[-1].seq) == []


# ----------------------------------------------------------------- push routing


def test_pushes_go_to_the_stream_that_last_carried_the_call() -> None:
    core = funded(("A", 30))  # a 60 s reserve gets a final 30 s grant
    (grant,), _ = core.apply([reserve("c1")], T0_MS, "stream-1")
    assert isinstance(grant, GrantResult) and grant.grant.final
    core.apply([renew("c1", 1, 5)], T0_MS + 5_000, "stream-2")  # the dialer moved
    _, pushes = core.apply([topup("A", 100, "k1")], T0_MS + 6_000)
    assert [(to, type(push)) for to, push in pushes] == [("stream-2", GrantPush)]


def test_a_refused_operation_does_not_move_the_calls_pushes() -> None:
    core = funded(("A", 30), ("B", 100))
    core.apply([reserve("c1")], T0_MS, "owner")
    refused, _ = core.apply(
        [
            reserve("c1", account_id="B"),  # CALL_ID_CONFLICT: another tenant's call id
            renew("c1", 0, 5),  # invalid
            Release("c1", -1),  # invalid
        ],
        T0_MS,
        "intruder",
    )
    assert all(isinstance(o, Refused) for o in refused), refused
    assert core.routes == {"c1": "owner"}
    _, pushes = core.apply([topup("A", 100, "k1")], T0_MS)
    assert [to for to, _ in pushes] == ["owner"]
    _, pushes = core.apply([UpdateAccount("A", status=AccountStatus.SUSPENDED)], T0_MS)
    assert [(to, type(push)) for to, push in pushes] == [("owner", Termination)]


def test_an_idempotent_retry_on_a_new_stream_moves_the_route() -> None:
    core = funded(("A", 30))
    core.apply([reserve("c1")], T0_MS, "old")
    (again,), _ = core.apply([reserve("c1")], T0_MS, "new")  # the same Reserve: a success
    assert isinstance(again, GrantResult)
    assert core.routes == {"c1": "new"}


def test_an_ended_call_has_no_route_and_an_operation_on_it_makes_none() -> None:
    core = funded(("A", 100))
    core.apply([reserve("c1"), reserve("c2")], T0_MS, "s")
    core.apply([Release("c1", 3)], T0_MS, "s")
    assert core.routes == {"c2": "s"}
    core.apply([Release("c1", 3)], T0_MS, "other")  # a repeated Release: answered, not routed
    assert core.routes == {"c2": "s"}
    # Expiry ends c2 (silent past its validity): its route goes with it.
    core.apply([Tick(RETENTION_MS)], T0_MS + (VALIDITY_SECONDS + 1) * 1_000)
    assert core.machine.calls["c2"].state is CallState.EXPIRED
    assert core.routes == {}


def test_unary_and_admin_operations_route_nothing() -> None:
    core = funded(("A", 100))
    core.apply([reserve("c1")], T0_MS)  # target None: a unary Reserve
    assert core.routes == {}
    _, pushes = core.apply([UpdateAccount("A", status=AccountStatus.SUSPENDED)], T0_MS)
    assert pushes == []  # the termination is in the step, but has no stream to go to


def test_a_closed_stream_is_forgotten_and_its_calls_stay_open() -> None:
    core = funded(("A", 1_000))
    core.apply([reserve("c1"), reserve("c2")], T0_MS, "s1")
    core.apply([reserve("c3")], T0_MS, "s2")
    core.forget("s1")
    assert core.routes == {"c3": "s2"}
    assert core.machine.calls["c1"].state is CallState.ACTIVE


# ------------------------------------------------------------------ tenant guard


def test_the_tenant_guard_refuses_another_tenants_call_before_the_machine() -> None:
    core = funded(("A", 100), ("B", 100))
    core.apply([reserve("a1", account_id="A")], T0_MS, "a-stream")
    seq, call, account = core.next_seq, core.machine.call("a1"), core.machine.account("A")
    outcomes, pushes = core.apply(
        [renew("a1", 1, 5), Release("a1", 5), reserve("b1", account_id="B")],
        T0_MS + 1_000,
        "b-stream",
        "B".__eq__,  # b-stream's token may act on account B only
    )
    assert [o.reason for o in outcomes[:2] if isinstance(o, Refused)] == [
        AccessReason.PERMISSION_DENIED,
        AccessReason.PERMISSION_DENIED,
    ]
    assert isinstance(outcomes[2], GrantResult) and pushes == []
    assert core.routes == {"a1": "a-stream", "b1": "b-stream"}
    assert core.next_seq == seq + 1  # only b1's reserve was journaled
    assert (core.machine.call("a1"), core.machine.account("A")) == (call, account)


def test_the_tenant_guard_runs_no_expiry() -> None:
    """A refused Renew never reaches the machine, so even an overdue call stays as it is."""
    core = funded(("A", 100))
    core.apply([reserve("a1")], T0_MS, "a-stream")
    seq, call = core.next_seq, core.machine.call("a1")
    late = T0_MS + (VALIDITY_SECONDS + 1) * 1_000
    (outcome,), _ = core.apply([renew("a1", 1, 5)], late, "b-stream", "B".__eq__)
    assert isinstance(outcome, Refused) and outcome.reason is AccessReason.PERMISSION_DENIED
    assert (core.next_seq, core.machine.call("a1")) == (seq, call)


def test_a_call_memory_no_longer_holds_is_left_to_the_machine() -> None:
    core = funded(("A", 100))
    (outcome,), _ = core.apply([renew("gone", 1, 1)], T0_MS, "s", "B".__eq__)
    assert isinstance(outcome, Refused) and outcome.reason is Reason.CALL_NOT_FOUND


def test_every_step_is_shown_to_an_observer() -> None:
    core = funded(("A", 100))
    seen: list[str] = []
    core.on_step = lambda command, step: seen.append(type(step.outcome).__name__)
    core.apply([reserve("c1"), reserve("c1", destination="999")], T0_MS)
    assert seen == ["GrantResult", "Refused"]
