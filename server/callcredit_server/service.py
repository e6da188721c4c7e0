"""The gRPC servicers: translate messages, hand work to the writer, send answers.

No decision is taken here. Refusals become google.rpc.Status (errors.py); on the
Control stream they are error Outcomes and the stream stays open.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import heapq
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar, cast

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from callcredit.v1 import admin_pb2, admin_pb2_grpc, credit_control_pb2, credit_control_pb2_grpc
from callcredit.v1.error_reason_pb2 import ErrorReason
from callcredit_server import changefeed, convert
from callcredit_server.auth import current_tenant
from callcredit_server.changefeed import Changefeed, Cursor, FeedEvent, Filter
from callcredit_server.convert import GrantPolicy
from callcredit_server.core import (
    AccountResult,
    AccountView,
    Adjust,
    CallRecord,
    CallState,
    Command,
    CreateAccount,
    GrantPush,
    GrantResult,
    Outcome,
    Push,
    PutTariff,
    Refused,
    ReleaseOutcome,
    StateMachine,
    TariffResult,
    TopUp,
    UpdateAccount,
)
from callcredit_server.core.validation import ID_RULE, is_id
from callcredit_server.errors import (
    invalid,
    permission_denied,
    refusal_status,
    status_for,
    unavailable,
)
from callcredit_server.handlers import UndecodableRequest
from callcredit_server.journal import Journal, JournalError
from callcredit_server.metrics import Metrics
from callcredit_server.writer import Unavailable, Writer
from callcredit_server.writer_core import AccountFilter

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_OPERATIONS_PER_MESSAGE = 10_000  # docs/design.md's cap on one ControlRequest
# A stream's requests whose answers are not yet sent: the server stops reading the
# stream beyond either bound, so a client that never reads its answers holds at
# most this much (gRPC's flow control then stops its writes).
MAX_UNSENT_MESSAGES_PER_STREAM = 64
MAX_UNSENT_OPERATIONS_PER_STREAM = 10_000  # a full 10,000-operation message always fits
# An invalid request_id is echoed cut to this length, so that the answer to a full
# message (10,000 refusals of ~250 bytes each) stays well under the send limit.
MAX_ECHOED_REQUEST_ID_CHARS = 256
MAX_PUSHES_BUFFERED_PER_STREAM = 10_000  # a stream that cannot keep up is closed
MAX_ITEMS_PER_RESPONSE = 10_000  # answers and pushes merged into one ControlResponse
MAX_CONTROL_STREAMS = 1_000  # Control streams at once; more are refused UNAVAILABLE
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1_000
MAX_PAGE_TOKEN = 2**63 - 1  # a call_seq: BIGINT in the journal
# Opaque cursors of ListAccounts and ListTariffs: a version and the last id a page held,
# base64url-encoded. Clients must not build them; the format may change with a version.
_CURSOR_VERSION = "1:"
_MAX_CURSOR_CHARS = 256
_ID_PREFIX_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{0,128}")
DRAINING_MESSAGE = "server draining before a restart: reserve on another server or retry later"


class StreamSession:
    """One Control stream: the responses waiting to be sent, and the bounds on them.

    Answers and pushes are added straight into the open response, which the sender
    takes whole: however many messages were answered while the sender was busy, they
    leave as one ControlResponse (up to MAX_ITEMS_PER_RESPONSE items), without
    building one response per message and merging them.
    """

    def __init__(self, allows: AccountFilter | None = None) -> None:
        self.allows = allows  # the accounts this stream's token may act on (None: any)
        self.pushes_buffered = 0
        self._unsent_messages = 0
        self._unsent_operations = 0
        self._room = asyncio.Event()  # set when a response was sent
        self.overflowed = False
        self._full: deque[tuple[credit_control_pb2.ControlResponse, int, int]]
        self._full = deque()  # (response, messages, operations it answers)
        self._open: credit_control_pb2.ControlResponse | None = None
        self._open_items = 0
        self._open_messages = 0
        self._open_operations = 0
        self._closed = False
        self._wakeup = asyncio.Event()

    async def admit(self, operations: int) -> None:
        """Wait until a message of `operations` fits within the stream's unsent bounds."""
        while self._unsent_messages >= MAX_UNSENT_MESSAGES_PER_STREAM or (
            self._unsent_operations
            and self._unsent_operations + operations > MAX_UNSENT_OPERATIONS_PER_STREAM
        ):
            self._room.clear()
            await self._room.wait()
        self._unsent_messages += 1
        self._unsent_operations += operations

    async def all_sent(self) -> None:
        """Wait until every admitted message's answers have been sent."""
        while self._unsent_messages:
            self._room.clear()
            await self._room.wait()

    def answer(self, operations: int) -> credit_control_pb2.ControlResponse:
        """The response to add the answers of one admitted message to."""
        response = self.response(operations)
        self._open_messages += 1
        self._open_operations += operations
        return response

    def response(self, items: int) -> credit_control_pb2.ControlResponse:
        """The response to add `items` answers or pushes to."""
        if self._open is None or (
            self._open_items and self._open_items + items > MAX_ITEMS_PER_RESPONSE
        ):
            self._seal()
            self._open = credit_control_pb2.ControlResponse()
        self._open_items += items
        self._wakeup.set()
        return self._open

    def _seal(self) -> None:
        if self._open is not None:
            self._full.append((self._open, self._open_messages, self._open_operations))
        self._open = None
        self._open_items = self._open_messages = self._open_operations = 0

    def close(self) -> None:
        """Nothing more will be added: the sender ends once it has sent what is here."""
        self._closed = True
        self._wakeup.set()

    async def next_response(self) -> tuple[credit_control_pb2.ControlResponse, int, int] | None:
        """The next response to send, with the messages and operations it answers;
        None once the session is closed and everything was sent."""
        while True:
            if not self._full:
                self._seal()
            if self._full:
                return self._full.popleft()
            if self._closed:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()

    def sent(self, messages: int, operations: int) -> None:
        """A response went out: its messages no longer count against the bounds."""
        self._unsent_messages -= messages
        self._unsent_operations -= operations
        self._room.set()

    def push(self, push: Push) -> None:
        """Called by the writer once the push is durable."""
        if self.overflowed:
            return
        if self.pushes_buffered >= MAX_PUSHES_BUFFERED_PER_STREAM:
            self.overflowed = True  # the reader of this stream stalled: drop the stream
            self.close()
            return
        self.pushes_buffered += 1
        response = self.response(1)
        if isinstance(push, GrantPush):
            convert.set_grant(response.grant_updates.add(), push.grant)
        else:
            response.terminations.add(call_id=push.call_id, reason=push.reason)


