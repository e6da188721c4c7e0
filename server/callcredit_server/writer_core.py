"""The single writer's decisions, without its I/O: what writer.py does, as plain values.

`WriterCore` owns the state machine and decides, for each round of submissions:

- the tenant guard: a Renew or Release of a call on an account the submission may not
  act on is refused PERMISSION_DENIED before the state machine sees it;
- the journal: a command that changed state becomes a `JournalRecord` with the next
  gap-free seq, gathered until the shell takes them for a commit;
- holding answers: an answer is kept with the seq of the last record that existed when
  it was produced, and handed back only once the shell reports that seq durable;
- push routing: a call's pushes go to the stream that last carried it, and only an
  operation that succeeded and leaves the call active routes it there (a refusal
  changes nothing, routing included); an ended call, or a closed stream, has no route.

It takes no asyncio, threads, futures, sockets or clock: time is an argument, streams
(`Target`) and answers (`Answer`) are opaque values the shell maps to its own objects
(writer.py: a Control stream's session, and a future with its result and pushes). The
deterministic simulator (tests/simulation/vopr.py) drives this same class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from callcredit_server.core import (
    CallState,
    Command,
    Outcome,
    Push,
    Refused,
    Release,
    Renew,
    Reserve,
    StateMachine,
    Step,
)
from callcredit_server.core.outcomes import AccessReason
from callcredit_server.journal import JournalRecord

Target = TypeVar("Target")  # where pushes go: a stream, opaque to the core
Answer = TypeVar("Answer")  # what is handed back once durable, opaque to the core

AccountFilter = Callable[[str], bool]
"""May a submission act on this account id? (a dialer token's tenant, auth.py)"""

_CALL_COMMANDS = (Reserve, Renew, Release)  # the commands that name a call
_new_tuple = tuple.__new__


class WriterCore(Generic[Target, Answer]):
    """Applies rounds to the state machine; keeps records, held answers and routes."""

    def __init__(self, machine: StateMachine, last_seq: int) -> None:
        """`last_seq`: the journal's last record, durable (what recovery replayed)."""
        self.machine = machine
        self.next_seq = last_seq + 1
        self.durable_seq = last_seq
        self.records: list[JournalRecord] = []  # applied, not yet taken for a commit
        self.routes: dict[str, Target] = {}  # call id -> the stream its pushes go to
        self._held: deque[tuple[int, Answer]] = deque()  # in seq order
        # The simulator's view of every step (its model checks each one); None in the server.
        self.on_step: Callable[[Command, Step], None] | None = None

    def round_time(self, clock_ms: int) -> int:
        """The instant a round is applied at: the clock, never behind the machine's time."""
        return max(clock_ms, self.machine.now_ms)

    # ----------------------------------------------------------------- apply

    def apply(
        self,
        commands: Sequence[Command],
        now_ms: int,
        target: Target | None = None,
        allows: AccountFilter | None = None,
    ) -> tuple[list[Outcome], list[tuple[Target, Push]]]:
        """Apply commands in order at `now_ms`: their outcomes, and the pushes routed.

        `target` is the stream that carried them (None: a unary call or an admin), which
        the calls they succeed on are routed to. With `allows`, the tenant guard runs.

        The hot loop of the server: a batched Control message runs it once per
        operation, so names are bound to locals once.
        """
        apply = self.machine.apply
        calls = self.machine.calls
        records = self.records
        routes = self.routes
        on_step = self.on_step
        seq = self.next_seq
        active = CallState.ACTIVE
        outcomes: list[Outcome] = []
        pushes: list[tuple[Target, Push]] = []
        try:
            for command in commands:
                if allows is not None:
                    denied = self._out_of_scope(command, allows)
                    if denied is not None:
                        outcomes.append(denied)
                        continue
                step = apply(command, now_ms)
                if on_step is not None:
                    on_step(command, step)
                outcome, changed, _, _, step_pushes, _, ended = step
                if changed:  # the record's fields in order, without NamedTuple's __new__
                    records.append(_new_tuple(JournalRecord, (seq, now_ms, command)))
                    seq += 1
                if (
                    target is not None
                    and outcome.__class__ is not Refused  # a refusal changes nothing
                    and isinstance(command, _CALL_COMMANDS)
                ):
                    call = calls.get(command.call_id)
                    if call is not None and call.state is active:
                        routes[command.call_id] = target  # pushes follow the stream that spoke
                for push in step_pushes:
                    routed = routes.get(push.call_id)
                    if routed is not None:
                        pushes.append((routed, push))
                for call_id in ended:
                    routes.pop(call_id, None)
                outcomes.append(outcome)
        finally:
            self.next_seq = seq  # even if a step broke an invariant (the shell then fails)
        return outcomes, pushes

    def _out_of_scope(self, command: Command, allows: AccountFilter) -> Refused | None:
        """The tenant guard: Renew and Release name only a call; its account must be allowed.

        Checked before the state machine (nothing changes, no expiry runs, and the call
        is not routed to the refused stream). Reserve names its account: the servicer
        checks it. A call memory no longer holds is left to the machine (CALL_NOT_FOUND).
        """
        if isinstance(command, Renew | Release):
            call = self.machine.calls.get(command.call_id)
            if call is not None and not allows(call.account_id):
                return Refused(
                    AccessReason.PERMISSION_DENIED,
                    f"call {command.call_id!r} is on an account outside this token's tenant",
                )
        return None

    def forget(self, target: Target) -> None:
        """A stream closed: its calls stay open, but nothing is routed to it any more."""
        routes = self.routes
        for call_id in [c for c, t in routes.items() if t is target]:
            del routes[call_id]

    # ---------------------------------------------------- journal and answers

    def take_records(self, limit: int) -> list[JournalRecord]:
        """Up to `limit` of the oldest records not yet taken: the next commit's."""
        taken = self.records[:limit]
        del self.records[:limit]
        return taken

    def hold(self, answer: Answer) -> bool:
        """Keep `answer` until every record that exists now is durable.

        True: they already are; the answer was not kept, and the caller releases it now.
        """
        seq = self.next_seq - 1
        if seq <= self.durable_seq:
            return True
        self._held.append((seq, answer))
        return False

    def durable(self, seq: int) -> list[Answer]:
        """The journal holds every record up to `seq`: the answers to release, in order."""
        if seq < self.durable_seq or seq >= self.next_seq:
            raise ValueError(
                f"durable up to {seq}: already {self.durable_seq}, applied {self.next_seq - 1}"
            )
        self.durable_seq = seq
        held = self._held
        released: list[Answer] = []
        while held and held[0][0] <= seq:
            released.append(held.popleft()[1])
        return released

    def drop_held(self) -> list[Answer]:
        """The writer failed: every held answer, never to be released (the shell fails them)."""
        dropped = [answer for _, answer in self._held]
        self._held.clear()
        return dropped
