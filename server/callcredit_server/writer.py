"""The single writer: one asyncio task owns the state machine; one commits the journal.

Servicers hand work to `Writer` through a bounded queue and await the answer.
The apply task takes everything queued (up to a bound), applies it to the state
machine in order at one instant, and appends the journal records of the
commands that changed state. The commit task writes all records gathered so far
in ONE transaction (group commit) on a dedicated thread while the apply task
goes on with the next round. An answer, push or read is released only once the
journal holds every record up to the point where it was produced: nothing
leaves the server that a crash could take back.

If the journal cannot be written, or the state machine reports a broken
invariant, the writer fails: every waiting and later request gets
`Unavailable`, and the server must be restarted (it then rebuilds from the
journal, which holds exactly what was acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

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
    Tick,
)
from callcredit_server.core.outcomes import AccessReason
from callcredit_server.journal import Journal, JournalRecord
from callcredit_server.snapshot import discard_older, fork_snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_QUEUED_SUBMISSIONS = 10_000  # submissions waiting for the apply task
MAX_SUBMISSIONS_PER_ROUND = 1_024  # applied at one instant before yielding
MAX_RECORDS_PER_COMMIT = 20_000  # journal records in one transaction
MAX_UNCOMMITTED_RECORDS = 100_000  # the apply task waits for the journal beyond this
# A commit that has not returned in this long is a failed journal (a stalled
# network, a hung disk): fail-stop rather than hold every answer indefinitely.
COMMIT_TIMEOUT_S = 5.0


_CALL_COMMANDS = (Reserve, Renew, Release)  # the commands that name a call


class Unavailable(Exception):
    """The writer cannot take work: the journal failed, or the server is stopping."""


@dataclass(frozen=True, slots=True)
class SnapshotPolicy:
    """Write a snapshot to `directory` every `every_records` journal records."""

    directory: Path
    every_records: int


AccountFilter = Callable[[str], bool]
"""May a submission act on this account id? (a dialer token's tenant, auth.py)"""


class WriterObserver(Protocol):
    """Metrics of the writer (metrics.py): called on the event loop, once per commit."""

    def committed(self, records: int, seconds: float) -> None: ...

    def snapshot_paused(self, seconds: float) -> None: ...


@dataclass(frozen=True, slots=True)
class WriterGauges:
    """The writer's levels at one instant, sampled for metrics (Writer.gauges)."""

    queued_submissions: int
    uncommitted_records: int
    accounts: int
    open_calls: int
    open_calls_without_stream: int
    failed: bool


class PushTarget(Protocol):
    """A dialer stream that can be told about its calls."""

    def push(self, push: Push) -> None: ...


@dataclass(slots=True)
class _Submission:
    commands: Sequence[Command]
    read: Callable[[StateMachine], Any] | None
    target: PushTarget | None
    future: asyncio.Future[Any]
    allows: AccountFilter | None = None


@dataclass(slots=True)
class _Waiting:
    """Something to release once the journal is durable up to `seq`."""

    seq: int
    future: asyncio.Future[Any] | None = None
    result: Any = None
    pushes: list[tuple[PushTarget, Push]] = field(default_factory=list)


class Writer:
    """Owns the state machine; serialises every change and read through one queue."""

    def __init__(
        self,
        machine: StateMachine,
        journal: Journal,
        *,
        clock_ms: Callable[[], int],
        retention_ms: int,
        tick_interval_s: float = 0.25,
        snapshots: SnapshotPolicy | None = None,
        snapshot_seq: int = 0,
    ) -> None:
        self._machine = machine
        self._journal = journal
        self._clock_ms = clock_ms
        self._retention_ms = retention_ms
        self._tick_interval_s = tick_interval_s
        self._queue: asyncio.Queue[_Submission] = asyncio.Queue(MAX_QUEUED_SUBMISSIONS)
        self._records: list[JournalRecord] = []
        self._waiting: deque[_Waiting] = deque()
        self._next_seq = journal.last_seq() + 1
        self._durable_seq = self._next_seq - 1
        self._wake_committer = asyncio.Event()
        self._committed = asyncio.Event()
        self._routes: dict[str, PushTarget] = {}
        self._failure: BaseException | None = None
        self._commit_timed_out = False
        self._failure_listeners: list[Callable[[BaseException], None]] = []
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._tasks: list[asyncio.Task[None]] = []
        self._snapshots = snapshots
        self._snapshot_seq = snapshot_seq  # the newest snapshot taken (or recovered from)
        self._snapshot_child: asyncio.Task[None] | None = None
        self.snapshot_stall_s_max = 0.0  # the longest pause a snapshot caused the writer
        self.observer: WriterObserver | None = None  # metrics, set by app.py

    # ------------------------------------------------------------ lifecycle

    def start(self, after_seq: int | None = None) -> None:
        """Start taking work; `after_seq`: the machine was brought to this journal seq
        after the writer was made (a hot standby taking over, standby.py)."""
        if after_seq is not None:
            self._next_seq = after_seq + 1
            self._durable_seq = after_seq
        self._tasks = [
            asyncio.create_task(self._apply_loop(), name="writer-apply"),
            asyncio.create_task(self._commit_loop(), name="writer-commit"),
            asyncio.create_task(self._tick_loop(), name="writer-tick"),
        ]

    async def stop(self) -> None:
        """Finish what was queued, make it durable, then stop."""
        if self._failure is None and self._tasks:
            with contextlib.suppress(Unavailable):
                await self.read(lambda _: None)  # a barrier behind everything queued
        self._fail(Unavailable("server stopping"), log_it=False)
        await self.wait_for_snapshot()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # A commit stuck in the database must not hold the shutdown too.
        self._thread.shutdown(wait=not self._commit_timed_out)

    def on_failure(self, listener: Callable[[BaseException], None]) -> None:
        self._failure_listeners.append(listener)

    def fail(self, exc: BaseException) -> None:
        """Stop taking work now (a deposed primary): every waiter gets Unavailable."""
        self._fail(exc)

    @property
    def failed(self) -> bool:
        return self._failure is not None

    # ---------------------------------------------------------------- intake

    async def submit(
        self,
        commands: Sequence[Command],
        target: PushTarget | None = None,
        allows: AccountFilter | None = None,
    ) -> asyncio.Future[list[Outcome]]:
        """Queue commands in order; the future gives their outcomes once durable.

        With `allows`, a Renew or Release of a call on an account it refuses is
        answered PERMISSION_DENIED and never reaches the state machine.
        """
        submission = _Submission(commands, None, target, self._new_future(), allows)
        return await self._enqueue(submission)

    async def execute(
        self,
        commands: Sequence[Command],
        target: PushTarget | None = None,
        allows: AccountFilter | None = None,
    ) -> list[Outcome]:
        return await (await self.submit(commands, target, allows))

    async def read(self, read: Callable[[StateMachine], T]) -> T:
        """Run `read` on the writer's turn; answer once the journal covers what it saw."""
        future = await self._enqueue(_Submission((), read, None, self._new_future()))
        result: T = await future
        return result

    def forget(self, target: PushTarget) -> None:
        """A stream closed: its calls stay open, but nothing is pushed to it any more."""
        for call_id in [c for c, t in self._routes.items() if t is target]:
            del self._routes[call_id]

    def _new_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, submission: _Submission) -> asyncio.Future[Any]:
        if self._failure is not None:
            raise Unavailable(str(self._failure))
        await self._queue.put(submission)
        return submission.future

    # ------------------------------------------------------------ apply task

    async def _apply_loop(self) -> None:
        try:
            while True:
                batch = [await self._queue.get()]
                while len(batch) < MAX_SUBMISSIONS_PER_ROUND and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                while len(self._records) >= MAX_UNCOMMITTED_RECORDS:
                    self._committed.clear()
                    await self._committed.wait()
                self._apply_round(batch)
                self._wake_committer.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # an invariant broke: stop taking work
            self._fail(exc)

    def _apply_round(self, batch: list[_Submission]) -> None:
        now_ms = max(self._clock_ms(), self._machine.now_ms)
        for submission in batch:
            if submission.future.done():  # the caller went away
                continue
            if submission.read is not None:
                seen = submission.read(self._machine)
                self._hold(_Waiting(self._next_seq - 1, submission.future, seen))
                continue
            pushes: list[tuple[PushTarget, Push]] = []
            outcomes = self._apply_commands(
                submission.commands, now_ms, submission.target, pushes, submission.allows
            )
            self._hold(_Waiting(self._next_seq - 1, submission.future, outcomes, pushes))

    def _out_of_scope(self, command: Command, allows: AccountFilter) -> Refused | None:
        """The tenant guard: Renew and Release name only a call; its account must be allowed.

        Checked before the state machine (nothing changes, no expiry runs, and the call
        is not routed to the refused stream). Reserve names its account: the servicer
        checks it. A call memory no longer holds is left to the machine (CALL_NOT_FOUND).
        """
        if isinstance(command, Renew | Release):
            call = self._machine.calls.get(command.call_id)
            if call is not None and not allows(call.account_id):
                return Refused(
                    AccessReason.PERMISSION_DENIED,
                    f"call {command.call_id!r} is on an account outside this token's tenant",
                )
        return None

    def _apply_commands(
        self,
        commands: Sequence[Command],
        now_ms: int,
        target: PushTarget | None,
        pushes: list[tuple[PushTarget, Push]],
        allows: AccountFilter | None,
    ) -> list[Outcome]:
        """Apply commands in order; journal the ones that changed state; route pushes.

        The hot loop of the server: a batched Control message runs it once per
        operation, so names are bound to locals once.
        """
        apply = self._machine.apply
        calls = self._machine.calls
        records = self._records
        routes = self._routes
        seq = self._next_seq
        outcomes: list[Outcome] = []
        try:
            for command in commands:
                if allows is not None:
                    denied = self._out_of_scope(command, allows)
                    if denied is not None:
                        outcomes.append(denied)
                        continue
                step = apply(command, now_ms)
                if step.changed:
                    records.append(JournalRecord(seq, now_ms, command, step.entries, step.calls))
                    seq += 1
                if target is not None and isinstance(command, _CALL_COMMANDS):
                    call_id = command.call_id
                    call = calls.get(call_id)
                    if call is not None and call.state is CallState.ACTIVE:
                        routes[call_id] = target  # pushes follow the stream that last spoke
                for push in step.pushes:
                    routed = routes.get(push.call_id)
                    if routed is not None:
                        pushes.append((routed, push))
                for record in step.calls:
                    if record.state is not CallState.ACTIVE:
                        routes.pop(record.call_id, None)
                outcomes.append(step.outcome)
        finally:
            self._next_seq = seq  # even if a step broke an invariant (then we fail)
        return outcomes

    def _hold(self, waiting: _Waiting) -> None:
        if waiting.seq <= self._durable_seq:
            self._release(waiting)
        else:
            self._waiting.append(waiting)

    # ----------------------------------------------------------- commit task

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake_committer.wait()
                self._wake_committer.clear()
                while self._records:
                    records = self._records[:MAX_RECORDS_PER_COMMIT]
                    del self._records[:MAX_RECORDS_PER_COMMIT]
                    started = time.perf_counter()
                    commit = loop.run_in_executor(self._thread, self._journal.append, records)
                    try:
                        await asyncio.wait_for(commit, COMMIT_TIMEOUT_S)
                    except TimeoutError as exc:
                        self._commit_timed_out = True
                        raise Unavailable(
                            f"a journal commit took over {COMMIT_TIMEOUT_S:.0f} s"
                        ) from exc
                    self._durable_seq = records[-1].seq
                    if self.observer is not None:
                        self.observer.committed(len(records), time.perf_counter() - started)
                    self._committed.set()
                    self._release_durable()
                    self._maybe_snapshot()
                self._release_durable()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the journal failed: fail-stop
            self._fail(exc)

    def _release_durable(self) -> None:
        while self._waiting and self._waiting[0].seq <= self._durable_seq:
            self._release(self._waiting.popleft())

    def _release(self, waiting: _Waiting) -> None:
        if waiting.future is not None and not waiting.future.done():
            waiting.future.set_result(waiting.result)
        for target, push in waiting.pushes:
            target.push(push)

    # -------------------------------------------------------------- snapshots

    def _maybe_snapshot(self) -> None:
        """Fork a child to write the state once enough records have passed.

        Runs on the event loop between apply rounds, so the state is whole: it
        reflects every record up to next_seq - 1 (some maybe not durable yet; see
        snapshot.py for why that is safe). The fork is the only pause.
        """
        policy = self._snapshots
        if policy is None or self._snapshot_child is not None:
            return
        if self._durable_seq - self._snapshot_seq < policy.every_records:
            return
        seq = self._next_seq - 1
        started = time.perf_counter()
        pid = fork_snapshot(self._machine, seq, policy.directory, self._machine.now_ms)
        stall_s = time.perf_counter() - started
        self.snapshot_stall_s_max = max(self.snapshot_stall_s_max, stall_s)
        if self.observer is not None:
            self.observer.snapshot_paused(stall_s)
        log.info(
            "snapshot at seq %d: child %d started, writer paused %.1f ms", seq, pid, stall_s * 1e3
        )
        self._snapshot_seq = seq
        self._snapshot_child = asyncio.create_task(self._reap(pid, seq, policy.directory))

    async def _reap(self, pid: int, seq: int, directory: Path) -> None:
        try:
            _, status = await asyncio.to_thread(os.waitpid, pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code == 0:
                log.info("snapshot at seq %d written", seq)
                await asyncio.to_thread(discard_older, directory)
            else:
                how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
                log.error("snapshot at seq %d failed (child %s)", seq, how)
        finally:
            self._snapshot_child = None

    async def wait_for_snapshot(self) -> None:
        """Tests and tools: wait until the snapshot in progress, if any, is done."""
        if self._snapshot_child is not None:
            await asyncio.shield(self._snapshot_child)

    # ------------------------------------------------------------- tick task

    async def _tick_loop(self) -> None:
        """Let time pass: expire silent calls, forget what left the window."""
        tick = Tick(retention_ms=self._retention_ms)
        while True:
            await asyncio.sleep(self._tick_interval_s)
            with contextlib.suppress(Unavailable):  # one tick at a time, its answer awaited
                await self.execute([tick])

    # ---------------------------------------------------------------- gauges

    def gauges(self) -> WriterGauges:
        """Levels for metrics; call on the event loop (O(1): a scrape never stalls it)."""
        open_calls = self._machine.open_call_count
        return WriterGauges(
            queued_submissions=self._queue.qsize(),
            uncommitted_records=len(self._records),
            accounts=len(self._machine.accounts),
            open_calls=open_calls,
            open_calls_without_stream=max(open_calls - len(self._routes), 0),
            failed=self._failure is not None,
        )

    # --------------------------------------------------------------- failure

    def _fail(self, exc: BaseException, *, log_it: bool = True) -> None:
        if self._failure is not None:
            return
        self._failure = exc
        if log_it:
            log.critical("writer stopped taking work: %r", exc, exc_info=exc)
        error = Unavailable(f"journal unavailable: {exc}" if log_it else str(exc))
        while self._waiting:
            future = self._waiting.popleft().future
            if future is not None and not future.done():
                future.set_exception(error)
        while not self._queue.empty():
            future = self._queue.get_nowait().future
            if not future.done():
                future.set_exception(error)
        for listener in self._failure_listeners:
            listener(exc)