def _add_outcomes(
    response: credit_control_pb2.ControlResponse,
    request_ids: list[str],
    kinds: list[str],
    outcomes: Sequence[Outcome | status_pb2.Status],
) -> list[tuple[str, Outcome | status_pb2.Status]]:
    """Append one message's answers, each built in place in `response`, in order.

    Returns the answers metrics must look at one by one, with their kind: the refusals
    and the releases that overran (every other answer is only counted).
    """
    noted: list[tuple[str, Outcome | status_pb2.Status]] = []
    add = response.outcomes.add
    set_grant = convert.set_grant
    for request_id, kind, outcome in zip(request_ids, kinds, outcomes, strict=True):
        answer = add(request_id=request_id)
        cls = outcome.__class__  # class identity, not isinstance: ~2x cheaper
        if cls is GrantResult:
            grant = answer.reserve.grant if kind == "reserve" else answer.renew.grant
            set_grant(grant, cast(GrantResult, outcome).grant)
        elif cls is ReleaseOutcome:
            result = cast(ReleaseOutcome, outcome).result
            convert.set_release(answer.release, result)
            if result.shortfall:
                noted.append((kind, outcome))
        elif cls is Refused:
            answer.error.CopyFrom(refusal_status(cast(Refused, outcome)))
            noted.append((kind, outcome))
        elif cls is status_pb2.Status:
            answer.error.CopyFrom(cast(status_pb2.Status, outcome))
            noted.append((kind, outcome))
        else:
            raise TypeError(f"unexpected outcome {outcome!r} for {kind}")
    return noted


