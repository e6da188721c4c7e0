"""The admin client: accounts, tariffs, money, and reads of calls and the ledger.

``AdminClient`` wraps ``AdminService`` (proto/callcredit/v1/admin.proto) in one async
method per RPC that takes plain keyword arguments and returns the proto message the
server answered (``Account``, ``Tariff``, ``Call``, or a list of them)::

    async with AdminClient("127.0.0.1:50051", token=os.environ["CALLCREDIT_TOKEN"]) as admin:
        await admin.put_tariff("vn-std", "VND", [RateSpec("84", 1_200_000, 60, 60)])
        await admin.create_account("acme", currency="VND", tariff_id="vn-std")
        account = await admin.top_up("acme", 500_000, idempotency_key="inv-2024-001")

Every amount is an ``int`` in the account currency's minor unit. A refused or failed
request raises ``CallcreditError`` (callcredit.errors): gRPC errors are translated once,
here, and never leak past this module.

Top-ups and adjustments take a required ``idempotency_key``: a retry of a request whose
answer was lost (timeout, dropped connection) must reuse the key of the first attempt,
or the money would move twice. The client therefore never invents a key itself — only
the caller knows which attempts are "the same" request.

A server with tokens needs an admin token (``token=``, sent as ``authorization: Bearer``
metadata); a server with TLS needs ``tls=True`` or ``ca_file=`` (its CA, else the
system's roots), and ``cert_file=``/``key_file=`` when it requires client certificates.
``open_channel`` builds the same channel for other uses (the dialer library uses it).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import Message
from grpc_status import rpc_status

from callcredit.connect import diagnose, unreachable_error
from callcredit.errors import CallcreditError
from callcredit.targets import NOT_PRIMARY, PRIMARY_KEY, Failover, parse_targets
from callcredit.v1 import admin_pb2, admin_pb2_grpc

__all__ = [
    "DEFAULT_TIMEOUT_SECONDS",
    "AdminClient",
    "RateSpec",
    "check_tls_options",
    "open_channel",
    "token_metadata",
]

# An admin request is one state-machine command plus one group commit of the journal:
# milliseconds when healthy. Ten seconds leaves room for a slow disk or a busy server
# while still failing a script within a human's patience when the server is gone.
DEFAULT_TIMEOUT_SECONDS = 10.0

# With several targets (a primary and hot standbys), a request that meets a standby or
# no server goes on to the next, each target at most this many times: the first tour
# at once, then with backoff (callcredit.targets). With two targets that is 4-8 s of
# patience, past a takeover at the default 5 s lease; and a backoff of at most 1 s, so
# the client finds a new primary within a second of its serving (with 2 s it was once
# 1.8 s late: docs/benchmarks.md, "Hot standby").
ATTEMPTS_PER_TARGET = 6
RETRY_BACKOFF_INITIAL_SECONDS = 0.25
RETRY_BACKOFF_MAX_SECONDS = 1.0

_NO_ANSWER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Refusals of the connection itself (no token, the wrong one): the message says which
# server refused, since the same token may work elsewhere.
_TARGET_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})


@dataclass(frozen=True, slots=True)
class RateSpec:
    """One rate of a tariff, as plain Python values (see the proto ``Rate``).

    The increments default to 1/1 (per-second billing): the one choice that never bills
    a caller for time they did not use, so forgetting them cannot overcharge anyone.
    """

    prefix: str
    price_per_minute_micros: int
    first_increment_seconds: int = 1
    next_increment_seconds: int = 1
    connect_fee: int = 0

    def to_proto(self) -> admin_pb2.Rate:
        """The wire form of this rate."""
        return admin_pb2.Rate(
            prefix=self.prefix,
            price_per_minute_micros=self.price_per_minute_micros,
            first_increment_seconds=self.first_increment_seconds,
            next_increment_seconds=self.next_increment_seconds,
            connect_fee=self.connect_fee,
        )


def check_tls_options(
    target: object,
    *,
    tls: bool = False,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> None:
    """Refuse TLS options that cannot apply (ValueError): options for a channel the
    caller passed in (``target`` not an address), or half a client certificate."""
    if not isinstance(target, str) and (tls or ca_file or cert_file or key_file):
        raise ValueError("TLS options apply to a channel the client opens, not to yours")
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate needs both cert_file and key_file")


def open_channel(
    target: str,
    *,
    tls: bool = False,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """A channel to ``target``: TLS if ``tls`` or any file is given, else plaintext.

    ``ca_file`` is the PEM bundle that signed the server's certificate (default: the
    system's roots); ``cert_file`` and ``key_file`` are this client's certificate and
    key, for a server that requires mutual TLS. A file that cannot be read raises
    OSError here, before anything is sent.
    """
    check_tls_options(target, tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
    if not (tls or ca_file or cert_file or key_file):
        return grpc.aio.insecure_channel(target, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file else None,
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that presents ``token`` (none without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


class AdminClient:
    """An async client for AdminService.

    Built from a target (``"host:port"``; the client then owns the channel, plaintext or
    TLS as ``tls``/``ca_file``/``cert_file``/``key_file`` say, and closes it), several
    (``"a:1,b:2"`` or ``["a:1", "b:2"]``: a primary and its hot standbys; each request
    finds the primary, see ``_call``) or from an
    existing ``grpc.aio.Channel`` (custom options; the caller keeps ownership and closes
    it). ``token`` goes with every RPC either way. Each RPC gets a deadline of
    ``timeout_seconds``, connecting included: an admin call that cannot be answered
    should fail, not hang. One that cannot reach the server fails at once (a refused
    connection) or at the deadline, with an error naming the target and the cause.
    """

    def __init__(
        self,
        target: str | Sequence[str] | grpc.aio.Channel,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        check_tls_options(target, tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        self._borrowed = target if isinstance(target, grpc.aio.Channel) else None
        targets = ("the server",) if self._borrowed else parse_targets(target)  # type: ignore[arg-type]
        self._failover = Failover(
            targets,
            backoff_initial_seconds=RETRY_BACKOFF_INITIAL_SECONDS,
            backoff_max_seconds=RETRY_BACKOFF_MAX_SECONDS,
            max_attempts=ATTEMPTS_PER_TARGET * len(targets) if len(targets) > 1 else 1,
        )
        self._tls = bool(tls or ca_file or cert_file or key_file)
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        # Every channel now: a TLS file that cannot be read fails here, before anything
        # is sent (a channel connects on its first RPC).
        self._channels = {
            target: open_channel(
                target, tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file
            )
            for target in targets
            if self._borrowed is None
        }
        self._stubs: dict[str, Any] = {}
        self._metadata = token_metadata(token)
        self._timeout_seconds = timeout_seconds

    def _channel(self, target: str) -> grpc.aio.Channel:
        return self._borrowed or self._channels[target]

    def _stub(self, target: str) -> Any:
        # Any: with grpc's type stubs this would be AdminServiceAsyncStub; without them
        # grpc is untyped. The annotated ``response`` variables below give the types.
        stub = self._stubs.get(target)
        if stub is None:
            stub = self._stubs[target] = admin_pb2_grpc.AdminServiceStub(self._channel(target))
        return stub

    async def _call(self, method: str, request: Message) -> Any:
        """Send one RPC, on the primary: a failure becomes a CallcreditError, the one
        translation boundary.

        With several targets, a NOT_PRIMARY refusal or no answer at all moves the request
        to the next target (callcredit.targets: the refusal's primary hint first), at
        most ATTEMPTS_PER_TARGET times each: every RPC is safe to repeat (reads, puts,
        and money moves under the caller's idempotency key, fixed before the first try).
        Giving up names every target tried and why each failed.
        """
        failover = self._failover
        failover.reset()
        failures: dict[str, str] = {}  # target -> why it failed last
        while True:
            target = failover.current
            try:
                response = await getattr(self._stub(target), method)(
                    request, timeout=self._timeout_seconds, metadata=self._metadata
                )
                failover.reset()
                return response
            except grpc.RpcError as exc:
                await self._after_failure(exc, target, failures)

    async def _after_failure(
        self, exc: grpc.RpcError, target: str, failures: dict[str, str]
    ) -> None:
        """`target` failed with `exc`: raise it unless another target may answer (NOT_PRIMARY
        or no answer, attempts left), else wait the backoff; the failover then names the
        target to try next. `failures` collects why each target failed, for the error."""
        failover = self._failover
        error = await self._translate(exc, target)
        not_primary = error.reason == NOT_PRIMARY
        if not (not_primary or error.code in _NO_ANSWER_CODES):
            raise error from exc
        failures[target] = error.message
        step = failover.failed(
            primary=error.metadata.get(PRIMARY_KEY, "") if not_primary else "",
            jitter=random.random(),
        )
        if failover.exhausted:
            if len(failures) == 1:
                raise error from exc
            raise CallcreditError(
                error.reason,
                "; ".join(failures.values()),
                error.code,
                metadata=error.metadata,
            ) from exc
        await asyncio.sleep(step.delay_seconds)

    async def _translate(self, exc: grpc.RpcError, target: str) -> CallcreditError:
        """A failed RPC as the error to raise. A failure with no answer from the server
        (UNAVAILABLE or DEADLINE_EXCEEDED without its status, on a channel that is not
        connected) is diagnosed (callcredit.connect), so the error names the target and
        why it cannot be reached."""
        error = CallcreditError.from_rpc_error(exc)
        if (
            error.code in _NO_ANSWER_CODES
            and self._borrowed is None
            and rpc_status.from_call(exc) is None  # type: ignore[arg-type]
            and self._channel(target).get_state() is not grpc.ChannelConnectivity.READY
        ):
            probe = await diagnose(
                target,
                tls=self._tls,
                ca_file=self._ca_file,
                cert_file=self._cert_file,
                key_file=self._key_file,
            )
            return unreachable_error(target, probe, tls=self._tls)
        if error.code in _TARGET_CODES or error.reason == NOT_PRIMARY:
            return CallcreditError(
                error.reason, f"{target} said: {error.message}", error.code, metadata=error.metadata
            )
        return error

    async def __aenter__(self) -> AdminClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels this client opened; a borrowed channel stays open."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()

    async def create_account(
        self,
        account_id: str,
        *,
        currency: str,
        tariff_id: str,
        credit_limit: int = 0,
        max_concurrent_calls: int = 0,
        low_balance_threshold: int = 0,
    ) -> admin_pb2.Account:
        """Open an account with a zero balance (``ACCOUNT_EXISTS`` if the id is taken).

        ``credit_limit`` 0 keeps it strictly prepaid; ``max_concurrent_calls`` 0 means
        no cap.
        """
        request = admin_pb2.CreateAccountRequest(
            account_id=account_id,
            currency=currency,
            tariff_id=tariff_id,
            credit_limit=credit_limit,
            max_concurrent_calls=max_concurrent_calls,
            low_balance_threshold=low_balance_threshold,
        )
        response: admin_pb2.CreateAccountResponse = await self._call("CreateAccount", request)
        return response.account

    async def get_account(self, account_id: str) -> admin_pb2.Account:
        """Read an account's balance, holds and limits."""
        request = admin_pb2.GetAccountRequest(account_id=account_id)
        response: admin_pb2.GetAccountResponse = await self._call("GetAccount", request)
        return response.account

    async def update_account(
        self,
        account_id: str,
        *,
        status: admin_pb2.AccountStatus.ValueType | None = None,
        tariff_id: str | None = None,
        credit_limit: int | None = None,
        max_concurrent_calls: int | None = None,
        low_balance_threshold: int | None = None,
    ) -> admin_pb2.Account:
        """Change only the fields given; ``None`` leaves a field as it is.

        The request's fields are proto3 ``optional``, so "not given" is sent as unset
        rather than as 0 or "" — which would mean "no cap" or an invalid tariff.
        """
        request = admin_pb2.UpdateAccountRequest(account_id=account_id)
        if status is not None:
            request.status = status
        if tariff_id is not None:
            request.tariff_id = tariff_id
        if credit_limit is not None:
            request.credit_limit = credit_limit
        if max_concurrent_calls is not None:
            request.max_concurrent_calls = max_concurrent_calls
        if low_balance_threshold is not None:
            request.low_balance_threshold = low_balance_threshold
        response: admin_pb2.UpdateAccountResponse = await self._call("UpdateAccount", request)
        return response.account

    async def top_up(
        self,
        account_id: str,
        amount: int,
        *,
        idempotency_key: str,
        reference: str = "",
    ) -> admin_pb2.Account:
        """Add ``amount`` (> 0, minor units) and answer the account after it.

        A repeat with the same key and fields returns the first answer and moves no
        money; the same key with any field different is ``IDEMPOTENCY_KEY_CONFLICT``.
        """
        request = admin_pb2.TopUpRequest(
            account_id=account_id,
            amount=amount,
            idempotency_key=idempotency_key,
            reference=reference,
        )
        response: admin_pb2.TopUpResponse = await self._call("TopUp", request)
        return response.account

    async def adjust(
        self,
        account_id: str,
        amount: int,
        *,
        idempotency_key: str,
        reason: str = "",
    ) -> admin_pb2.Account:
        """Add (``amount`` > 0) or remove (< 0) money and answer the account after it.

        A removal that would make ``available`` negative is ``INSUFFICIENT_FUNDS``.
        Keys are shared with top-ups (same account scope), with the same repeat rules.
        """
        request = admin_pb2.AdjustRequest(
            account_id=account_id,
            amount=amount,
            idempotency_key=idempotency_key,
            reason=reason,
        )
        response: admin_pb2.AdjustResponse = await self._call("Adjust", request)
        return response.account

    async def put_tariff(
        self,
        tariff_id: str,
        currency: str,
        rates: Iterable[RateSpec | admin_pb2.Rate],
    ) -> admin_pb2.Tariff:
        """Create or replace a tariff, whole; open calls keep the rate they reserved."""
        tariff = admin_pb2.Tariff(
            tariff_id=tariff_id,
            currency=currency,
            rates=[rate.to_proto() if isinstance(rate, RateSpec) else rate for rate in rates],
        )
        request = admin_pb2.PutTariffRequest(tariff=tariff)
        response: admin_pb2.PutTariffResponse = await self._call("PutTariff", request)
        return response.tariff

    async def get_tariff(self, tariff_id: str) -> admin_pb2.Tariff:
        """Read a tariff."""
        request = admin_pb2.GetTariffRequest(tariff_id=tariff_id)
        response: admin_pb2.GetTariffResponse = await self._call("GetTariff", request)
        return response.tariff

    async def get_call(self, call_id: str) -> admin_pb2.Call:
        """Read one call, active or ended."""
        request = admin_pb2.GetCallRequest(call_id=call_id)
        response: admin_pb2.GetCallResponse = await self._call("GetCall", request)
        return response.call

    async def list_calls(
        self,
        account_id: str,
        *,
        active_only: bool = False,
        limit: int = 0,
        page_token: str = "",
    ) -> admin_pb2.ListCallsResponse:
        """One page of an account's calls, newest first.

        Answers the whole response because the caller needs ``next_page_token`` (empty
        on the last page) to ask for the next one. ``limit`` 0 lets the server choose.
        """
        request = admin_pb2.ListCallsRequest(
            account_id=account_id,
            active_only=active_only,
            limit=limit,
            page_token=page_token,
        )
        response: admin_pb2.ListCallsResponse = await self._call("ListCalls", request)
        return response

    async def list_accounts(
        self,
        *,
        page_size: int = 0,
        page_token: str = "",
        account_id_prefix: str = "",
        status: admin_pb2.AccountStatus.ValueType = admin_pb2.ACCOUNT_STATUS_UNSPECIFIED,
    ) -> admin_pb2.ListAccountsResponse:
        """One page of accounts in id order (``next_page_token`` empty on the last page),
        only those whose id starts with ``account_id_prefix`` and, unless UNSPECIFIED, of
        ``status``. ``page_size`` 0 lets the server choose."""
        request = admin_pb2.ListAccountsRequest(
            page_size=page_size,
            page_token=page_token,
            account_id_prefix=account_id_prefix,
            status=status,
        )
        response: admin_pb2.ListAccountsResponse = await self._call("ListAccounts", request)
        return response

    async def list_tariffs(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> admin_pb2.ListTariffsResponse:
        """One page of tariffs in id order, without their rates (get_tariff has them)."""
        request = admin_pb2.ListTariffsRequest(page_size=page_size, page_token=page_token)
        response: admin_pb2.ListTariffsResponse = await self._call("ListTariffs", request)
        return response

    async def list_entries(
        self,
        account_id: str,
        *,
        after_entry_id: int = 0,
        limit: int = 0,
        newest_first: bool = False,
    ) -> list[admin_pb2.LedgerEntry]:
        """Ledger entries after ``after_entry_id``: oldest first, or ``newest_first``.

        The next page starts after the last entry returned, so a plain list is all a
        caller needs. ``limit`` 0 lets the server choose.
        """
        request = admin_pb2.ListEntriesRequest(
            account_id=account_id,
            after_entry_id=after_entry_id,
            limit=limit,
            newest_first=newest_first,
        )
        response: admin_pb2.ListEntriesResponse = await self._call("ListEntries", request)
        return list(response.entries)

    async def watch_events(
        self,
        *,
        after: str = "",
        from_end: bool = False,
        account_ids: Sequence[str] = (),
        kinds: Sequence[admin_pb2.EventKind.ValueType] = (),
        since_ms: int | None = None,
        stored_only: bool = False,
    ) -> AsyncGenerator[admin_pb2.WatchEventsResponse]:
        """Follow the changefeed: each response's events, and the ``cursor`` to resume from.

        Never ends by itself and has no deadline. Keep the last ``cursor`` (durably, if
        it must survive a restart) and pass it as ``after`` when reconnecting: nothing
        is missed and nothing repeated. A stream the server cut for reading too slowly
        raises ``CallcreditError`` with ``SLOW_CONSUMER``: reconnect the same way.
        ``since_ms`` (Unix milliseconds) starts at that time instead of a cursor;
        ``stored_only`` ends the stream at the journal's end as of the request.

        Given several targets it follows the primary like every other call: a stream
        refused NOT_PRIMARY or cut without an answer (the primary died, a takeover) is
        opened again on the next target, after the last ``cursor`` received, so nothing
        is missed or repeated across a takeover either.
        """
        request = admin_pb2.WatchEventsRequest(
            after=after,
            from_end=from_end,
            account_ids=account_ids,
            kinds=kinds,
            stored_only=stored_only,
        )
        if since_ms is not None:
            request.since.FromMilliseconds(since_ms)
        failover = self._failover
        failover.reset()
        failures: dict[str, str] = {}  # target -> why it failed last
        while True:
            target = failover.current
            call = self._stub(target).WatchEvents(request, metadata=self._metadata)
            try:
                async for response in call:
                    failover.reset()
                    failures.clear()
                    if response.cursor:  # a reconnection resumes after it
                        request = admin_pb2.WatchEventsRequest(
                            after=response.cursor,
                            account_ids=account_ids,
                            kinds=kinds,
                            stored_only=stored_only,
                        )
                    yield response
                return  # stored_only: the journal's end as of the request
            except grpc.RpcError as exc:
                await self._after_failure(exc, target, failures)
            finally:
                call.cancel()
