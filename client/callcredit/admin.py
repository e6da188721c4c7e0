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

from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_status import rpc_status

from callcredit.connect import diagnose, unreachable_error
from callcredit.errors import CallcreditError
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

_NO_ANSWER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# Refusals of the connection itself (no token, the wrong one): the message says which
# server refused, since the same token may work elsewhere.
_TARGET_CODES = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

_R = TypeVar("_R")


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
    TLS as ``tls``/``ca_file``/``cert_file``/``key_file`` say, and closes it) or from an
    existing ``grpc.aio.Channel`` (custom options; the caller keeps ownership and closes
    it). ``token`` goes with every RPC either way. Each RPC gets a deadline of
    ``timeout_seconds``, connecting included: an admin call that cannot be answered
    should fail, not hang. One that cannot reach the server fails at once (a refused
    connection) or at the deadline, with an error naming the target and the cause.
    """

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS,
        token: str | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        check_tls_options(target, tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        self._owns_channel = isinstance(target, str)
        self._target = target
        self._target_text = target if isinstance(target, str) else "the server"
        self._tls = bool(tls or ca_file or cert_file or key_file)
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        self._channel: grpc.aio.Channel = (
            open_channel(target, tls=tls, ca_file=ca_file, cert_file=cert_file, key_file=key_file)
            if isinstance(target, str)
            else target
        )
        self._metadata = token_metadata(token)
        # Not annotated: with grpc's type stubs this infers AdminServiceAsyncStub;
        # without them grpc is untyped and each RPC answers Any, which the annotated
        # ``response`` variables below turn back into the proto types.
        self._stub = admin_pb2_grpc.AdminServiceStub(self._channel)
        self._timeout_seconds = timeout_seconds

    async def _call(self, rpc: Callable[..., Awaitable[_R]], request: Message) -> _R:
        """Send one RPC; a failure becomes a CallcreditError: the one translation boundary.

        A failure with no answer from the server (UNAVAILABLE or DEADLINE_EXCEEDED without
        its status, on a channel that is not connected) is diagnosed (callcredit.connect)
        so the error names the target and why it cannot be reached.
        """
        try:
            response: _R = await rpc(
                request, timeout=self._timeout_seconds, metadata=self._metadata
            )
            return response
        except grpc.RpcError as exc:
            error = CallcreditError.from_rpc_error(exc)
            if (
                error.code in _NO_ANSWER_CODES
                and isinstance(self._target, str)
                and rpc_status.from_call(exc) is None  # type: ignore[arg-type]
                and self._channel.get_state() is not grpc.ChannelConnectivity.READY
            ):
                probe = await diagnose(
                    self._target,
                    tls=self._tls,
                    ca_file=self._ca_file,
                    cert_file=self._cert_file,
                    key_file=self._key_file,
                )
                raise unreachable_error(self._target, probe, tls=self._tls) from exc
            if error.code in _TARGET_CODES:
                raise CallcreditError(
                    error.reason, f"{self._target_text} said: {error.message}", error.code
                ) from exc
            raise error from exc

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
        """Close the channel if this client opened it; a borrowed channel stays open."""
        if self._owns_channel:
            await self._channel.close()

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
        response: admin_pb2.CreateAccountResponse = await self._call(
            self._stub.CreateAccount, request
        )
        return response.account

    async def get_account(self, account_id: str) -> admin_pb2.Account:
        """Read an account's balance, holds and limits."""
        request = admin_pb2.GetAccountRequest(account_id=account_id)
        response: admin_pb2.GetAccountResponse = await self._call(self._stub.GetAccount, request)
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
        response: admin_pb2.UpdateAccountResponse = await self._call(
            self._stub.UpdateAccount, request
        )
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
        response: admin_pb2.TopUpResponse = await self._call(self._stub.TopUp, request)
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
        response: admin_pb2.AdjustResponse = await self._call(self._stub.Adjust, request)
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
        response: admin_pb2.PutTariffResponse = await self._call(self._stub.PutTariff, request)
        return response.tariff

    async def get_tariff(self, tariff_id: str) -> admin_pb2.Tariff:
        """Read a tariff."""
        request = admin_pb2.GetTariffRequest(tariff_id=tariff_id)
        response: admin_pb2.GetTariffResponse = await self._call(self._stub.GetTariff, request)
        return response.tariff

    async def get_call(self, call_id: str) -> admin_pb2.Call:
        """Read one call, active or ended."""
        request = admin_pb2.GetCallRequest(call_id=call_id)
        response: admin_pb2.GetCallResponse = await self._call(self._stub.GetCall, request)
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
        response: admin_pb2.ListCallsResponse = await self._call(self._stub.ListCalls, request)
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
        response: admin_pb2.ListAccountsResponse = await self._call(
            self._stub.ListAccounts, request
        )
        return response

    async def list_tariffs(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> admin_pb2.ListTariffsResponse:
        """One page of tariffs in id order, without their rates (get_tariff has them)."""
        request = admin_pb2.ListTariffsRequest(page_size=page_size, page_token=page_token)
        response: admin_pb2.ListTariffsResponse = await self._call(self._stub.ListTariffs, request)
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
        response: admin_pb2.ListEntriesResponse = await self._call(self._stub.ListEntries, request)
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
        call = self._stub.WatchEvents(request, metadata=self._metadata)
        try:
            async for response in call:
                yield response
        except grpc.RpcError as exc:
            raise CallcreditError.from_rpc_error(exc) from exc
        finally:
            call.cancel()