async def _abort(
    context: grpc.aio.ServicerContext[Any, Any], status: status_pb2.Status
) -> NoReturn:
    await context.abort_with_status(rpc_status.to_status(status))
    raise AssertionError("abort_with_status returned")  # pragma: no cover


async def _run(
    writer: Writer,
    command: Command,
    context: grpc.aio.ServicerContext[Any, Any],
    allows: AccountFilter | None = None,
    metrics: Metrics | None = None,
) -> Outcome:
    """Execute one command for a unary RPC; a refusal aborts the RPC with its status."""
    started = time.perf_counter()
    try:
        (outcome,) = await writer.execute([command], allows=allows)
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


def _live(machine: StateMachine, calls: list[CallRecord], active_only: bool) -> list[CallRecord]:
    """History rows with each open one replaced by the call as memory holds it now.

    An open call's row holds the deadline of its last Reserve or Renew: a `Takeover`
    restarts every open call's validity in memory only (one journal record, no row).
    With `active_only`, a call that ended since its row was read is left out.
    """
    live = []
    for call in calls:
        if call.state is CallState.ACTIVE:
            held = machine.calls.get(call.call_id)
            if held is not None and held.call_seq == call.call_seq:
                call = held.record()
        if call.state is CallState.ACTIVE or not active_only:
            live.append(call)
    return live


def _allows() -> AccountFilter | None:
    """The accounts the RPC's dialer token may act on (auth.py); None without auth."""
    tenant = current_tenant()
    return None if tenant is None else tenant.allows


def _outside(account_id: str) -> status_pb2.Status:
    """The refusal of an account outside the token's tenant. An id no account can have
    is refused as invalid, and not echoed: 10,000 refusals repeating a 1,000-character id
    would make an answer larger than gRPC sends."""
    if not is_id(account_id):
        return invalid("account_id", ID_RULE)
    return permission_denied(f"account {account_id!r} is outside this token's tenant")


