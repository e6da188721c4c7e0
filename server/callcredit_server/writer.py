"""The single writer's I/O: one asyncio task applies rounds; one commits the journal.

Every decision is in `WriterCore` (writer_core.py: the tenant guard, journal seqs and
records, holding answers until durable, push routing); this shell only moves bytes
and futures. Servicers hand work to `Writer` through a bounded queue and await the
answer. The apply task takes everything queued (up to a bound) and has the core apply
it in order at one instant. The commit task writes all records gathered so far in
ONE transaction (group commit) on a dedicated thread while the apply task goes on
with the next round, then tells the core what is durable and resolves the futures
and pushes it hands back: nothing leaves the server that a crash could take back.
A tick task lets time pass. Snapshots are not the writer's: the projector takes them
(projector.py), so nothing here ever forks or pauses for one.

If the journal cannot be written, or the state machine reports a broken
invariant, the writer fails: every waiting and later request gets
`Unavailable`, and the server must be restarted (it then rebuilds from the
journal, which holds exactly what was acknowledged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from callcredit_server.core import Command, Outcome, Push, StateMachine, Tick
from callcredit_server.journal import Journal
from callcredit_server.writer_core import AccountFilter, WriterCore

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_QUEUED_SUBMISSIONS = 10_000  # submissions waiting for the apply task
MAX_SUBMISSIONS_PER_ROUND = 1_024  # applied at one instant before yielding
# ... and at most this many commands (one submission may hold 10,000): a round holds the
# event loop, and the room check before it (MAX_UNCOMMITTED_RECORDS) is passed by this.
MAX_COMMANDS_PER_ROUND = 20_000
MAX_RECORDS_PER_COMMIT = 20_000  # journal records in one transaction
MAX_UNCOMMITTED_RECORDS = 100_000  # the apply task waits for the journal beyond this
# A commit that has not returned in this long is a failed journal (a stalled
# network, a hung disk): fail-stop rather than hold every answer indefinitely.
COMMIT_TIMEOUT_SECONDS = 5.0
# After a commit, a WAL checkpoint (SQLite) starts on a thread of its own if none ran
# for this long: a checkpoint run by a commit itself (SQLite's wal_autocheckpoint)
# held every answer waiting for that commit, up to 636 ms measured.
CHECKPOINT_SECONDS = 0.2


class Unavailable(Exception):
    """The writer cannot take work: the journal failed, or the server is stopping."""


class WriterObserver(Protocol):
    """Metrics of the writer (metrics.py): called on the event loop, once per commit."""

    def committed(self, records: int, seconds: float) -> None: ...


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
class _Reply:
    """What the core holds until durable: a future's result, and the pushes to send."""

    future: asyncio.Future[Any]
    result: Any
    pushes: list[tuple[PushTarget, Push]]


