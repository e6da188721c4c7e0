"""The auditor: what must hold of every acknowledged answer, of the ledger, and after recovery.

It judges the server from the outside, with docs/design.md's rules, from three things:
the ledger entries the state machine handed out (and which of them are durable),
the answers the server acknowledged, and the model (model.py) for the prices and
holds a call was given. It never calls the state machine's code.

- Ledger: entry ids run on without a gap; each entry's `balance_after` follows from
  the one before; a call is charged at most once (CALL_CHARGE, or EXPIRY_CHARGE
  then at most one REFUND no larger than it); an idempotency key posts at most
  once; money is conserved: top-ups + adjustments - charges + refunds = balances.
- Answers (when produced, and again when acknowledged): a grant costs what it holds
  and never more than the account had available; a release charges cost(used), or
  what held + available covered with the rest as shortfall; an expiry charges
  cost(allowed); a late release refunds down to cost(used) and never charges more;
  a repeat gets the first answer; an acknowledged answer never reflects a journal
  record that is not yet durable.
- Recovery: every acknowledged operation is in the rebuilt state exactly once
  (a top-up's entry, a release's charge, a reserve's call, a renewal's sequence),
  and the rebuilt state is exactly the durable journal's — nothing half-applied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

from callcredit_server.core import (
    AccountResult,
    AccountView,
    Adjust,
    CallRecord,
    CallState,
    Command,
    EntryKind,
    Grant,
    GrantResult,
    LedgerEntry,
    Outcome,
    Refused,
    Release,
    ReleaseOutcome,
    ReleaseResult,
    Renew,
    Reserve,
    StateMachine,
    TopUp,
)

from .model import Model, price

_CALL_PATTERNS = (
    (EntryKind.CALL_CHARGE,),
    (EntryKind.EXPIRY_CHARGE,),
    (EntryKind.EXPIRY_CHARGE, EntryKind.REFUND),
)


# ------------------------------------------------------------------ the ledger


# The shortest retention window any simulated run uses (vopr picks 12-40 minutes).
# After its window the server forgets an idempotency key (docs/design.md): a request with
# that key arriving later is new to it. Server and model agree on that; the checks
# below treat a key as "the same request" only within this shortest window.
MIN_RETENTION_MS = 12 * 60_000


@dataclass(slots=True)
class Ledger:
    """Ledger entries as the auditor saw them handed out, checked one by one."""

    last_entry_id: int = 0
    totals: dict[EntryKind, int] = field(default_factory=lambda: dict.fromkeys(EntryKind, 0))
    balances: dict[str, int] = field(default_factory=dict)
    by_account: dict[str, list[LedgerEntry]] = field(default_factory=dict)
    by_call: dict[str, list[LedgerEntry]] = field(default_factory=dict)
    by_key: dict[tuple[str, str], LedgerEntry] = field(default_factory=dict)

    def add(self, entries: Iterable[LedgerEntry]) -> None:
        for entry in entries:
            self._add(entry)

    def _add(self, e: LedgerEntry) -> None:
        if e.entry_id != self.last_entry_id + 1:
            raise AssertionError(
                f"entry {e.entry_id} follows entry {self.last_entry_id}: ids must not skip"
            )
        self.last_entry_id = e.entry_id
        balance = self.balances.get(e.account_id, 0) + e.amount
        if e.balance_after != balance:
            raise AssertionError(
                f"entry {e.entry_id}: balance_after {e.balance_after}, but the entries of "
                f"{e.account_id} sum to {balance}"
            )
        self.balances[e.account_id] = balance
        self.totals[e.kind] += e.amount
        self.by_account.setdefault(e.account_id, []).append(e)
        if e.kind in (EntryKind.TOP_UP, EntryKind.ADJUSTMENT):
            if e.kind is EntryKind.TOP_UP and e.amount <= 0:
                raise AssertionError(f"entry {e.entry_id}: a top-up of {e.amount}")
            key = (e.account_id, e.idempotency_key)
            first = self.by_key.get(key)
            if first is not None and e.created_at_ms - first.created_at_ms < MIN_RETENTION_MS:
                raise AssertionError(f"idempotency key {key} posted twice: entries {first} and {e}")
            self.by_key[key] = e
            return
        if e.call_id == "":
            raise AssertionError(f"entry {e.entry_id}: a {e.kind} without a call")
        entries = self.by_call.setdefault(e.call_id, [])
        entries.append(e)
        kinds = tuple(x.kind for x in entries)
        if kinds not in _CALL_PATTERNS:
            raise AssertionError(
                f"call {e.call_id} charged more than once: "
                f"{[(x.kind.value, x.amount) for x in entries]}"
            )
        if e.kind is EntryKind.REFUND and not 0 < e.amount <= -entries[0].amount:
            raise AssertionError(
                f"call {e.call_id}: refund {e.amount} of an expiry charge {entries[0].amount}"
            )
        if e.kind is not EntryKind.REFUND and e.amount >= 0:
            raise AssertionError(f"call {e.call_id}: a charge of {e.amount}")

    def copy(self) -> Ledger:
        return Ledger(
            self.last_entry_id,
            dict(self.totals),
            dict(self.balances),
            {k: list(v) for k, v in self.by_account.items()},
            {k: list(v) for k, v in self.by_call.items()},
            dict(self.by_key),
        )

    def call_net(self, call_id: str) -> int:
        """What the call costs the account in the end: charges less refunds."""
        return -sum(e.amount for e in self.by_call.get(call_id, ()))

    def check_conserved(self, balances: dict[str, int], where: str) -> None:
        """docs/design.md: top-ups + adjustments - charges + refunds = sum of balances."""
        t = self.totals
        charges = -(t[EntryKind.CALL_CHARGE] + t[EntryKind.EXPIRY_CHARGE])
        money = t[EntryKind.TOP_UP] + t[EntryKind.ADJUSTMENT] - charges + t[EntryKind.REFUND]
        total = sum(balances.values())
        if money != total:
            raise AssertionError(
                f"{where}: money not conserved: top-ups {t[EntryKind.TOP_UP]} + adjustments "
                f"{t[EntryKind.ADJUSTMENT]} - charges {charges} + refunds {t[EntryKind.REFUND]} "
                f"= {money}, but balances sum to {total}"
            )
        for account_id, balance in balances.items():
            seen = self.balances.get(account_id, 0)
            if balance != seen:
                raise AssertionError(
                    f"{where}: {account_id} has balance {balance}, its entries sum to {seen}"
                )


# ------------------------------------------------------------------ answers


@dataclass(frozen=True, slots=True)
class Before:
    """What the model knew just before a command: what a reply is judged against."""

    available: int | None  # of the account the command is about
    call: CallRecord | None
    release: ReleaseResult | None  # the call's first release answer, if it had one


def before(model: Model, command: Command, now_ms: int) -> Before:
    """The model's view just before `command` applies at `now_ms`.

    Time passes first: a call silent past its validity is already EXPIRED when the
    command is looked at, charged its hold (`available` does not change: the charge
    is exactly the hold it frees).
    """
    call_id = getattr(command, "call_id", None)
    call = model.call(call_id) if isinstance(call_id, str) else None
    if (
        call is not None
        and call.state is CallState.ACTIVE
        and call.expires_at_ms is not None
        and call.expires_at_ms < now_ms
    ):
        call = dataclasses.replace(
            call,
            state=CallState.EXPIRED,
            charged=call.held,
            held=0,
            final=False,
            ended_at_ms=now_ms,
            expires_at_ms=None,
        )
    account_id = call.account_id if call is not None else getattr(command, "account_id", None)
    view = model.view(account_id) if isinstance(account_id, str) else None
    release = model.release_of(call_id) if isinstance(call_id, str) else None
    return Before(None if view is None else view.available, call, release)


def check_expiries(calls: list[CallRecord], ledger: Ledger) -> None:
    """docs/design.md, Expiry: a call that went silent is charged cost(allowed_seconds), once.

    `calls` are the calls a step touched, `ledger` includes the step's entries.
    """
    for call in calls:
        if call.state is not CallState.EXPIRED:
            continue
        owed = price(call.rate, call.allowed_seconds)
        charged = [
            e.amount
            for e in ledger.by_call.get(call.call_id, ())
            if e.kind is EntryKind.EXPIRY_CHARGE
        ]
        if charged != ([-owed] if owed else []):
            raise AssertionError(
                f"{call.call_id} expired with {call.allowed_seconds}s allowed: the ledger "
                f"must charge cost = {owed} once, it shows {charged}"
            )


def check_answer(
    command: Command, outcome: Outcome, entries: list[LedgerEntry], was: Before, model: Model
) -> None:
    """docs/design.md's rules for one answer, given what the account and call were before.

    (Calls past their validity expire before the command itself: they do not change
    `available`, because an expiry charges exactly the hold it frees.)
    """
    if isinstance(command, Reserve) and isinstance(outcome, GrantResult):
        grant = outcome.grant
        call = model.call(command.call_id)
        if call is None:
            raise AssertionError(f"{command.call_id}: granted, but the call is unknown")
        assert call is not None
        if grant.held != price(call.rate, grant.allowed_seconds):
            raise AssertionError(f"{grant}: held is not the cost of allowed_seconds at {call.rate}")
        if was.call is None:  # a new call, not a repeat
            if was.available is None:
                raise AssertionError(f"{command.call_id}: granted on no account")
            assert was.available is not None
            if not (0 < grant.allowed_seconds <= command.grant_seconds):
                raise AssertionError(f"{grant}: allowed outside 1..g={command.grant_seconds}")
            if grant.held > was.available:
                raise AssertionError(
                    f"{grant}: holds {grant.held}, more than the {was.available} available"
                )
            if grant.final != (grant.allowed_seconds < command.grant_seconds):
                raise AssertionError(f"{grant}: final must say allowed < g={command.grant_seconds}")
    elif isinstance(command, Renew) and isinstance(outcome, GrantResult):
        grant = outcome.grant
        call = model.call(command.call_id)
        assert call is not None and was.call is not None
        if grant.held != price(call.rate, grant.allowed_seconds):
            raise AssertionError(f"{grant}: held is not the cost of allowed_seconds")
        if command.sequence > was.call.last_sequence:
            if grant.allowed_seconds < was.call.allowed_seconds:
                raise AssertionError(
                    f"{grant}: a renewal took back granted seconds ({was.call.allowed_seconds})"
                )
            if grant.allowed_seconds > max(
                was.call.allowed_seconds, command.used_seconds + command.grant_seconds
            ):
                raise AssertionError(
                    f"{grant}: more than one grant beyond the {command.used_seconds}s used"
                )
            assert was.available is not None
            if grant.held - was.call.held > was.available:
                raise AssertionError(
                    f"{grant}: the hold grew by more than the {was.available} available"
                )
    elif isinstance(command, Release) and isinstance(outcome, ReleaseOutcome):
        _check_release(command, outcome.result, entries, was)


def _check_release(
    command: Release, result: ReleaseResult, entries: list[LedgerEntry], was: Before
) -> None:
    call = was.call
    if call is None:
        raise AssertionError(f"{command.call_id}: released, but no call was known")
    assert call is not None
    mine = [e for e in entries if e.call_id == command.call_id]
    expiry = [e for e in mine if e.kind is EntryKind.EXPIRY_CHARGE]
    if expiry:  # time passed first: the call expired in this very step
        if not (call.state is CallState.EXPIRED and [e.amount for e in expiry] == [-call.charged]):
            raise AssertionError(
                f"{command}: expired in this step as {expiry}, its hold was {call.charged}"
            )
        mine = [e for e in mine if e.kind is not EntryKind.EXPIRY_CHARGE]
    if was.release is not None:
        if result != was.release:
            raise AssertionError(f"repeat of {command} answered {result}, not {was.release}")
        if mine != []:
            raise AssertionError(f"repeat of {command} posted {mine}")
        return
    cost_used = price(call.rate, command.used_seconds)
    if not (result.used_seconds == command.used_seconds and result.call_id == command.call_id):
        raise AssertionError(f"{result}: not the answer to {command}")
    if result.charged + result.shortfall != cost_used:
        raise AssertionError(
            f"{result}: charged + shortfall must be cost({command.used_seconds}s) = {cost_used}"
        )
    if call.state is CallState.ACTIVE:
        assert was.available is not None
        covered = call.held + was.available
        if result.charged != min(cost_used, covered):
            raise AssertionError(
                f"{result}: must charge min(cost {cost_used}, held + available {covered})"
            )
        if [e.amount for e in mine] != ([-result.charged] if result.charged else []):
            raise AssertionError(f"{result}: ledger shows {mine}")
    else:  # EXPIRED: re-rated down to cost(used), never above what expiry charged
        if result.charged != min(cost_used, call.charged):
            raise AssertionError(
                f"{result}: a late release must charge min(cost {cost_used}, "
                f"the {call.charged} expiry charged)"
            )
        refund = call.charged - result.charged
        if [e.amount for e in mine] != ([refund] if refund else []):
            raise AssertionError(f"{result}: refund must be {refund}, ledger shows {mine}")


# ------------------------------------------------------------------ acknowledgements


@dataclass(slots=True)
class Acknowledged:
    """Everything the server acknowledged: what recovery must keep, and first answers."""

    money: dict[tuple[str, str], tuple[Command, AccountView, int]] = field(default_factory=dict)
    releases: dict[str, ReleaseResult] = field(default_factory=dict)
    grants: dict[str, Grant] = field(default_factory=dict)  # the largest grant acked per call
    renewals: dict[str, int] = field(default_factory=dict)  # the highest sequence acked

    def on_ack(self, command: Command, outcome: Outcome, now_ms: int) -> None:
        """Record an acknowledged answer; a repeat must equal the first answer."""
        if isinstance(command, TopUp | Adjust):
            key = (command.account_id, command.idempotency_key)
            first = self.money.get(key)
            if first is not None and now_ms - first[2] >= MIN_RETENTION_MS:
                first = None  # the server may have forgotten the key since
            if isinstance(outcome, AccountResult):
                if first is None:
                    self.money[key] = (command, outcome.account, now_ms)
                    return
                if first[0] != command:
                    raise AssertionError(
                        f"key {key}: acknowledged for {first[0]} and again for {command}"
                    )
                if first[1] != outcome.account:
                    raise AssertionError(
                        f"repeat of {command} answered {outcome.account}, first {first[1]}"
                    )
            elif isinstance(outcome, Refused) and first is not None and first[0] == command:
                raise AssertionError(f"repeat of acknowledged {command} refused: {outcome}")
        elif isinstance(command, Release) and isinstance(outcome, ReleaseOutcome):
            first_release = self.releases.setdefault(command.call_id, outcome.result)
            same_request = first_release.used_seconds == command.used_seconds
            if same_request and first_release != outcome.result:
                raise AssertionError(
                    f"repeat of {command} answered {outcome.result}, first {first_release}"
                )
        elif isinstance(command, Reserve | Renew) and isinstance(outcome, GrantResult):
            grant = outcome.grant
            seen = self.grants.get(command.call_id)
            if seen is None or grant.allowed_seconds > seen.allowed_seconds:
                self.grants[command.call_id] = grant
            if isinstance(command, Renew):
                done = self.renewals.get(command.call_id, 0)
                self.renewals[command.call_id] = max(done, command.sequence)

    def on_push_ack(self, grant: Grant) -> None:
        seen = self.grants.get(grant.call_id)
        if seen is None or grant.allowed_seconds > seen.allowed_seconds:
            self.grants[grant.call_id] = grant

    def check_survived(self, machine: StateMachine, durable: Ledger, model: Model) -> None:
        """After a crash: every acknowledged operation is there, exactly once."""
        for key, (command, _, _) in self.money.items():
            entry = durable.by_key.get(key)
            if entry is None:
                raise AssertionError(f"acknowledged {command} is not in the ledger after recovery")
            assert entry is not None and isinstance(command, TopUp | Adjust)
            if entry.amount != command.amount:
                raise AssertionError(f"acknowledged {command} recovered as {entry}")
        for call_id, result in self.releases.items():
            if durable.call_net(call_id) != result.charged:
                raise AssertionError(
                    f"acknowledged release of {call_id} charged {result.charged}; after "
                    f"recovery the ledger charges it {durable.call_net(call_id)}"
                )
            call = machine.call(call_id)
            if call is not None:
                if not (call.state is not CallState.ACTIVE and call.charged == result.charged):
                    raise AssertionError(
                        f"acknowledged release of {call_id} ({result}) recovered as {call}"
                    )
            else:
                if call_id not in model.forgotten:
                    raise AssertionError(
                        f"acknowledged release of {call_id}: the call is gone after recovery"
                    )
        for call_id, grant in self.grants.items():
            call = machine.call(call_id)
            if call is None:
                if call_id not in model.forgotten:
                    raise AssertionError(
                        f"acknowledged grant {grant}: the call is gone after recovery"
                    )
                continue
            if call.state is CallState.ACTIVE and call.allowed_seconds < grant.allowed_seconds:
                raise AssertionError(
                    f"acknowledged grant {grant}, recovered call allows {call.allowed_seconds}"
                )
            sequence = self.renewals.get(call_id, 0)
            if call.last_sequence < sequence:
                raise AssertionError(
                    f"acknowledged renewal {sequence} of {call_id}; "
                    f"recovered at {call.last_sequence}"
                )


# ------------------------------------------------------------------ whole state


def compare_state(machine: StateMachine, model: Model, where: str) -> None:
    """The machine's state, read through its public reads, equals the model's."""
    if sorted(machine.accounts) != sorted(model.accounts):
        raise AssertionError(
            f"{where}: accounts {sorted(machine.accounts)} != model {sorted(model.accounts)}"
        )
    for account_id in model.accounts:
        got, want = machine.account(account_id), model.view(account_id)
        if got != want:
            raise AssertionError(f"{where}: account {got} != model {want}")
        open_ids = [c.call_id for c in machine.open_calls(account_id)]
        if open_ids != list(reversed(model.open_call_ids(account_id))):
            raise AssertionError(f"{where}: {account_id} open calls {open_ids} != model")
    if sorted(machine.calls) != sorted(model.calls):
        raise AssertionError(
            f"{where}: calls in memory differ: only machine "
            f"{sorted(set(machine.calls) - set(model.calls))}, only model "
            f"{sorted(set(model.calls) - set(machine.calls))}"
        )
    for call_id, modelled in model.calls.items():
        got_call, want_call = machine.call(call_id), modelled.record()
        if got_call != want_call:
            raise AssertionError(f"{where}: call {got_call} != model {want_call}")
        # What a call keeps beyond its record: what repeats and re-grants are judged by.
        inner = machine.calls[call_id]
        sizes = (inner.requested_seconds, inner.grant_seconds, inner.validity_seconds)
        wanted = (modelled.requested_seconds, modelled.grant_seconds, modelled.validity_seconds)
        if sizes != wanted:
            raise AssertionError(
                f"{where}: call {call_id} (requested, g, validity) {sizes} != model {wanted}"
            )
        if (inner.last_renew, inner.release) != (modelled.last_renew, modelled.release):
            raise AssertionError(
                f"{where}: call {call_id} first answers {(inner.last_renew, inner.release)} != "
                f"model {(modelled.last_renew, modelled.release)}"
            )
    if machine.tariffs != model.tariffs:
        raise AssertionError(f"{where}: tariffs differ")
    keys = sorted(machine._keys)
    if keys != model.key_ids():
        raise AssertionError(f"{where}: idempotency keys {keys} != {model.key_ids()}")
    if not (
        machine.last_entry_id == model.last_entry_id
        and machine.last_call_seq == model.last_call_seq
    ):
        raise AssertionError(
            f"{where}: counters ({machine.last_entry_id}, {machine.last_call_seq}) != model "
            f"({model.last_entry_id}, {model.last_call_seq})"
        )
