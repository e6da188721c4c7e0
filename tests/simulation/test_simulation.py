"""The deterministic simulation: a fixed list of seeds, and proof that its checks bite.

A failing seed says so in its first words ("seed 17 step 1234: ...") and replays
exactly with `python scripts/simulate.py --seed 17`. More seeds:
`python scripts/simulate.py --seeds 500 --start 1000`.

The second half injects one bug at a time into a piece of the server (a subclass of
the StateMachine or of the WriterCore, or the simulated journal) and
checks that the simulation fails on it — with the model's comparison on, and, where
the bug is about money or durability, with only the auditor's own checks.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from callcredit_server.core import (
    AccountStatus,
    CallState,
    EntryKind,
    GrantPush,
    Outcome,
    Reason,
    Refused,
    Release,
    ReleaseOutcome,
    StateMachine,
    cost,
)
from callcredit_server.journal import JournalRecord
from callcredit_server.writer_core import WriterCore

from .vopr import SimJournal, Simulation, uses_real_journal

CI_SEEDS = range(1, 25)  # three of them (5, 13, 21) also run a real SQLite journal
CI_STEPS = 2_000


@pytest.mark.parametrize("seed", [pytest.param(seed, id=f"seed-{seed}") for seed in CI_SEEDS])
def test_seed(seed: int, tmp_path: Path) -> None:
    summary = Simulation(seed, directory=tmp_path).run(CI_STEPS)
    assert summary.steps == CI_STEPS and summary.acked > 0


def test_the_ci_seeds_include_real_journals() -> None:
    assert [seed for seed in CI_SEEDS if uses_real_journal(seed)] == [5, 13, 21]


def test_the_workload_reaches_every_path() -> None:
    """A few seeds together crash with work in flight, recover from snapshots, and
    drive every rule docs/design.md states (so a quiet workload cannot pass for a safe one)."""
    seen: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    for seed in (1, 2, 3):
        summary = Simulation(seed, real_journal=False).run(2_000)
        for name in (
            "crashes",
            "restarts",
            "failed_commits",
            "lost",
            "snapshots",
            "from_snapshot",
            "prunes",
            "expiries",
            "late_releases",
            "refunds",
            "shortfalls",
            "regrants",
            "terminations",
            "forgotten",
            "conflicts",
            "hijacks",
        ):
            seen[name] += getattr(summary, name)
        refused.update(summary.refused)
    assert all(seen[name] > 0 for name in seen), seen
    assert sorted(refused) == sorted(reason.value for reason in Reason), refused


def test_a_seed_replays_exactly() -> None:
    first = Simulation(7, real_journal=False).run(600)
    again = Simulation(7, real_journal=False).run(600)
    assert first == again


# ---------------------------------------------------------------- the checks bite


def _caught(simulation: type[Simulation], *, steps: int = 1_500, seeds: int = 6) -> str:
    """The failure of the first seed that catches the injected bug."""
    for seed in range(1, seeds + 1):
        try:
            simulation(seed, real_journal=False).run(steps)
        except AssertionError as failure:
            message = str(failure)
            assert re.match(rf"seed {seed} step \d+: ", message), message
            return message
    raise AssertionError(f"{simulation.__name__}: no seed caught the bug")


class HoldsForThePreviousRecord(WriterCore[Any, Any]):
    """Writer core bug: an answer waits for the record before its own."""

    def hold(self, answer: Any) -> bool:
        self.next_seq -= 1
        try:
            return super().hold(answer)
        finally:
            self.next_seq += 1


class AcksBeforeDurable(Simulation):
    core_class = HoldsForThePreviousRecord


class RoutesRefusedOperations(WriterCore[Any, Any]):
    """Writer core bug (issue 9): a refused operation routes its call to its stream."""

    def apply(
        self, commands: Any, now_ms: int, target: Any = None, allows: Any = None
    ) -> tuple[list[Outcome], list[Any]]:
        outcomes, pushes = super().apply(commands, now_ms, target, allows)
        for command, outcome in zip(commands, outcomes, strict=True):
            call = self.machine.calls.get(getattr(command, "call_id", ""))
            active = call is not None and call.state is CallState.ACTIVE
            if active and target is not None and isinstance(outcome, Refused):
                self.routes[command.call_id] = target
        return outcomes, pushes


class MisroutesPushes(Simulation):
    core_class = RoutesRefusedOperations


class ForgetsItsLastCommit(SimJournal):
    """A journal that loses its last committed record in a crash (a lying fsync)."""

    def crash(self, uncommitted: Any) -> None:
        if self.rows and self.rows[-1][0] > self.pruned_through + 1:
            self.rows.pop()


class LosesCommits(Simulation):
    journal_class = ForgetsItsLastCommit


class LosesCommitsUnmodelled(LosesCommits):
    check_with_model = False


class KeepsAnUncommittedRecord(SimJournal):
    """A journal that keeps a record whose transaction never committed."""

    def crash(self, uncommitted: Any) -> None:
        if uncommitted:
            self.append(list(uncommitted)[:1])


class KeepsUncommitted(Simulation):
    journal_class = KeepsAnUncommittedRecord


class TornCommits(SimJournal):
    """A group commit that is not atomic: only part of the batch reaches the disk."""

    def append(self, records: Any) -> None:
        batch: list[JournalRecord] = list(records)
        super().append(batch[: max(1, len(batch) - 1)])


class NonAtomicCommits(Simulation):
    journal_class = TornCommits


class ReplaysAtTheWallClock(Simulation):
    """recover() bug: records replayed at the time of recovery, not their own."""

    def replay_at(self, at_ms: int) -> int:
        return max(at_ms, self.now_ms)


class ChargesARepeatedRelease(StateMachine):
    """A re-sent Release is answered with the first result, but charged again."""

    def _release(self, c: Release) -> Outcome:
        call = self.calls.get(c.call_id)
        if (
            call is not None
            and call.state is CallState.RELEASED
            and call.release is not None
            and call.release.used_seconds == c.used_seconds
        ):
            account = self.accounts[call.account_id]
            charge = min(cost(call.rate, c.used_seconds), account.available)
            if charge:
                self._changed = True
                self._post(account, EntryKind.CALL_CHARGE, -charge, call_id=call.call_id)
            return ReleaseOutcome(call.release)
        return super()._release(c)


class DoubleCharges(Simulation):
    def new_machine(self) -> StateMachine:
        return ChargesARepeatedRelease()


class DoubleChargesUnmodelled(DoubleCharges):
    check_with_model = False


class ForgetsIdempotencyKeys(StateMachine):
    """A TopUp or Adjust repeated with its key is applied again."""

    def _move_money(self, account_id: str, *args: Any) -> Outcome:
        self._keys.clear()
        self._key_times.clear()
        return super()._move_money(account_id, *args)


class AppliesTopUpsTwice(Simulation):
    check_with_model = False

    def new_machine(self) -> StateMachine:
        return ForgetsIdempotencyKeys()


class RegrantsNewestFirst(StateMachine):
    """Re-grants go to the youngest final call first (docs/design.md: oldest first)."""

    def _regrant(self, account: Any, *, resumed: bool = False) -> None:
        if account.status is not AccountStatus.ACTIVE:
            return
        for call_seq in sorted(account.final_calls, reverse=True):  # the bug
            if account.available <= 0 and not resumed:
                break
            call = account.final_calls[call_seq]
            before = call.grant()
            self._extend(account, call)
            if call.grant() != before:
                self._refresh_validity(call)
                self._touched[call.call_id] = call
                self._pushes.append(GrantPush(call.grant()))
        self._accounts_touched[account.account_id] = account


class RegrantsBackwards(Simulation):
    def new_machine(self) -> StateMachine:
        return RegrantsNewestFirst()


class ExpiresForWhatWasUsed(StateMachine):
    """Expiry charges cost(used) instead of cost(allowed) (docs/design.md: the most allowed)."""

    def _expire_if_due(self, call: Any) -> int:
        if call.state is CallState.ACTIVE and call.expires_at_ms < self.now_ms:
            call.held = cost(call.rate, call.used_seconds)
            self.accounts[call.account_id].reserved = sum(
                c.held for c in self.accounts[call.account_id].open_calls.values()
            )
        return super()._expire_if_due(call)


class UndercountsExpiry(Simulation):
    def new_machine(self) -> StateMachine:
        return ExpiresForWhatWasUsed()


class UndercountsExpiryUnmodelled(UndercountsExpiry):
    check_with_model = False


class SnapshotsWithoutKeys(StateMachine):
    """A snapshot that does not bring back the idempotency keys."""

    @classmethod
    def from_image(cls, image: dict[str, Any]) -> StateMachine:
        return super().from_image({**image, "keys": []})


class LosesKeysInSnapshots(Simulation):
    def new_machine(self) -> StateMachine:
        return SnapshotsWithoutKeys()


class RefusesLateReleases(StateMachine):
    """A Release after expiry is refused instead of re-rated and refunded."""

    def _late_release(self, account: Any, call: Any, used_seconds: int) -> Outcome:
        return Refused(Reason.CALL_ALREADY_ENDED, f"call {call.call_id!r} expired")


class NeverRefunds(Simulation):
    def new_machine(self) -> StateMachine:
        return RefusesLateReleases()


@pytest.mark.parametrize(
    ("simulation", "finding"),
    [
        pytest.param(AcksBeforeDurable, r"only \d+ are durable", id="ack-before-durable"),
        pytest.param(MisroutesPushes, r"routed to d\d's stream", id="refusal-routes-pushes"),
        pytest.param(NonAtomicCommits, r"only \d+ are durable", id="group-commit-not-atomic"),
        pytest.param(
            LosesCommits, "after a (crash|clean restart): account", id="journal-loses-a-commit"
        ),
        pytest.param(
            LosesCommitsUnmodelled, "acknowledged .* recover", id="journal-loses-a-commit-auditor"
        ),
        pytest.param(KeepsUncommitted, "never committed", id="journal-keeps-uncommitted"),
        pytest.param(ReplaysAtTheWallClock, "is not what it did first", id="replay-at-wall-clock"),
        pytest.param(LosesKeysInSnapshots, "idempotency keys", id="snapshot-loses-keys"),
        pytest.param(
            DoubleCharges, "changed=True, the model says False", id="release-charged-twice"
        ),
        pytest.param(
            DoubleChargesUnmodelled,
            "repeat of Release.* posted",
            id="release-charged-twice-auditor",
        ),
        pytest.param(AppliesTopUpsTwice, "posted twice", id="top-up-applied-twice-auditor"),
        pytest.param(UndercountsExpiry, "EXPIRY_CHARGE", id="expiry-charges-used"),
        pytest.param(
            UndercountsExpiryUnmodelled,
            "the ledger must charge cost",
            id="expiry-charges-used-auditor",
        ),
        pytest.param(RegrantsBackwards, "pushes .*, the model says", id="regrant-newest-first"),
        pytest.param(NeverRefunds, "docs/design.md says ReleaseOutcome", id="late-release-refused"),
    ],
)
def test_an_injected_bug_is_caught(simulation: type[Simulation], finding: str) -> None:
    message = _caught(simulation)
    assert re.search(finding, message), message