class Writer:
    """Runs the writer core: serialises every change and read through one queue."""

    def __init__(
        self,
        machine: StateMachine,
        journal: Journal,
        *,
        clock_ms: Callable[[], int],
        retention_ms: int,
        tick_interval_seconds: float = 0.25,
    ) -> None:
        self._core: WriterCore[PushTarget, _Reply] = WriterCore(machine, journal.last_seq())
        self._journal = journal
        self._clock_ms = clock_ms
        self._retention_ms = retention_ms
        self._tick_interval_seconds = tick_interval_seconds
        self._queue: asyncio.Queue[_Submission] = asyncio.Queue(MAX_QUEUED_SUBMISSIONS)
        self._wake_committer = asyncio.Event()
        self._committed = asyncio.Event()
        self._failure: BaseException | None = None
        self._unavailable = Unavailable("")  # what every waiter gets once it failed
        self._commit_timed_out = False
        self._failure_listeners: list[Callable[[BaseException], None]] = []
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._checkpoint: Future[None] | None = None
        self._checkpoint_at = 0.0  # time.monotonic() when the last checkpoint started
        self._tasks: list[asyncio.Task[None]] = []
        self.observer: WriterObserver | None = None  # metrics, set by app.py
        # The changefeed (app.py): told the last seq of each batch once it is durable.
        self.on_durable: Callable[[int], None] | None = None

    # ------------------------------------------------------------ lifecycle

    def start(self, after_seq: int | None = None) -> None:
        """Start taking work; `after_seq`: the machine was brought to this journal seq
        after the writer was made (a hot standby taking over, standby.py)."""
        if after_seq is not None:
            self._core = WriterCore(self._core.machine, after_seq)
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
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # A commit stuck in the database must not hold the shutdown too.
        self._thread.shutdown(wait=not self._commit_timed_out)
        self._checkpointer.shutdown(wait=not self._commit_timed_out)

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
        self._core.forget(target)

    def _new_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _enqueue(self, submission: _Submission) -> asyncio.Future[Any]:
        if self._failure is not None:
            raise Unavailable(str(self._failure))
        await self._queue.put(submission)
        if self._failure is not None:  # it failed while this waited for room in the queue:
            _refuse([submission], self._unavailable)  # no apply task will take it now
        return submission.future

    # ------------------------------------------------------------ apply task

    async def _apply_loop(self) -> None:
        batch: list[_Submission] = []
        try:
            while True:
                batch = [await self._queue.get()]
                commands = len(batch[0].commands)
                while (
                    len(batch) < MAX_SUBMISSIONS_PER_ROUND
                    and commands < MAX_COMMANDS_PER_ROUND
                    and not self._queue.empty()
                ):
                    batch.append(self._queue.get_nowait())
                    commands += len(batch[-1].commands)
                if self._failure is not None:  # the commit task failed since the last round
                    _refuse(batch, self._unavailable)
                    return
                while len(self._core.records) >= MAX_UNCOMMITTED_RECORDS:
                    self._committed.clear()
                    await self._committed.wait()
                    if self._failure is not None:  # the journal failed while it waited
                        _refuse(batch, self._unavailable)
                        return
                self._apply_round(batch)
                self._wake_committer.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # an invariant broke: stop taking work
            self._fail(exc)
            _refuse(batch, self._unavailable)  # the round's submissions not yet answered

    def _apply_round(self, batch: list[_Submission]) -> None:
        core = self._core
        now_ms = core.round_time(self._clock_ms())
        for submission in batch:
            future = submission.future
            if future.done():  # the caller went away
                continue
            if submission.read is not None:
                reply = _Reply(future, submission.read(core.machine), [])
            else:
                outcomes, pushes = core.apply(
                    submission.commands, now_ms, submission.target, submission.allows
                )
                reply = _Reply(future, outcomes, pushes)
            if core.hold(reply):
                _release(reply)

    # ----------------------------------------------------------- commit task

    async def _commit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake_committer.wait()
                self._wake_committer.clear()
                while self._core.records:
                    records = self._core.take_records(MAX_RECORDS_PER_COMMIT)
                    started = time.perf_counter()
                    commit = loop.run_in_executor(self._thread, self._journal.append, records)
                    try:
                        await asyncio.wait_for(commit, COMMIT_TIMEOUT_SECONDS)
                    except TimeoutError as exc:
                        self._commit_timed_out = True
                        raise Unavailable(
                            f"a journal commit took over {COMMIT_TIMEOUT_SECONDS:.0f} s"
                        ) from exc
                    if self.observer is not None:
                        self.observer.committed(len(records), time.perf_counter() - started)
                    for reply in self._core.durable(records[-1].seq):
                        _release(reply)
                    if self.on_durable is not None:
                        self.on_durable(records[-1].seq)
                    self._committed.set()
                    self._maybe_checkpoint()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the journal failed: fail-stop
            self._fail(exc)

    def _maybe_checkpoint(self) -> None:
        """Start the journal's WAL checkpoint off the commit path, at most one at a time
        and one per CHECKPOINT_SECONDS. A failed one is logged: the next commit, on the
        same database, is what fails the writer."""
        if self._checkpoint is not None and not self._checkpoint.done():
            return
        now = time.monotonic()
        if now - self._checkpoint_at < CHECKPOINT_SECONDS:
            return
        self._checkpoint_at = now
        self._checkpoint = self._checkpointer.submit(self._journal.checkpoint)
        self._checkpoint.add_done_callback(_log_checkpoint_failure)

    # ------------------------------------------------------------- tick task

    async def _tick_loop(self) -> None:
        """Let time pass: expire silent calls, forget what left the window."""
        tick = Tick(retention_ms=self._retention_ms)
        while True:
            await asyncio.sleep(self._tick_interval_seconds)
            with contextlib.suppress(Unavailable):  # one tick at a time, its answer awaited
                await self.execute([tick])

    # ---------------------------------------------------------------- gauges

    def gauges(self) -> WriterGauges:
        """Levels for metrics; call on the event loop (O(1): a scrape never stalls it)."""
        open_calls = self._core.machine.open_call_count
        return WriterGauges(
            queued_submissions=self._queue.qsize(),
            uncommitted_records=len(self._core.records),
            accounts=len(self._core.machine.accounts),
            open_calls=open_calls,
            open_calls_without_stream=max(open_calls - len(self._core.routes), 0),
            failed=self._failure is not None,
        )

    # --------------------------------------------------------------- failure

    def _fail(self, exc: BaseException, *, log_it: bool = True) -> None:
        if self._failure is not None:
            return
        self._failure = exc
        self._committed.set()  # a round waiting for room is refused (_apply_loop)
        if log_it:
            log.critical("writer stopped taking work: %r", exc, exc_info=exc)
        error = self._unavailable = Unavailable(
            f"journal unavailable: {exc}" if log_it else str(exc)
        )
        for reply in self._core.drop_held():
            if not reply.future.done():
                reply.future.set_exception(error)
        queued = []
        while not self._queue.empty():
            queued.append(self._queue.get_nowait())
        _refuse(queued, error)
        for listener in self._failure_listeners:
            listener(exc)


def _refuse(submissions: Sequence[_Submission], error: Unavailable) -> None:
    for submission in submissions:
        if not submission.future.done():
            submission.future.set_exception(error)


def _release(reply: _Reply) -> None:
    """The journal covers the reply: resolve its future, send its pushes."""
    if not reply.future.done():
        reply.future.set_result(reply.result)
    for target, push in reply.pushes:
        target.push(push)


def _log_checkpoint_failure(done: Future[None]) -> None:
    exc = done.exception()
    if exc is not None:
        log.warning("the journal's WAL checkpoint failed: %s", exc)