class CreditControlServicer(credit_control_pb2_grpc.CreditControlServiceServicer):
    """Dialers: the Control stream and its unary twins."""

    def __init__(self, writer: Writer, policy: GrantPolicy, metrics: Metrics | None = None) -> None:
        self._writer = writer
        self._policy = policy
        self.metrics = metrics if metrics is not None else Metrics()
        self.draining = False  # set by RunningServer.drain: new reserves get UNAVAILABLE
        self._streams: dict[StreamSession, asyncio.Task[None]] = {}  # open Control streams

    async def Control(
        self,
        request_iterator: AsyncIterator[credit_control_pb2.ControlRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[credit_control_pb2.ControlResponse]:
        if len(self._streams) >= MAX_CONTROL_STREAMS:
            await _abort(
                context,
                unavailable(f"too many Control streams ({MAX_CONTROL_STREAMS}); retry later"),
            )
        session = StreamSession(_allows())
        reader = asyncio.create_task(self._read_requests(request_iterator, session))
        self._streams[session] = reader
        self.metrics.stream_opened()
        try:
            while True:
                ready = await session.next_response()
                if ready is None:
                    break
                response, messages, operations = ready
                pushes = len(response.grant_updates) + len(response.terminations)
                session.pushes_buffered -= pushes
                if pushes:
                    self.metrics.pushed(response)
                yield response  # resumes once gRPC has taken the message
                session.sent(messages, operations)
            failure = reader.exception() if reader.done() and not reader.cancelled() else None
            if isinstance(failure, _StreamError | UndecodableRequest):
                await _abort(context, failure.status)
            if failure is not None:
                raise failure
            if session.overflowed:
                await _abort(
                    context,
                    status_for(
                        ErrorReason.SLOW_CONSUMER,
                        "stream closed: it did not read its pushes fast enough; "
                        "reconnect and read the stream",
                    ),
                )
        finally:
            reader.cancel()
            self._writer.forget(session)
            del self._streams[session]
            self.metrics.stream_closed()

    @property
    def open_streams(self) -> int:
        """Control streams connected now."""
        return len(self._streams)

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
                operations = len(request.operations)
                if operations > MAX_OPERATIONS_PER_MESSAGE:
                    raise _StreamError(
                        invalid(
                            "operations",
                            f"at most {MAX_OPERATIONS_PER_MESSAGE} per ControlRequest; "
                            f"this one has {operations}",
                        )
                    )
                await session.admit(operations)
                await self._submit(request, session)
        finally:
            await session.all_sent()  # let answers in flight finish
            session.close()

    async def _submit(
        self, request: credit_control_pb2.ControlRequest, session: StreamSession
    ) -> None:
        """Decode the message's operations into commands in one pass, hand them to the
        writer as one submission, and answer them all once it resolves."""
        started = time.perf_counter()
        metrics = self.metrics
        draining = self.draining
        policy = self._policy
        allows = session.allows
        valid_id = is_id
        # Per operation, in order: its request_id and kind (the oneof's name, "" if none).
        request_ids: list[str] = []
        kinds: list[str] = []
        early: dict[int, status_pb2.Status] = {}  # index -> refused before the writer
        commands: list[Command] = []
        for operation in request.operations:
            request_id = operation.request_id
            kind = operation.WhichOneof("op") or ""
            refusal: status_pb2.Status | None = None
            if not valid_id(request_id):
                request_id = request_id[:MAX_ECHOED_REQUEST_ID_CHARS]  # the answer stays bounded
                refusal = invalid("request_id", ID_RULE)
            elif kind == "reserve":
                reserve = operation.reserve
                if allows is not None and not allows(reserve.account_id):
                    refusal = _outside(reserve.account_id)
                elif draining:
                    refusal = unavailable(DRAINING_MESSAGE)
                else:
                    commands.append(convert.reserve(reserve, policy))
            elif kind == "release":
                commands.append(convert.release(operation.release))
            elif kind == "renew":
                commands.append(convert.renew(operation.renew, policy))
            else:
                refusal = invalid("op", "must be set")
            if refusal is not None:
                early[len(request_ids)] = refusal
            request_ids.append(request_id)
            kinds.append(kind)

        def deliver(future: asyncio.Future[list[Outcome]] | None) -> None:
            down: status_pb2.Status | None = None  # the writer is unavailable
            outcomes: list[Outcome] = []
            if future is not None:
                try:
                    outcomes = future.result()
                except Unavailable as exc:
                    down = unavailable(str(exc))
            answers: Sequence[Outcome | status_pb2.Status] = outcomes
            if early or down is not None:  # merge what the writer answered into place
                given = iter(outcomes)
                answers = [
                    early[index] if index in early else down or next(given)
                    for index in range(len(request_ids))
                ]
            response = session.answer(len(request_ids))
            noted = _add_outcomes(response, request_ids, kinds, answers)
            metrics.control_answered(kinds, noted, started)

        if not commands:
            deliver(None)
            return
        try:
            future = await self._writer.submit(commands, session, allows)
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
        allows = _allows()
        if allows is not None and not allows(request.account_id):
            await _abort(context, _outside(request.account_id))
        command = convert.reserve(request, self._policy)
        if self.draining:
            self.metrics.unary_answered(command, None, time.perf_counter())
            await _abort(context, unavailable(DRAINING_MESSAGE))
        outcome = await _run(self._writer, command, context, allows, self.metrics)
        if not isinstance(outcome, GrantResult):
            raise TypeError(outcome)
        return credit_control_pb2.ReserveResponse(grant=convert.grant_pb(outcome.grant))

    async def Renew(
        self,
        request: credit_control_pb2.RenewRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> credit_control_pb2.RenewResponse:
        command = convert.renew(request, self._policy)
        outcome = await _run(self._writer, command, context, _allows(), self.metrics)
        if not isinstance(outcome, GrantResult):
            raise TypeError(outcome)
        return credit_control_pb2.RenewResponse(grant=convert.grant_pb(outcome.grant))

    async def Release(
        self,
        request: credit_control_pb2.ReleaseRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> credit_control_pb2.ReleaseResponse:
        outcome = await _run(
            self._writer, convert.release(request), context, _allows(), self.metrics
        )
        if not isinstance(outcome, ReleaseOutcome):
            raise TypeError(outcome)
        return convert.release_pb(outcome.result)


class _StreamError(Exception):
    """The stream must end with `status` (a google.rpc.Status with its details)."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def _page_size(limit: int) -> int | None:
    if limit == 0:
        return DEFAULT_PAGE_SIZE
    return limit if 1 <= limit <= MAX_PAGE_SIZE else None


def _cursor(last_id: str) -> str:
    """The opaque page token that goes on after ``last_id``."""
    return base64.urlsafe_b64encode((_CURSOR_VERSION + last_id).encode()).decode()


def _after_cursor(token: str) -> str | None:
    """The id a page token goes on after ("" for no token); None for a token this server
    did not give."""
    if not token:
        return ""
    if len(token) > _MAX_CURSOR_CHARS:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
    except (UnicodeError, binascii.Error, ValueError):
        return None
    last_id = text.removeprefix(_CURSOR_VERSION)
    if last_id == text or not is_id(last_id):
        return None
    return last_id


async def _id_page(
    page_size: int, page_token: str, context: grpc.aio.ServicerContext[Any, Any]
) -> tuple[int, str]:
    """The size of a page in id order and the id it goes on after; a request's bad
    page_size or page_token aborts the RPC."""
    size = _page_size(page_size)
    if size is None:
        await _abort(context, invalid("page_size", f"must be between 0 and {MAX_PAGE_SIZE}"))
    after = _after_cursor(page_token)
    if after is None:
        await _abort(context, invalid("page_token", "is not a token this server gave"))
    return size, after


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    """Operators: accounts, tariffs, money, and reads of calls and the ledger."""

    def __init__(
        self,
        writer: Writer,
        journal: Journal,
        history: ThreadPoolExecutor,
        metrics: Metrics,
        feed: Changefeed,
    ) -> None:
        self._writer = writer
        self._journal = journal
        self._history = history  # threads for database reads, apart from the journal writer
        self.metrics = metrics
        self._feed = feed

    async def _account(
        self, command: Command, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.Account:
        outcome = await _run(self._writer, command, context, metrics=self.metrics)
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

    async def _history_now(
        self, read: Callable[[], T], context: grpc.aio.ServicerContext[Any, Any]
    ) -> T:
        """`_history_read` once the projector has stored every record durable now, so
        the read sees every answer given before it began (read-your-writes)."""
        await self._projected(self._feed.durable_seq, context)
        return await self._history_read(read, context)

    async def _require_account(
        self, account_id: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AccountView:
        """The account as durable now; INVALID_ARGUMENT or ACCOUNT_NOT_FOUND aborts."""
        if not is_id(account_id):
            await _abort(context, invalid("account_id", ID_RULE))
        view = await _read(self._writer, lambda m: m.account(account_id), context)
        if view is None:
            await _abort(
                context, status_for(ErrorReason.ACCOUNT_NOT_FOUND, f"no account {account_id!r}")
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
            low_balance_threshold=request.low_balance_threshold,
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
            low_balance_threshold=(
                request.low_balance_threshold if request.HasField("low_balance_threshold") else None
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
        outcome = await _run(self._writer, command, context, metrics=self.metrics)
        if not isinstance(outcome, TariffResult):
            raise TypeError(outcome)
        return admin_pb2.PutTariffResponse(tariff=convert.tariff_pb(outcome.tariff))

    async def GetTariff(
        self, request: admin_pb2.GetTariffRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.GetTariffResponse:
        if not is_id(request.tariff_id):
            await _abort(context, invalid("tariff_id", ID_RULE))
        tariff = await _read(self._writer, lambda m: m.tariffs.get(request.tariff_id), context)
        if tariff is None:
            await _abort(
                context,
                status_for(ErrorReason.TARIFF_NOT_FOUND, f"no tariff {request.tariff_id!r}"),
            )
        return admin_pb2.GetTariffResponse(tariff=convert.tariff_pb(tariff))

    async def GetCall(
        self, request: admin_pb2.GetCallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.GetCallResponse:
        if not is_id(request.call_id):
            await _abort(context, invalid("call_id", ID_RULE))
        call = await _read(self._writer, lambda m: m.call(request.call_id), context)
        if call is None:  # ended and forgotten by memory: history has it
            call = await self._history_now(lambda: self._journal.get_call(request.call_id), context)
        if call is None:
            await _abort(
                context, status_for(ErrorReason.CALL_NOT_FOUND, f"no call {request.call_id!r}")
            )
        return admin_pb2.GetCallResponse(call=convert.call_pb(call))

    async def ListCalls(
        self, request: admin_pb2.ListCallsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListCallsResponse:
        limit = _page_size(request.limit)
        if limit is None:
            await _abort(context, invalid("limit", f"must be between 0 and {MAX_PAGE_SIZE}"))
        before: int | None = None
        if request.page_token:
            token = request.page_token
            # isascii: str.isdigit() also takes digits such as "²", which int() refuses.
            if not (
                len(token) <= 19
                and token.isascii()
                and token.isdigit()
                and int(token) <= MAX_PAGE_TOKEN
            ):
                await _abort(context, invalid("page_token", "is not a token this server gave"))
            before = int(token)
        await self._require_account(request.account_id, context)
        calls = await self._history_now(
            lambda: self._journal.list_calls(
                request.account_id,
                active_only=request.active_only,
                before_call_seq=before,
                limit=limit + 1,
            ),
            context,
        )
        token = str(calls[limit - 1].call_seq) if len(calls) > limit else ""
        page = calls[:limit]
        if any(c.state is CallState.ACTIVE for c in page):
            page = await _read(self._writer, lambda m: _live(m, page, request.active_only), context)
        return admin_pb2.ListCallsResponse(
            calls=[convert.call_pb(c) for c in page], next_page_token=token
        )

    async def ListAccounts(
        self, request: admin_pb2.ListAccountsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListAccountsResponse:
        """One page of accounts in id order, from memory. A page is one pass over every
        account on the writer's turn (O(n log page_size)), so pages stay small and cheap
        next to a command; a token is the last id seen, so pages never repeat an account
        and accounts created meanwhile appear in order."""
        size, after = await _id_page(request.page_size, request.page_token, context)
        prefix = request.account_id_prefix
        if not _ID_PREFIX_PATTERN.fullmatch(prefix):
            await _abort(
                context,
                invalid("account_id_prefix", "must be 0-128 characters of [A-Za-z0-9._:@-]"),
            )
        status = None
        if request.status != admin_pb2.ACCOUNT_STATUS_UNSPECIFIED:
            status = convert.STATUS_FROM_PB.get(request.status)
            if status is None:
                await _abort(
                    context, invalid("status", "must be UNSPECIFIED, ACTIVE, SUSPENDED or CLOSED")
                )
        allows = _allows()

        def page(machine: StateMachine) -> list[AccountView]:
            chosen = heapq.nsmallest(
                size + 1,
                (
                    account_id
                    for account_id, account in machine.accounts.items()
                    if account_id > after
                    and account_id.startswith(prefix)
                    and (status is None or account.status is status)
                    and (allows is None or allows(account_id))
                ),
            )
            return [machine.accounts[account_id].view() for account_id in chosen]

        views = await _read(self._writer, page, context)
        token = _cursor(views[size - 1].account_id) if len(views) > size else ""
        return admin_pb2.ListAccountsResponse(
            accounts=[convert.account_pb(v) for v in views[:size]], next_page_token=token
        )

    async def ListTariffs(
        self, request: admin_pb2.ListTariffsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListTariffsResponse:
        """One page of tariffs in id order, without their rates (as ListAccounts)."""
        size, after = await _id_page(request.page_size, request.page_token, context)

        def page(machine: StateMachine) -> list[admin_pb2.TariffSummary]:
            chosen = heapq.nsmallest(size + 1, (t for t in machine.tariffs if t > after))
            tariffs = machine.tariffs
            return [
                admin_pb2.TariffSummary(
                    tariff_id=t, currency=tariffs[t].currency, rate_count=len(tariffs[t].rates)
                )
                for t in chosen
            ]

        summaries = await _read(self._writer, page, context)
        token = _cursor(summaries[size - 1].tariff_id) if len(summaries) > size else ""
        return admin_pb2.ListTariffsResponse(tariffs=summaries[:size], next_page_token=token)

    async def ListEntries(
        self, request: admin_pb2.ListEntriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ListEntriesResponse:
        limit = _page_size(request.limit)
        if limit is None:
            await _abort(context, invalid("limit", f"must be between 0 and {MAX_PAGE_SIZE}"))
        if request.after_entry_id < 0:
            await _abort(context, invalid("after_entry_id", "must not be negative"))
        await self._require_account(request.account_id, context)
        read = functools.partial(
            self._journal.list_entries,
            request.account_id,
            request.after_entry_id,
            limit,
            newest_first=request.newest_first,
        )
        entries = await self._history_now(read, context)
        return admin_pb2.ListEntriesResponse(entries=[convert.entry_pb(e) for e in entries])

    # ------------------------------------------------------------ changefeed

    # The stub says messages; this yields their bytes, which handlers.py sends as they are.
    async def WatchEvents(  # type: ignore[override]
        self, request: admin_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """Replay the stored events after the cursor, then follow live ones (changefeed.py).

        Yields serialized WatchEventsResponse messages: a live event's bytes are made
        once and shared by every stream that sends it. A replay first waits (at most
        PROJECTION_WAIT_SECONDS) until the projector has stored the events of every
        record durable now: it shows at least what was acknowledged before it began.
        """
        feed = self._feed
        wanted = await self._watch_filter(request, context)
        durable_seq = feed.durable_seq
        cursor: Cursor = (0, changefeed.END_OF_RECORD)
        if request.from_end:
            if request.after or request.HasField("since") or request.stored_only:
                await _abort(context, invalid("from_end", "excludes after, since and stored_only"))
            cursor = (durable_seq, changefeed.END_OF_RECORD)
        elif request.HasField("since"):
            if request.after:
                await _abort(context, invalid("after", "must be empty with since"))
            since = request.since
            if not (0 <= since.seconds <= _MAX_SINCE_SECONDS and 0 <= since.nanos < 10**9):
                await _abort(context, invalid("since", "must be a time from 1970 to 9999"))
        elif request.after:
            parsed = changefeed.parse_cursor(request.after)
            if parsed is None:
                await _abort(context, invalid("after", "is not a cursor this server gave"))
            # The projector (another process) may store and publish a record before the
            # writer's own durable mark moves past it: a cursor given for it is valid.
            end = max(durable_seq, feed.projected_seq)
            if parsed[0] > end:
                await _abort(context, invalid("after", f"is beyond the journal's end (seq {end})"))
            cursor = parsed
        if not request.from_end:
            await self._projected(durable_seq, context)
        if request.HasField("since"):
            at_ms = request.since.ToMilliseconds()
            read = functools.partial(self._journal.last_seq_before, at_ms, durable_seq)
            cursor = (await self._history_read(read, context), changefeed.END_OF_RECORD)
        through_seq = durable_seq if request.stored_only else None
        async for response, read_to in self._stored_events(cursor, wanted, context, through_seq):
            yield response
            cursor = read_to
        if request.stored_only:
            return
        follower = feed.subscribe(wanted)
        if follower is None:
            await _abort(context, unavailable("too many WatchEvents streams; retry later"))
        try:
            sent = False
            async for response, read_to in self._stored_events(cursor, wanted, context):
                yield response
                cursor = read_to
                sent = True
            if request.from_end and not sent:
                # Its position at once, as a cursor: a client that must reconnect before
                # any event came resumes from here rather than from a later end.
                yield _events_response([], cursor)
            while True:
                await follower.wake.wait()
                if follower.cut:
                    await _abort(
                        context,
                        status_for(
                            ErrorReason.SLOW_CONSUMER,
                            f"more than {changefeed.MAX_BUFFERED_EVENTS} events waited for this "
                            f"stream: resume with after={changefeed.format_cursor(cursor)}",
                        ),
                    )
                if follower.closed:
                    await _abort(context, unavailable("the server stopped taking work"))
                taken = follower.take(cursor)
                if taken:
                    cursor = taken[-1].cursor
                    yield _events_response(taken, cursor)
        finally:
            feed.unsubscribe(follower)

    async def _projected(self, seq: int, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Wait until the projection (history, events) is stored through `seq`;
        UNAVAILABLE after PROJECTION_WAIT_SECONDS (the projector is down or far behind)."""
        try:
            async with asyncio.timeout(PROJECTION_WAIT_SECONDS):
                await self._feed.projected(seq)
        except TimeoutError:
            await _abort(
                context,
                unavailable(
                    f"the projector has stored history and events through seq "
                    f"{self._feed.projected_seq} only, and the journal is at {seq} "
                    f"(waited {PROJECTION_WAIT_SECONDS:.0f} s): it is down or behind; retry"
                ),
            )

    async def _watch_filter(
        self, request: admin_pb2.WatchEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Filter:
        allows = _allows()
        if len(request.account_ids) > changefeed.MAX_ACCOUNT_FILTER:
            await _abort(
                context,
                invalid("account_ids", f"at most {changefeed.MAX_ACCOUNT_FILTER} accounts"),
            )
        for account_id in request.account_ids:
            if not is_id(account_id):
                await _abort(context, invalid("account_ids", ID_RULE))
            if allows is not None and not allows(account_id):
                await _abort(context, _outside(account_id))
        kinds = set()
        for kind in request.kinds:
            known = convert.EVENT_KIND_FROM_PB.get(kind)
            if known is None:
                await _abort(context, invalid("kinds", f"unknown event kind {kind}"))
            kinds.add(known)
        return Filter(allows, frozenset(request.account_ids), frozenset(kinds))

    async def _stored_events(
        self,
        cursor: Cursor,
        wanted: Filter,
        context: grpc.aio.ServicerContext[Any, Any],
        through_seq: int | None = None,
    ) -> AsyncIterator[tuple[bytes, Cursor]]:
        """The stored events after `cursor`, in responses of at most 1,000, until the end
        (what is published as each page is read, or `through_seq`).

        The last response of each page read carries the cursor past the page's last
        record, events or not, so that a narrow filter need not rescan what it left out
        (spelled as the last event's id when that event is in the response).
        """
        limit = changefeed.MAX_EVENTS_PER_RESPONSE
        while True:
            seq, index = cursor
            # Only what is published: the live buffer takes over from there.
            through = self._feed.projected_seq if through_seq is None else through_seq
            read = functools.partial(self._journal.read_events, seq, index, through)
            stored, last, more = await self._history_read(read, context)
            if last is None:
                return
            matched = [
                FeedEvent(e.seq, e.idx, e.at_ms, e.event)
                for e in stored
                if wanted.matches(e.event.account_id, e.event.kind)
            ]
            chunks = [matched[i : i + limit] for i in range(0, len(matched), limit)] or [[]]
            for chunk in chunks[:-1]:
                cursor = chunk[-1].cursor
                yield _events_response(chunk, cursor), cursor
            end = (last, stored[-1].idx) if stored else None  # the page's last event
            if matched and matched[-1].cursor == end:
                cursor = matched[-1].cursor  # sent: its id is the same place as (last, END)
            else:
                cursor = (last, changefeed.END_OF_RECORD)
            yield _events_response(chunks[-1], cursor), cursor
            if not more:
                return


PROJECTION_WAIT_SECONDS = 5.0  # a replay or history read waits this long for the projector
_MAX_SINCE_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z, the end of Timestamp's range

# WatchEventsResponse on the wire: field 1 (events) and field 2 (cursor), length-delimited.
_EVENTS_TAG = b"\x0a"
_CURSOR_TAG = b"\x12"


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _event_wire(item: FeedEvent) -> bytes:
    """The event as field 1 of a WatchEventsResponse; encoded once, shared by every stream."""
    wire = item.wire
    if wire is None:
        body = convert.event_pb(item.seq, item.index, item.at_ms, item.event).SerializeToString()
        wire = item.wire = _EVENTS_TAG + _varint(len(body)) + body
    return wire


def _events_response(events: list[FeedEvent], cursor: Cursor) -> bytes:
    """A serialized WatchEventsResponse (handlers.py sends bytes as they are)."""
    text = changefeed.format_cursor(cursor).encode()
    parts = [_event_wire(e) for e in events]
    parts.append(_CURSOR_TAG + _varint(len(text)) + text)
    return b"".join(parts)
