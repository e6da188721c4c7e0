"""The simulated clients: dialers and an operator, and the requests they send.

A request is what travels from a client to the server. The server turns it into a
command with its own settings (grant size, validity), as service.py does, so a
request re-sent after a restart with other settings becomes a different command.

Clients behave as docs/design.md expects of them, and as the dialer library does:
every operation is idempotent, so whatever is unanswered is sent again — as it
was for reserves, releases and top-ups; as a fresh Renew with the next sequence
after a reconnect. Some of them misbehave in ways the server must survive:
dialers that go silent (their calls expire; the release comes late), dialers that
overrun their grant, operators that retry with the same key, or reuse a key with
another amount, or a dialer that reuses a call id for another destination. No
client sends an operation older than `GIVE_UP_MS`, nor reuses an id older than
that, and GIVE_UP_MS plus the network's longest delay is shorter than the
retention window: ids are never reused after it (docs/design.md, Idempotency), so
every repeat the server sees is one it must recognise.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from callcredit_server.core import (
    AccountStatus,
    AccountView,
    Adjust,
    CreateAccount,
    Grant,
    GrantPush,
    GrantResult,
    Outcome,
    Push,
    PutTariff,
    Rate,
    Reason,
    Refused,
    Tariff,
    Termination,
    TopUp,
    UpdateAccount,
)

GIVE_UP_MS = 5 * 60 * 1000  # a client abandons an unanswered operation after this
RETRY_AFTER_MS = 5_000  # an unanswered operation is sent again (same stream) after this
RENEW_MARGIN_SECONDS = 10  # renew when the grant has this little talk time left
MAX_CALLS_PER_DIALER = 24


# ------------------------------------------------------------------ requests


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    call_id: str
    account_id: str
    destination: str
    requested_seconds: int


@dataclass(frozen=True, slots=True)
class RenewRequest:
    call_id: str
    sequence: int
    used_seconds: int
    requested_seconds: int


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    call_id: str
    used_seconds: int


AdminCommand = CreateAccount | UpdateAccount | TopUp | Adjust | PutTariff


@dataclass(frozen=True, slots=True)
class AdminRequest:
    command: AdminCommand


@dataclass(frozen=True, slots=True)
class ReadAccount:
    """GetAccount: answered from memory, so it waits for the journal like a change."""

    account_id: str


@dataclass(frozen=True, slots=True)
class TickRequest:
    """The server's own tick task."""


Request = ReserveRequest | RenewRequest | ReleaseRequest | AdminRequest | ReadAccount | TickRequest

Answer = Outcome | AccountView | None  # None: a read of an account that does not exist


@dataclass(slots=True, eq=False)
class Op:
    """One operation as a client sent it; copies of it (re-sends) share the op_id."""

    op_id: int
    client: Client | None  # None: the server's tick task
    request: Request
    born_ms: int  # when it was first sent: the network drops copies older than GIVE_UP_MS


class Network(Protocol):
    def send(self, client: Client, ops: Sequence[Op]) -> None: ...


# ------------------------------------------------------------------ clients


