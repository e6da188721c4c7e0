"""Hot standby on PostgreSQL: the I/O shell around lease.py's decisions.

One `HotStandby` per `--ha` server. It starts as a standby: it tails the journal
(new records after the last applied seq, every `TAIL_POLL_SECONDS`, at most
`MAX_TAIL_RECORDS` per read) into the server's state machine, and looks at the
lease row. When the lease has expired (the database's clock) it ends the old
primary's PostgreSQL sessions (a paused primary's locks go with them), takes the
lease at the next epoch, fences the journal with that epoch, catches up the tail
(the take is ordered after any commit of the old primary), starts the writer,
journals `Takeover` (open calls' validity restarts now) and only then serves.

As primary it renews the lease every `--lease-renew-seconds`. It steps down, for
good, when a renewal is refused, when the lease runs out on its own clock
(lease.py), or when the writer fails (the journal refused or lost a commit): the
writer fails stop, every RPC is refused NOT_PRIMARY, health is NOT_SERVING, and
`deposed` is set (the process then exits; restarted, it comes back as a standby).

`PrimaryGate` is the one place RPCs are refused while this server is not the
primary: an interceptor, so no servicer needs to know about the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from callcredit_server.auth import OPEN_SERVICES, Continuation, refusing
from callcredit_server.core import StateMachine, Takeover
from callcredit_server.errors import not_primary
from callcredit_server.journal import Journal, JournalError
from callcredit_server.lease import Action, Lease, LeaseRow, Role
from callcredit_server.recovery import apply_record
from callcredit_server.writer import Writer

log = logging.getLogger(__name__)

__all__ = [
    "MAX_TAIL_RECORDS",
    "TAIL_POLL_SECONDS",
    "Deposed",
    "HotStandby",
    "PrimaryGate",
    "new_owner",
]

TAIL_POLL_SECONDS = 0.1  # a standby reads new journal records this often (at once while behind)
MAX_TAIL_RECORDS = 10_000  # records read and applied per poll: the event loop stays responsive
PRIMARY_POLL_SECONDS = 0.05  # the primary looks at its lease's clock this often
GIVE_UP_TIMEOUT_SECONDS = 1.0  # a deposed primary tries this long to free the lease for a standby


class Deposed(Exception):
    """This server lost the lease: it must not answer anything any more."""


def new_owner() -> str:
    """A server's owner id for one run: names its lease and its PostgreSQL sessions."""
    return uuid.uuid4().hex


class PrimaryGate(grpc.aio.ServerInterceptor):
    """Refuses every RPC but health and reflection while this server is not primary:
    UNAVAILABLE, ErrorInfo reason NOT_PRIMARY, metadata["primary"] = where it is."""

    def __init__(self) -> None:
        self.open = False
        self.primary = ""  # the primary's advertised address, when known

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or self.open:
            return handler
        method: str = handler_call_details.method
        if method.split("/")[1] in OPEN_SERVICES:
            return handler
        return refusing(handler, not_primary(self.primary))


