"""The gRPC servicers: translate messages, hand work to the writer, send answers.

No decision is taken here. Refusals become google.rpc.Status (errors.py); on the
Control stream they are error Outcomes and the stream stays open.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc
from callcredit_server import convert
from callcredit_server.convert import GrantPolicy
from callcredit_server.core import (
    AccountResult,
    AccountView,
    Adjust,
    Command,
    CreateAccount,
    GrantPush,
    GrantResult,
    Outcome,
    Push,
    PutTariff,
    Reason,
    Refused,
    ReleaseOutcome,
    StateMachine,
    TariffResult,
    TopUp,
    UpdateAccount,
)
from callcredit_server.core.validation import ID_PATTERN, ID_RULE
from callcredit_server.errors import invalid, refusal_status, status_for, unavailable
from callcredit_server.journal import Journal, JournalError
from callcredit_server.metrics import Metrics
from callcredit_server.writer import Unavailable, Writer

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_OPERATIONS_PER_MESSAGE = 10_000  # DESIGN.md's cap on one ControlRequest
MAX_UNANSWERED_MESSAGES_PER_STREAM = 64  # a stream's requests in flight at once
MAX_PUSHES_BUFFERED_PER_STREAM = 10_000  # a stream that cannot keep up is closed
MAX_ITEMS_PER_RESPONSE = 10_000  # answers and pushes merged into one ControlResponse
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1_000
DRAINING_MESSAGE = "server draining before a restart: reserve on another server or retry later"


class StreamSession:
    """One Control stream: its outbox, and the bounds that keep it from growing."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[credit_control_pb2.ControlResponse | None] = asyncio.Queue()
        self.slots = asyncio.Semaphore(MAX_UNANSWERED_MESSAGES_PER_STREAM)
        self.pushes_buffered = 0
        self.overflowed = False

    def push(self, push: Push) -> None:
        """Called by the writer once the push is durable."""
        if self.overflowed:
            return
        if self.pushes_buffered >= MAX_PUSHES_BUFFERED_PER_STREAM:
            self.overflowed = True  # the reader of this stream stalled: drop the stream
            self.outbox.put_nowait(None)
            return
        self.pushes_buffered += 1
        response = credit_control_pb2.ControlResponse()
        if isinstance(push, GrantPush):
            response.grant_updates.append(convert.grant_pb(push.grant))
        else:
            response.terminations.append(
                credit_control_pb2.CallTermination(call_id=push.call_id, reason=push.reason)
            )
        self.outbox.put_nowait(response)


def _outcome_pb(
    request_id: str, op: str, outcome: Outcome | status_pb2.Status
) -> credit_control_pb2.Outcome:
    answer = credit_control_pb2.Outcome(request_id=request_id)
    if isinstance(outcome, status_pb2.Status):
        answer.error.CopyFrom(outcome)
    elif isinstance(outcome, Refused):
        answer.error.CopyFrom(refusal_status(outcome))
    elif isinstance(outcome, GrantResult) and op == "reserve":
        answer.reserve.grant.CopyFrom(convert.grant_pb(outcome.grant))
    elif isinstance(outcome, GrantResult):
        answer.renew.grant.CopyFrom(convert.grant_pb(outcome.grant))
    elif isinstance(outcome, ReleaseOutcome):
        answer.release.CopyFrom(convert.release_pb(outcome.result))
    else:
        raise TypeError(f"unexpected outcome {outcome!r} for {op}")
    return answer


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], status: status_pb2.Status
) -> NoReturn:
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


async def _run(
    writer: Writer,
    command: Command,
    context: grpc.aio.ServicerContext[Any, Any],
    metrics: Metrics | None = None,
) -> Outcome:
    """Execute one command for a unary RPC; a refusal aborts the RPC with its status."""
    started = time.perf_counter()
    try:
        (outcome,) = await writer.execute([command])
    except Unavailable as exc:
        if metrics is not None:
            metrics.unary_answered(command, None, started)
        await _abort(context, unavailable(str(exc)))
    if metrics is not None:
        metrics.unary_answered(command, outcome, started)
    if isinstance(outcome, Refused):
        await _abort(context, refusal_status(outcome))
    return outcome


async def _read(
    writer: Writer, read: Callable[[StateMachine], T], context: grpc.aio.ServicerContext[Any, Any]
) -> T:
    try:
        return await writer.read(read)
    except Unavailable as exc:
        await _abort(context, unavailable(str(exc)))