class Client:
    """What every client does: keep unanswered operations, re-send, give up."""

    def __init__(
        self, name: str, rng: random.Random, network: Network, next_op_id: Callable[[], int]
    ) -> None:
        self.name = name
        self.rng = rng
        self.network = network
        self.next_op_id = next_op_id
        self.epoch = 0  # which stream: answers on a broken one are lost
        self.pending: dict[int, Op] = {}
        self.outbox: list[Op] = []
        self.sent = 0
        self.answered = 0

    def __repr__(self) -> str:
        return self.name

    def send(self, request: Request, now_ms: int, born_ms: int | None = None) -> Op:
        op = Op(self.next_op_id(), self, request, now_ms if born_ms is None else born_ms)
        self.pending[op.op_id] = op
        self.outbox.append(op)
        return op

    def flush(self) -> None:
        """Send what is queued: as one message, or a few (the library coalesces)."""
        ops, self.outbox = self.outbox, []
        while ops:
            cut = len(ops) if self.rng.random() < 0.7 else self.rng.randint(1, len(ops))
            self.network.send(self, ops[:cut])
            self.sent += cut
            ops = ops[cut:]

    def reconnect(self, now_ms: int) -> None:
        """The stream broke: a new one carries every unanswered operation again."""
        self.epoch += 1
        self.outbox = [op for op in self.pending.values() if self.keep_on_reconnect(op)]
        self.pending = {op.op_id: op for op in self.outbox}
        self.reattach(now_ms)

    def retry(self, now_ms: int) -> None:
        """A timeout: send again what has waited too long, on the same stream."""
        for op in self.pending.values():
            if now_ms - op.born_ms >= RETRY_AFTER_MS and op not in self.outbox:
                self.outbox.append(op)

    def give_up(self, now_ms: int) -> None:
        for op in [op for op in self.pending.values() if now_ms - op.born_ms > GIVE_UP_MS]:
            del self.pending[op.op_id]
            self.abandoned(op)

    def deliver(self, op: Op, answer: Answer, now_ms: int) -> None:
        if self.pending.pop(op.op_id, None) is None:
            return  # a second answer (to a copy), or one given up on
        self.answered += 1
        self.handle(op, answer, now_ms)

    # Subclasses.
    def act(self, now_ms: int) -> None:
        raise NotImplementedError

    def handle(self, op: Op, answer: Answer, now_ms: int) -> None:
        raise NotImplementedError

    def push(self, push: Push, now_ms: int) -> None:
        pass

    def keep_on_reconnect(self, op: Op) -> bool:
        return True

    def reattach(self, now_ms: int) -> None:
        pass

    def abandoned(self, op: Op) -> None:
        pass


class Phase(Enum):
    RESERVING = "reserving"
    TALKING = "talking"
    ENDING = "ending"  # hung up: the release is due, or sent
    DONE = "done"