class HotStandby:
    """Tails, takes over, renews, steps down: see the module docstring."""

    def __init__(
        self,
        lease: Lease,
        journal: Journal,
        machine: StateMachine,
        writer: Writer,
        gate: PrimaryGate,
        *,
        advertise: str,
        applied_seq: int,
        set_serving: Callable[[bool], Awaitable[None]],
        clock_ms: Callable[[], int] = lambda: time.monotonic_ns() // 1_000_000,
    ) -> None:
        self.lease = lease
        self._journal = journal
        self._machine = machine
        self._writer = writer
        self._gate = gate
        self._advertise = advertise
        self.applied_seq = applied_seq  # the last journal record applied to the machine
        self._set_serving = set_serving
        self._clock_ms = clock_ms
        # Lease statements run on their own thread: a commit stuck in the database
        # must not delay a renewal, and a renewal stuck must not delay the clock check.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lease")
        self._writer_failure: BaseException | None = None
        # The takeover's phases as (name, time.monotonic() at its end), for its log line.
        self._phases: list[tuple[str, float]] = []
        self.deposed = asyncio.Event()
        writer.on_failure(self._on_writer_failure)

    async def run(self) -> None:
        """Standby until the lease is ours, then primary until it is lost."""
        try:
            await self._until_primary()
            # Renewals start with the lease, not after the takeover's work: catching up
            # and the first commit must not eat the lease they run under.
            tasks = [asyncio.ensure_future(self._hold()), asyncio.ensure_future(self._take_over())]
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a broken takeover or state: never serve from it
            log.critical("hot standby stopped: %r", exc, exc_info=exc)
            await self._step_down(exc)

    async def stopped(self) -> None:
        """The server stopped (run() cancelled, the writer flushed): a primary gives
        the lease up, so that a standby takes over at once instead of at its expiry."""
        if self.lease.role is Role.PRIMARY:
            self.lease.resign()
            await self._give_up()
        self._thread.shutdown(wait=False)

    # ---------------------------------------------------------------- standby

    async def _until_primary(self) -> None:
        next_look_ms = 0
        behind: tuple[float, int] | None = None  # (since, from seq) while reading full pages
        while True:
            try:
                applied = await self._tail()
            except JournalError as exc:  # the database is away: a standby just waits
                log.warning("standby: cannot read the journal: %s", exc)
                applied = 0
            if applied == MAX_TAIL_RECORDS:
                behind = behind or (time.monotonic(), self.applied_seq - MAX_TAIL_RECORDS)
            elif behind is not None:
                since, from_seq = behind
                log.info(
                    "standby caught up: %d records applied in %.2f s, at seq %d",
                    self.applied_seq - from_seq,
                    time.monotonic() - since,
                    self.applied_seq,
                )
                behind = None
            now_ms = self._clock_ms()
            if now_ms >= next_look_ms:
                row = await self._lease_call(self._journal.lease)
                if isinstance(row, BaseException):
                    log.warning("standby: cannot read the lease: %s", row)
                    next_look_ms = now_ms + self.lease.settings.renew_ms
                else:
                    action = self.lease.observe(row, now_ms)
                    self._gate.primary = self.lease.primary
                    if action is Action.TAKE and await self._try_take(row):
                        return
                    next_look_ms = now_ms + self.lease.standby_wait_ms(row)
            # Behind (a full read): read on at once; else wait for new records.
            await asyncio.sleep(0 if applied == MAX_TAIL_RECORDS else TAIL_POLL_SECONDS)

    async def _try_take(self, row: LeaseRow | None) -> bool:
        self._phases = [("expired", time.monotonic())]
        if row is not None and row.owner:
            # A paused primary may hold the lease row FOR SHARE mid-commit: end its
            # sessions first, or the take waits on it (lock_timeout) for ever.
            ended = await self._lease_call(self._journal.end_sessions, row.owner)
            if isinstance(ended, BaseException):
                log.warning("standby: cannot end the old primary's sessions: %s", ended)
                return False
            if ended:
                log.warning("ended %d sessions of the old primary %s", ended, row.owner)
            self._phases.append(("sessions ended", time.monotonic()))
        epoch = self.lease.next_epoch()
        sent_at_ms = self._clock_ms()
        taken = await self._lease_call(
            self._journal.take_lease,
            self.lease.owner,
            self._advertise,
            self.lease.epoch,
            epoch,
            self.lease.settings.lease_ms,
        )
        if isinstance(taken, BaseException):
            log.warning("standby: the take of epoch %d failed: %s", epoch, taken)
            return False
        if taken:
            self.lease.taken(epoch, sent_at_ms, self._advertise)
            self._phases.append(("lease taken", time.monotonic()))
        return bool(taken)

    async def _tail(self) -> int:
        """Apply the records committed after applied_seq (one bounded read)."""
        after = self.applied_seq
        records = await asyncio.to_thread(self._journal.tail, after, MAX_TAIL_RECORDS)
        machine = self._machine
        for seq, at_ms, command in records:
            apply_record(machine, seq, at_ms, command)
            self.applied_seq = seq
        return len(records)

    # ---------------------------------------------------------------- takeover

    async def _take_over(self) -> None:
        phases = self._phases
        epoch = self.lease.epoch
        self._journal.fence(epoch)
        # Nothing can commit under the old epoch any more: what is in the journal now
        # is everything the old primary acknowledged.
        while await self._tail() == MAX_TAIL_RECORDS:
            pass
        phases.append(("caught up", time.monotonic()))
        # No audit() here: O(accounts), 0.6-0.9 s at 1M accounts on the takeover's path.
        # The state was audited whole at this server's start (recovery.py), and every
        # record tailed since was applied with the per-step checks a primary applies it
        # with, so it is exactly as checked as the old primary's state was.
        self._writer.start(after_seq=self.applied_seq)
        # The writer's first command (queued before its tasks first run): open calls'
        # validity restarts now, before any tick could expire them.
        result = await self._writer.execute([Takeover(epoch=epoch)])
        phases.append(("Takeover committed", time.monotonic()))
        if not self.lease.serving(self._clock_ms()):
            raise Deposed(f"the lease of epoch {epoch} ran out during the takeover")
        self._gate.primary = self._advertise
        self._gate.open = True
        await self._set_serving(True)
        phases.append(("serving", time.monotonic()))
        log.warning(
            "primary at epoch %d from seq %d in %.3f s from the lease's expiry (%s): %s",
            epoch,
            self.applied_seq,
            phases[-1][1] - phases[0][1],
            ", ".join(
                f"{name} +{(at - before) * 1000:.0f} ms"
                for (name, at), (_, before) in zip(phases[1:], phases, strict=False)
            ),
            result[0],
            extra={"epoch": epoch, "seq": self.applied_seq},
        )

    # ---------------------------------------------------------------- primary

    async def _hold(self) -> None:
        lease = self.lease
        while True:
            if self._writer_failure is not None:
                raise self._writer_failure
            now_ms = self._clock_ms()
            action = lease.due(now_ms)
            if action is Action.STEP_DOWN:
                raise Deposed(f"the lease of epoch {lease.epoch} ran out before a renewal")
            if action is Action.RENEW:
                renewal = asyncio.ensure_future(self._renew(now_ms))
                # Wait no longer than the lease lasts: a renewal stuck in the network
                # must not keep this server answering past its lease.
                done, _ = await asyncio.wait(
                    [renewal], timeout=max(lease.valid_for_ms(now_ms), 1) / 1000
                )
                if not done:
                    renewal.cancel()
                    continue
                if renewal.result() is Action.STEP_DOWN:
                    raise Deposed(f"the lease of epoch {lease.epoch} was taken by another server")
            await asyncio.sleep(PRIMARY_POLL_SECONDS)

    async def _renew(self, sent_at_ms: int) -> Action:
        lease = self.lease
        renewed = await self._lease_call(
            self._journal.renew_lease, lease.owner, lease.epoch, lease.settings.lease_ms
        )
        if isinstance(renewed, BaseException):
            log.warning("cannot renew the lease: %s", renewed)
            return lease.renewal_failed(self._clock_ms())
        return lease.renewed(bool(renewed), sent_at_ms)

    def _on_writer_failure(self, exc: BaseException) -> None:
        self._writer_failure = exc

    async def _step_down(self, why: BaseException) -> None:
        was_primary = self.lease.role is Role.PRIMARY
        self.lease.resign()
        self._gate.open = False
        self._gate.primary = ""
        self._writer.fail(Deposed(f"no longer primary: {why}"))
        await self._set_serving(False)
        if was_primary:
            await self._give_up()
        log.critical("deposed: %s; this server answers nothing more", why)
        self.deposed.set()

    async def _give_up(self) -> None:
        """Best effort: a standby may take over at once instead of at the lease's end."""
        lease = self.lease
        with contextlib.suppress(TimeoutError):
            outcome = await asyncio.wait_for(
                self._lease_call(self._journal.give_up_lease, lease.owner, lease.epoch),
                GIVE_UP_TIMEOUT_SECONDS,
            )
            if isinstance(outcome, BaseException):
                log.warning("could not give the lease up: %s", outcome)

    async def _lease_call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run a journal statement on the lease thread; its JournalError as a value."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, function, *args)
        except JournalError as exc:
            return exc