class CreditControlServicer(credit_control_pb2_grpc.CreditControlServiceServicer):
    """Dialers: the Control stream and its unary twins."""

    def __init__(self, writer: Writer, policy: GrantPolicy, metrics: Metrics | None = None) -> None:
        self._writer = writer
        self._policy = policy
        self.metrics = metrics if metrics is not None else Metrics()
        self.draining = False  # set by RunningServer.drain: new reserves get UNAVAILABLE
        self._streams: dict[StreamSession, asyncio.Task[None]] = {}  # open Control streams

    def _command(self, operation: credit_control_pb2.Operation) -> Command | None:
        kind = operation.WhichOneof("op")
        if kind == "reserve":
            return convert.reserve(operation.reserve, self._policy)
        if kind == "renew":
            return convert.renew(operation.renew, self._policy)
        if kind == "release":
            return convert.release(operation.release)
        return None

    async def Control(
        self,
        request_iterator: AsyncIterator[credit_control_pb2.ControlRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[credit_control_pb2.ControlResponse]:
        session = StreamSession()
        reader = asyncio.create_task(self._read_requests(request_iterator, session))
        self._streams[session] = reader
        self.metrics.stream_opened()
        try:
            while True:
                first = await session.outbox.get()
                if first is None:
                    break
                response = first
                items = len(first.outcomes)
                while not session.outbox.empty() and items < MAX_ITEMS_PER_RESPONSE:
                    more = session.outbox.get_nowait()
                    if more is None:
                        session.outbox.put_nowait(None)
                        break
                    items += len(more.outcomes) + len(more.grant_updates)
                    response.MergeFrom(more)
                pushes = len(response.grant_updates) + len(response.terminations)
                session.pushes_buffered -= pushes
                if pushes:
                    self.metrics.pushed(response)
                yield response
            failure = reader.exception() if reader.done() and not reader.cancelled() else None
            if isinstance(failure, _StreamError):
                await context.abort(failure.code, str(failure))
            if failure is not None:
                raise failure
            if session.overflowed:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "stream closed: it did not read its pushes fast enough",
                )
        finally:
            reader.cancel()
            self._writer.forget(session)
            del self._streams[session]
            self.metrics.stream_closed()

    def end_streams(self) -> None:
        """Stop reading every Control stream; each ends (status OK) once the answers to
        what it already read are sent, so its dialer reconnects (to a restarted server)."""
        for reader in self._streams.values():
            reader.cancel()

    async def _read_requests(
        self,
        request_iterator: AsyncIterator[credit_control_pb2.ControlRequest],
        session: StreamSession,
    ) -> None:
        try:
            async for request in request_iterator:
                if len(request.operations) > MAX_OPERATIONS_PER_MESSAGE:
                    raise _StreamError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"at most {MAX_OPERATIONS_PER_MESSAGE} operations per ControlRequest",
                    )
                await session.slots.acquire()
                await self._submit(request, session)
        finally:
            for _ in range(MAX_UNANSWERED_MESSAGES_PER_STREAM):  # let answers in flight finish
                await session.slots.acquire()
            session.outbox.put_nowait(None)

    async def _submit(
        self, request: credit_control_pb2.ControlRequest, session: StreamSession
    ) -> None:
        started = time.perf_counter()
        metrics = self.metrics
        draining = self.draining
        answers: list[tuple[str, str, Outcome | status_pb2.Status]] = []
        commands: list[Command] = []
        positions: list[int] = []
        for operation in request.operations:
            kind = operation.WhichOneof("op") or ""
            command = self._command(operation)
            if not ID_PATTERN.fullmatch(operation.request_id):
                answers.append((operation.request_id, kind, invalid("request_id", ID_RULE)))
            elif command is None:
                answers.append((operation.request_id, kind, invalid("op", "must be set")))
            elif draining and kind == "reserve":
                answers.append((operation.request_id, kind, unavailable(DRAINING_MESSAGE)))
            else:
                positions.append(len(answers))
                answers.append((operation.request_id, kind, Refused(Reason.INVALID_ARGUMENT, "")))
                commands.append(command)

        def deliver(future: asyncio.Future[list[Outcome]] | None) -> None:
            try:
                if future is not None:
                    for position, outcome in zip(positions, future.result(), strict=True):
                        request_id, kind, _ = answers[position]
                        answers[position] = (request_id, kind, outcome)
            except Unavailable as exc:
                down = unavailable(str(exc))
                for position in positions:
                    request_id, kind, _ = answers[position]
                    answers[position] = (request_id, kind, down)
            response = credit_control_pb2.ControlResponse(
                outcomes=[_outcome_pb(rid, kind, outcome) for rid, kind, outcome in answers]
            )
            metrics.control_answered(answers, started)
            session.outbox.put_nowait(response)
            session.slots.release()

        if not commands:
            deliver(None)
            return
        try:
            future = await self._writer.submit(commands, session)
        except Unavailable as exc:
            failed: asyncio.Future[list[Outcome]] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            future = failed
        future.add_done_callback(deliver)

    async def Reserve(
        self,
        request: credit_control_pb2.ReserveRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> credit_control_pb2.ReserveResponse:
        command = convert.reserve(request, self._policy)
        if self.draining:
            self.metrics.unary_answered(command, None, time.perf_counter())
            await _abort(context, unavailable(DRAINING_MESSAGE))
        outcome = await _run(self._writer, command, context, self.metrics)
        if not isinstance(outcome, GrantResult):
            raise TypeError(outcome)
        return credit_control_pb2.ReserveResponse(grant=convert.grant_pb(outcome.grant))

    async def Renew(
        self,
        request: credit_control_pb2.RenewRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> credit_control_pb2.RenewResponse:
        outcome = await _run(
            self._writer, convert.renew(request, self._policy), context, self.metrics
        )
        if not isinstance(outcome, GrantResult):
            raise TypeError(outcome)
        return credit_control_pb2.RenewResponse(grant=convert.grant_pb(outcome.grant))

    async def Release(
        self,
        request: credit_control_pb2.ReleaseRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> credit_control_pb2.ReleaseResponse:
        outcome = await _run(self._writer, convert.release(request), context, self.metrics)
        if not isinstance(outcome, ReleaseOutcome):
            raise TypeError(outcome)
        return convert.release_pb(outcome.result)


class _StreamError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _page_size(limit: int) -> int | None:
    if limit == 0:
        return DEFAULT_PAGE_SIZE
    return limit if 1 <= limit <= MAX_PAGE_SIZE else None


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Operators: accounts, tariffs, money, and reads of calls and the ledger."""

    def __init__(
        self,
        writer: Writer,
        journal: Journal,
        history: ThreadPoolExecutor,
        metrics: Metrics | None = None,
    ) -> None:
        self._writer = writer
        self._journal = journal
        self._history = history  # threads for database reads, apart from the journal writer
        self.metrics = metrics if metrics is not None else Metrics()

    async def _account(
        self, command: Command, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.Account:
        outcome = await _run(self._writer, command, context, self.metrics)
        if not isinstance(outcome, AccountResult):
            raise TypeError(outcome)
        return convert.account_pb(outcome.account)

    async def _history_read(
        self, read: Callable[[], T], context: grpc.aio.ServicerContext[Any, Any]
    ) -> T:
        """A read of the history tables, off the event loop; a database failure is UNAVAILABLE."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._history, read)
        except JournalError as exc:
            await _abort(context, unavailable(f"history cannot be read: {exc}"))

    async def _require_account(
        self, account_id: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AccountView:
        """The account as durable now; INVALID_ARGUMENT or ACCOUNT_NOT_FOUND aborts."""
        if not ID_PATTERN.fullmatch(account_id):
            await _abort(context, invalid("account_id", ID_RULE))
        view = await _read(self._writer, lambda m: m.account(account_id), context)
        if view is None:
            await _abort(
                context, status_for(Reason.ACCOUNT_NOT_FOUND, f"no account {account_id!r}")
            )
        return view

    async def CreateAccount(
        self, request: admin_pb2.CreateAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.CreateAccountResponse:
        command = CreateAccount(
            account_id=request.account_id,
            currency=request.currency,
            tariff_id=request.tariff_id,
            credit_limit=request.credit_limit,
            max_concurrent_calls=request.max_concurrent_calls,
        )
        return admin_pb2.CreateAccountResponse(account=await self._account(command, context))

    async def GetAccount(
        self, request: admin_pb2.GetAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.GetAccountResponse:
        view = await self._require_account(request.account_id, context)
        return admin_pb2.GetAccountResponse(account=convert.account_pb(view))

    async def UpdateAccount(
        self, request: admin_pb2.UpdateAccountRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.UpdateAccountResponse:
        status = None
        if request.HasField("status"):
            status = convert.STATUS_FROM_PB.get(request.status)
            if status is None:
                await _abort(context, invalid("status", "must be ACTIVE, SUSPENDED or CLOSED"))
        command = UpdateAccount(
            account_id=request.account_id,
            status=status,
            tariff_id=request.tariff_id if request.HasField("tariff_id") else None,
            credit_limit=request.credit_limit if request.HasField("credit_limit") else None,
            max_concurrent_calls=(
                request.max_concurrent_calls if request.HasField("max_concurrent_calls") else None
            ),
        )
        return admin_pb2.UpdateAccountResponse(account=await self._account(command, context))

    async def TopUp(
        self, request: admin_pb2.TopUpRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.TopUpResponse:
        command = TopUp(
            account_id=request.account_id,
            amount=request.amount,
            idempotency_key=request.idempotency_key,
            reference=request.reference,
        )
        return admin_pb2.TopUpResponse(account=await self._account(command, context))

    async def Adjust(
        self, request: admin_pb2.AdjustRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.AdjustResponse:
        command = Adjust(
            account_id=request.account_id,
            amount=request.amount,
            idempotency_key=request.idempotency_key,
            reason=request.reason,
        )
        return admin_pb2.AdjustResponse(account=await self._account(command, context))

    async def PutTariff(
        self, request: admin_pb2.PutTariffRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.PutTariffResponse:
        command = PutTariff(convert.tariff_from_pb(request.tariff))
        outcome = await _run(self._writer, command, context, self.metrics)
        if not isinstance(outcome, TariffResult):
            raise TypeError(outcome)
        return admin_pb2.PutTariffResponse(tariff=convert.tariff_pb(outcome.tariff))

    async def GetTariff(
        self, request: admin_pb2.GetTariffRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.GetTariffResponse:
        if not ID_PATTERN.fullmatch(request.tariff_id):
            await _abort(context, invalid("tariff_id", ID_RULE))
        tariff = await _read(self._writer, lambda m: m.tariffs.get(request.tariff_id), context)
        if tariff is None:
            await _abort(
                context, status_for(Reason.TARIFF_NOT_FOUND, f"no tariff {request.tariff_id!r}")
            )
        return admin_pb2.GetTariffResponse(tariff=convert.tariff_pb(tariff))

    async def GetCall(
        self, request: admin_pb2.GetCallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.GetCallResponse:
        if not ID_PATTERN.fullmatch(request.call_id):
            await _abort(context, invalid("call_id", ID_RULE))
        call = await _read(self._writer, lambda m: m.call(request.call_id), context)
        if call is None:  # ended and forgotten by memory: history has it
            call = await self._history_read(
                lambda: self._journal.get_call(request.call_id), context
            )
        if call is None:
            await _abort(context, status_for(Reason.CALL_NOT_FOUND, f"no call {request.call_id!r}"))
        return admin_pb2.GetCallResponse(call=convert.call_pb(call))

    async def ListCalls(
        self, request: admin_pb2.ListCallsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListCallsResponse:
        limit = _page_size(request.limit)
        if limit is None:
            await _abort(context, invalid("limit", f"must be between 0 and {MAX_PAGE_SIZE}"))
        before: int | None = None
        if request.page_token:
            if not request.page_token.isdigit() or len(request.page_token) > 19:
                await _abort(context, invalid("page_token", "is not a token this server gave"))
            before = int(request.page_token)
        await self._require_account(request.account_id, context)
        calls = await self._history_read(
            lambda: self._journal.list_calls(
                request.account_id,
                active_only=request.active_only,
                before_call_seq=before,
                limit=limit + 1,
            ),
            context,
        )
        token = str(calls[limit - 1].call_seq) if len(calls) > limit else ""
        return admin_pb2.ListCallsResponse(
            calls=[convert.call_pb(c) for c in calls[:limit]], next_page_token=token
        )

    async def ListEntries(
        self, request: admin_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListEntriesResponse:
        limit = _page_size(request.limit)
        if limit is None:
            await _abort(context, invalid("limit", f"must be between 0 and {MAX_PAGE_SIZE}"))
        if request.after_entry_id < 0:
            await _abort(context, invalid("after_entry_id", "must not be negative"))
        await self._require_account(request.account_id, context)
        entries = await self._history_read(
            lambda: self._journal.list_entries(request.account_id, request.after_entry_id, limit),
            context,
        )
        return admin_pb2.ListEntriesResponse(entries=[convert.entry_pb(e) for e in entries])