@dataclass(slots=True)
class DialerCall:
    call_id: str
    account_id: str
    destination: str
    requested_seconds: int
    plan_seconds: int  # how long the conversation would go on if allowed
    overrun_seconds: int  # talks this far past its grant (a misbehaving dialer)
    silent_ms: int  # goes silent: no renewals, and the release only this long after hang-up
    reserved_at_ms: int  # when the Reserve was first sent
    phase: Phase = Phase.RESERVING
    answered_at_ms: int = 0
    allowed_seconds: int = 0
    final: bool = False
    validity_seconds: int = 0
    sequence: int = 0
    renew_op: int | None = None
    renewed_at_ms: int = 0
    reported_seconds: int = 0
    hangup_seconds: int = 0
    release_at_ms: int = 0
    release_op: int | None = None
    counted: dict[str, int] = field(default_factory=dict)

    def talked(self, now_ms: int) -> int:
        return max(0, (now_ms - self.answered_at_ms) // 1000)

    def end_seconds(self) -> int:
        """Where the call stops: its plan, or its grant (plus any overrun)."""
        return min(self.plan_seconds, self.allowed_seconds + self.overrun_seconds)

    def take(self, grant: Grant) -> None:
        """A grant arrived. Grants only grow; a stale copy (a repeat's first answer)
        must not shrink what a later one gave."""
        if grant.allowed_seconds >= self.allowed_seconds:
            self.allowed_seconds = grant.allowed_seconds
            self.final = grant.final
        self.validity_seconds = grant.validity_seconds


class Dialer(Client):
    """A dialer process: many calls over one stream, renewing and releasing them."""

    def __init__(
        self,
        name: str,
        rng: random.Random,
        network: Network,
        next_op_id: Callable[[], int],
        accounts: Sequence[str],
        destinations: Sequence[str],
    ) -> None:
        super().__init__(name, rng, network, next_op_id)
        self.accounts = list(accounts)
        self.destinations = list(destinations)
        self.calls: dict[str, DialerCall] = {}
        self.started = 0
        self.p_new_call = rng.uniform(0.15, 0.45)

    # -- acting

    def act(self, now_ms: int) -> None:
        self.give_up(now_ms)
        if len(self.calls) < MAX_CALLS_PER_DIALER and self.rng.random() < self.p_new_call:
            self._new_call(now_ms)
        recent = [c for c in self.calls.values() if now_ms - c.reserved_at_ms <= GIVE_UP_MS]
        if recent and self.rng.random() < 0.005:
            # A buggy dialer reuses a call id for another destination: CALL_ID_CONFLICT
            # (or, if the first Reserve never made it, the call; the first then conflicts).
            # Only a recent id: the server must still know it (no reuse after the window).
            call = self.rng.choice(recent)
            request = ReserveRequest(call.call_id, call.account_id, "999", call.requested_seconds)
            self.send(request, now_ms)
        for call in list(self.calls.values()):
            if call.phase is Phase.TALKING:
                self._talk(call, now_ms)
            if (
                call.phase is Phase.ENDING
                and call.release_op is None
                and now_ms >= call.release_at_ms
            ):
                self._release(call, now_ms)
            if call.phase is Phase.DONE:
                del self.calls[call.call_id]

    def _new_call(self, now_ms: int) -> None:
        rng = self.rng
        self.started += 1
        call = DialerCall(
            call_id=f"{self.name}-c{self.started}",
            account_id=rng.choice(self.accounts),
            destination=rng.choice(self.destinations),
            requested_seconds=rng.choice((0, 0, 0, 15, 30, 60, 120, 300, 900)),
            plan_seconds=0 if rng.random() < 0.08 else rng.randint(1, rng.choice((30, 120, 400))),
            overrun_seconds=rng.randint(1, 90) if rng.random() < 0.06 else 0,
            silent_ms=rng.randint(5_000, 900_000) if rng.random() < 0.08 else 0,
            reserved_at_ms=now_ms,
        )
        if rng.random() < 0.01:  # outside docs/design.md's input limits: INVALID_ARGUMENT
            call.destination = rng.choice(("84-90", "", "+" + "9" * 33))
            call.requested_seconds = rng.choice((call.requested_seconds, 86_401))
        self.calls[call.call_id] = call
        self.send(
            ReserveRequest(call.call_id, call.account_id, call.destination, call.requested_seconds),
            now_ms,
        )

    def _talk(self, call: DialerCall, now_ms: int) -> None:
        talked = call.talked(now_ms)
        end = call.end_seconds()
        if talked >= end:
            self._hang_up(call, end, now_ms)
            return
        if call.silent_ms or call.renew_op is not None:
            return
        due_ms = call.renewed_at_ms + call.validity_seconds * 1000 // 4
        running_out = not call.final and call.allowed_seconds - talked <= RENEW_MARGIN_SECONDS
        if now_ms >= due_ms or running_out:
            self._renew(call, talked, now_ms)

    def _renew(self, call: DialerCall, used_seconds: int, now_ms: int) -> None:
        call.sequence += 1
        call.reported_seconds = max(call.reported_seconds, used_seconds)
        call.renewed_at_ms = now_ms
        op = self.send(
            RenewRequest(
                call.call_id, call.sequence, call.reported_seconds, call.requested_seconds
            ),
            now_ms,
        )
        call.renew_op = op.op_id

    def _hang_up(self, call: DialerCall, seconds: int, now_ms: int) -> None:
        call.phase = Phase.ENDING
        # A release never reports less than a renewal did (that is INVALID_ARGUMENT).
        call.hangup_seconds = max(seconds, call.reported_seconds)
        call.release_at_ms = now_ms + call.silent_ms
        if call.renew_op is not None:
            self.pending.pop(call.renew_op, None)  # its answer no longer matters
            call.renew_op = None

    def _release(self, call: DialerCall, now_ms: int) -> None:
        op = self.send(ReleaseRequest(call.call_id, call.hangup_seconds), now_ms)
        call.release_op = op.op_id

    # -- answers

    def handle(self, op: Op, answer: Answer, now_ms: int) -> None:
        request = op.request
        if isinstance(request, ReserveRequest | RenewRequest | ReleaseRequest):
            call = self.calls.get(request.call_id)
            if call is None:
                return
            if isinstance(request, ReserveRequest):
                if request.destination == call.destination:  # not the buggy reuse above
                    self._reserved(call, answer, now_ms)
            elif isinstance(request, RenewRequest):
                self._renewed(call, op, answer, now_ms)
            else:
                call.phase = Phase.DONE

    def _reserved(self, call: DialerCall, answer: Answer, now_ms: int) -> None:
        if call.phase is not Phase.RESERVING:
            return
        if isinstance(answer, GrantResult):
            call.phase = Phase.TALKING
            call.answered_at_ms = call.renewed_at_ms = now_ms
            call.take(answer.grant)
        elif isinstance(answer, Refused) and answer.reason is Reason.CALL_ALREADY_ENDED:
            # It was reserved (the answer got lost) and expired before we heard: report
            # that it never talked, so the expiry charge is refunded.
            call.phase = Phase.ENDING
            call.hangup_seconds = 0
            call.release_at_ms = now_ms
        else:
            call.phase = Phase.DONE

    def _renewed(self, call: DialerCall, op: Op, answer: Answer, now_ms: int) -> None:
        if call.renew_op == op.op_id:
            call.renew_op = None
        if call.phase is not Phase.TALKING or call.silent_ms:
            return
        if isinstance(answer, GrantResult):
            call.take(answer.grant)
        elif isinstance(answer, Refused) and answer.reason is Reason.CALL_ALREADY_ENDED:
            self._hang_up(call, min(call.talked(now_ms), call.end_seconds()), now_ms)
        elif isinstance(answer, Refused) and answer.reason is Reason.CALL_NOT_FOUND:
            call.phase = Phase.DONE

    def push(self, push: Push, now_ms: int) -> None:
        call = self.calls.get(push.call_id)
        if call is None or call.phase is not Phase.TALKING or call.silent_ms:
            return
        if isinstance(push, GrantPush):
            call.take(push.grant)
        elif isinstance(push, Termination):
            self._hang_up(call, min(call.talked(now_ms), call.end_seconds()), now_ms)

    # -- reconnects

    def keep_on_reconnect(self, op: Op) -> bool:
        if isinstance(op.request, RenewRequest):
            call = self.calls.get(op.request.call_id)
            if call is not None and call.renew_op == op.op_id:
                call.renew_op = None
            return False  # replaced by a fresh Renew (below)
        return True

    def reattach(self, now_ms: int) -> None:
        """Every open call renews at once on the new stream, so pushes follow it."""
        for call in self.calls.values():
            if call.phase is Phase.TALKING and not call.silent_ms and call.renew_op is None:
                talked = min(call.talked(now_ms), call.end_seconds())
                self._renew(call, talked, now_ms)

    def abandoned(self, op: Op) -> None:
        request = op.request
        if isinstance(request, ReserveRequest | ReleaseRequest):
            call = self.calls.get(request.call_id)
            if call is not None:
                call.phase = Phase.DONE
        elif isinstance(request, RenewRequest):
            call = self.calls.get(request.call_id)
            if call is not None and call.renew_op == op.op_id:
                call.renew_op = None


@dataclass(slots=True)
class _MoneyOp:
    command: TopUp | Adjust
    born_ms: int


class Operator(Client):
    """The admin client: top-ups, adjustments, suspensions, limits, tariffs, reads."""

    def __init__(
        self,
        name: str,
        rng: random.Random,
        network: Network,
        next_op_id: Callable[[], int],
        accounts: Sequence[str],
        closable: str,
        tariffs: Sequence[Tariff],
    ) -> None:
        super().__init__(name, rng, network, next_op_id)
        self.accounts = list(accounts)
        self.closable = closable
        self.tariffs = list(tariffs)
        self.recent: list[_MoneyOp] = []
        self.suspended: list[str] = []  # by this operator, to be resumed soon
        self.keys = 0

    def _key(self) -> str:
        self.keys += 1
        return f"{self.name}-k{self.keys}"

    def act(self, now_ms: int) -> None:
        rng = self.rng
        self.give_up(now_ms)
        self.recent = [m for m in self.recent if now_ms - m.born_ms < GIVE_UP_MS // 2]
        account = rng.choice(self.accounts)
        roll = rng.random()
        if self.suspended and roll < 0.15:  # suspensions are short: resume one
            account = self.suspended.pop(rng.randrange(len(self.suspended)))
            self._update(UpdateAccount(account, status=AccountStatus.ACTIVE), now_ms)
        elif roll < 0.45:
            amount = rng.randint(1, rng.choice((50, 300, 1_500)))
            self._money(TopUp(account, amount, self._key(), f"ref-{self.keys}"), now_ms)
        elif roll < 0.55:
            amount = rng.randint(0, 3_000) * rng.choice((1, -1))  # 0: INVALID_ARGUMENT
            self._money(Adjust(account, amount, self._key(), "adjust"), now_ms)
        elif roll < 0.65 and self.recent:
            old = rng.choice(self.recent)  # a retry: the same request again
            self.send(AdminRequest(old.command), now_ms, born_ms=old.born_ms)
        elif roll < 0.68 and self.recent:
            old = rng.choice(self.recent)  # the same key with another amount
            other = old.command.amount + rng.choice((1, 7, 100))
            if isinstance(old.command, TopUp):
                changed: TopUp | Adjust = TopUp(
                    old.command.account_id, other, old.command.idempotency_key, "ref-x"
                )
            else:
                changed = Adjust(
                    old.command.account_id, other or 1, old.command.idempotency_key, "adjust"
                )
            self.send(AdminRequest(changed), now_ms, born_ms=old.born_ms)
        elif roll < 0.73:
            if account != self.closable and account not in self.suspended:
                self.suspended.append(account)
            self._update(UpdateAccount(account, status=AccountStatus.SUSPENDED), now_ms)
        elif roll < 0.80:
            limit = rng.choice((0, 0, rng.randint(1, 500), rng.randint(500, 5_000)))
            self._update(UpdateAccount(account, credit_limit=limit), now_ms)
        elif roll < 0.83:
            cap = rng.choice((0, 0, 2, 5, 10))
            self._update(UpdateAccount(account, max_concurrent_calls=cap), now_ms)
        elif roll < 0.86:
            tariff = rng.choice(self.tariffs)
            rates = tuple(random_rate(rng, r.prefix) for r in tariff.rates)
            self.send(
                AdminRequest(PutTariff(Tariff(tariff.tariff_id, tariff.currency, rates))), now_ms
            )
        elif roll < 0.87:
            # Closing takes a suspension first (no new calls), then tries until the
            # account's calls are gone (ACCOUNT_HAS_OPEN_CALLS until then).
            if self.closable in self.suspended:
                self.suspended.remove(self.closable)
            self._update(UpdateAccount(self.closable, status=AccountStatus.SUSPENDED), now_ms)
            self._update(UpdateAccount(self.closable, status=AccountStatus.CLOSED), now_ms)
        else:
            self.send(ReadAccount(account), now_ms)

    def _update(self, command: UpdateAccount, now_ms: int) -> None:
        self.send(AdminRequest(command), now_ms)

    def _money(self, command: TopUp | Adjust, now_ms: int) -> None:
        self.recent.append(_MoneyOp(command, now_ms))
        self.send(AdminRequest(command), now_ms)

    def handle(self, op: Op, answer: Answer, now_ms: int) -> None:
        pass  # the auditor judges the answers; the operator only stops waiting


def random_rate(rng: random.Random, prefix: str) -> Rate:
    """A rate from free to a few units a second, with the increments dialers meet."""
    price = rng.choice((0, rng.randint(1, 30_000_000), rng.randint(30_000_000, 400_000_000)))
    return Rate(
        prefix=prefix,
        price_per_minute_micros=price if rng.random() < 0.95 else 0,
        first_increment_seconds=rng.choice((1, 1, 6, 30, 60)),
        next_increment_seconds=rng.choice((1, 1, 6, 30, 60)),
        connect_fee=rng.choice((0, 0, 0, rng.randint(1, 40))),
    )
