"""The asyncio shell of the Kamailio adapter: evapi events in, commands and JSON-RPC out,
callcredit through one DialerClient. Every decision is in decisions.py.

    Kamailio --(evapi TCP, netstrings)--> Adapter --(DialerClient)--> callcredit
    Kamailio <--(evapi: answer, timeout, end)-- Adapter
    Kamailio <--(JSON-RPC over UDP: dlg.dlg_list, htable.*)-- Adapter

One adapter serves one Kamailio (evapi sends every event to every connected client: two
adapters would each reserve every call).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

import orjson

from callcredit.dialer import DialerCall, DialerClient, Grant
from callcredit.errors import CallcreditError
from callcredit_server.kamailio.decisions import (
    EVENT_LATENCY_MARGIN_MICROS,
    PROCEED,
    RECHECK_SECONDS,
    RECONCILE_GRACE_SECONDS,
    RING_LIMIT_SECONDS,
    UNAVAILABLE,
    CallToken,
    End,
    EndOverdue,
    Failed,
    Held,
    NetstringDecoder,
    Pending,
    Probe,
    Recheck,
    Reserve,
    SipAnswer,
    Start,
    Unheld,
    answer_command,
    answer_for_refusal,
    check_invite,
    dialog_timeout_seconds,
    end_command,
    ends_call_now,
    netstring,
    parse_event,
    parse_kamailio_time,
    pending_command,
    reconcile,
    talk_seconds,
    timeout_command,
)

__all__ = ["MAX_CALLS", "Adapter", "RpcClient", "RpcError"]

logger = logging.getLogger(__name__)

MAX_CALLS = 10_000
"""Calls the adapter follows at once (held, ringing or talking); more INVITEs get 503."""

RPC_TIMEOUT_SECONDS = 1.0
"""Wait this long for a JSON-RPC answer before sending the request again."""

RPC_ATTEMPTS = 3
"""Sends of one JSON-RPC request (UDP: a datagram can be lost)."""

MAX_RPC_PENDING = 1_024
"""JSON-RPC requests awaiting answers at once; more wait for a free slot."""

RPC_MAX_DATAGRAM_BYTES = 65_507
"""A JSON-RPC answer must fit in one UDP datagram (jsonrpcs): an htable dump of a few
hundred calls does; see docs/telephony.md."""

CONNECT_RETRY_SECONDS = 0.5
"""Wait between attempts to connect to Kamailio's evapi socket."""


class RpcError(Exception):
    """Kamailio's JSON-RPC answered with an error, or did not answer."""


class RpcClient(asyncio.DatagramProtocol):
    """JSON-RPC 2.0 over UDP to Kamailio's jsonrpcs (modparam dgram_socket)."""

    def __init__(self) -> None:
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._slots = asyncio.Semaphore(MAX_RPC_PENDING)

    @classmethod
    async def open(cls, host: str, port: int) -> RpcClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_datagram_endpoint(cls, remote_addr=(host, port))
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            logger.warning("kamailio: JSON-RPC answer is not JSON")
            return
        if not isinstance(answer, dict):
            return
        future = self._pending.get(answer.get("id"))  # type: ignore[arg-type]
        if future is not None and not future.done():
            future.set_result(answer)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: Kamailio's RPC socket is not there. Attempts time out.
        logger.debug("kamailio: JSON-RPC socket error: %s", exc)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    async def call(self, method: str, *params: object) -> Any:
        """The result of `method(*params)`; RpcError when refused or unanswered."""
        async with self._slots:
            request_id = next(self._ids)
            request = orjson.dumps(
                {"jsonrpc": "2.0", "method": method, "params": list(params), "id": request_id}
            )
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending[request_id] = future
            try:
                for _ in range(RPC_ATTEMPTS):
                    if self._transport is None or self._transport.is_closing():
                        break
                    self._transport.sendto(request)
                    try:
                        answer = await asyncio.wait_for(asyncio.shield(future), RPC_TIMEOUT_SECONDS)
                    except TimeoutError:
                        continue
                    if "error" in answer:
                        raise RpcError(f"{method}: {answer['error']}")
                    return answer.get("result")
            finally:
                del self._pending[request_id]
        raise RpcError(f"{method}: no answer from Kamailio")


@dataclass(slots=True, eq=False)
class _Call:
    """A call the adapter follows, from its held INVITE to its release."""

    sip_call_id: str
    token: CallToken
    dialer: DialerCall | None = None
    """The callcredit call; None until the Reserve is answered."""
    start_micros: int | None = None
    """Answer time on Kamailio's clock; None while ringing."""
    started_seen_at: float = 0.0
    """Loop time when the adapter heard of the answer."""
    h_entry: int = 0
    h_id: int = 0
    timed_allowed_seconds: int = 0
    """The allowed_seconds that Kamailio's dialog timeout enforces now."""
    end_on_start: bool = False
    """A termination came while ringing: end the dialog as soon as it starts."""
    early_start: tuple[Start, float] | None = None
    """A start heard while the call was being taken up (its Reserve not yet answered),
    and the loop time it was heard."""
    done: bool = False
    failed_lookups: int = 0
    watchdog: asyncio.TimerHandle | None = None


class Adapter:
    """Connects Kamailio's events to callcredit's grants. Run with `await adapter.run()`."""

    def __init__(
        self,
        dialer: DialerClient,
        rpc: RpcClient,
        events: tuple[str, int],
        *,
        reserve_timeout_seconds: float,
        requested_seconds: int = 0,
    ) -> None:
        self._dialer = dialer
        self._rpc = rpc
        self._events = events
        self._reserve_timeout = reserve_timeout_seconds
        self._requested_seconds = requested_seconds
        self._calls: dict[str, _Call] = {}  # by SIP Call-ID
        self._by_call_id: dict[str, _Call] = {}  # by callcredit call_id
        self._held: dict[tuple[int, int], _Call] = {}  # answered INVITEs not yet started
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- the connection to Kamailio ------------------------------------------------

    async def run(self) -> None:
        """Stay connected to Kamailio's evapi socket, serving its events, until cancelled."""
        host, port = self._events
        while True:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as err:
                logger.debug("kamailio events %s:%d: %s", host, port, err)
                await asyncio.sleep(CONNECT_RETRY_SECONDS)
                continue
            logger.info("connected to kamailio events at %s:%d", host, port)
            self._writer = writer
            events_socket = writer.get_extra_info("socket")
            events_socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._adopt())
            decoder = NetstringDecoder()
            try:
                while data := await reader.read(65_536):
                    _quick_ack(events_socket)
                    for message in decoder.feed(data):
                        self._dispatch(message)
                    if decoder.broken is not None:
                        logger.error("kamailio events: %s; reconnecting", decoder.broken)
                        break
            except OSError as err:
                logger.warning("kamailio events: %s", err)
            finally:
                self._writer = None
                writer.close()
            logger.warning("kamailio events connection lost; reconnecting")
            await asyncio.sleep(CONNECT_RETRY_SECONDS)

    def _send(self, command: bytes) -> bool:
        writer = self._writer
        if writer is None or writer.is_closing():
            return False
        writer.write(netstring(command))
        return True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("kamailio adapter task failed", exc_info=task.exception())

    def _dispatch(self, message: bytes) -> None:
        event = parse_event(message)
        if isinstance(event, str):
            logger.warning("kamailio event ignored: %s", event)
        elif isinstance(event, Reserve):
            self._spawn(self._on_reserve(event))
        elif isinstance(event, Start):
            self._on_start(event)
        elif isinstance(event, End):
            self._on_end(event)
        elif isinstance(event, Failed):
            call = self._calls.get(event.sip_call_id)
            if call is not None and call.start_micros is None:
                self._finish(call, 0)
        elif isinstance(event, Unheld):
            held = self._held.pop((event.tindex, event.tlabel), None)
            if held is not None:
                self._finish(held, 0)

    # -- events --------------------------------------------------------------------

    async def _on_reserve(self, event: Reserve) -> None:
        checked = check_invite(event)
        if isinstance(checked, SipAnswer):
            self._send(answer_command(event, checked))
            return
        call_id, account_id, destination = checked
        if event.sip_call_id in self._calls or len(self._calls) >= MAX_CALLS:
            self._send(answer_command(event, UNAVAILABLE))
            return
        token = CallToken(call_id, account_id, destination, self._requested_seconds)
        call = _Call(event.sip_call_id, token)
        self._track(call)
        self._send(pending_command(event.sip_call_id, token))
        try:
            async with asyncio.timeout(self._reserve_timeout):
                handle = await self._reserve(token)
        except CallcreditError as err:
            self._untrack(call)
            logger.info("call %s refused: %s", call_id, err.reason)
            self._send(answer_command(event, answer_for_refusal(err.reason)))
            return
        except TimeoutError:
            # The library releases the call in the background if the Reserve went out.
            self._untrack(call)
            logger.warning("call %s: callcredit did not answer in time", call_id)
            self._send(answer_command(event, UNAVAILABLE))
            return
        call.dialer = handle
        allowed = handle.grant.allowed_seconds
        timeout = dialog_timeout_seconds(allowed, 0)
        if timeout < 1:
            # A grant shorter than the timer's tick cannot be enforced: refuse the call.
            self._send(answer_command(event, answer_for_refusal("INSUFFICIENT_FUNDS")))
            self._finish(call, 0)
            return
        call.timed_allowed_seconds = allowed
        if not self._send(answer_command(event, PROCEED, timeout, token)):
            self._finish(call, 0)  # Kamailio is gone: its INVITE gets 503 there
            return
        self._held[(event.tindex, event.tlabel)] = call
        self._watch(call, RING_LIMIT_SECONDS)

    async def _reserve(self, token: CallToken) -> DialerCall:
        return await self._dialer.reserve(
            token.call_id,
            token.account_id,
            token.destination,
            token.requested_seconds,
            on_hangup=self._on_hangup,
            on_grant=self._on_grant,
        )

    def _on_start(self, event: Start, seen_at: float | None = None) -> None:
        call = self._calls.get(event.sip_call_id)
        if call is None:
            if event.token is not None:  # answered while this adapter was not running
                self._spawn(self._reattach(event))
            return
        loop_time = asyncio.get_running_loop().time()
        if call.dialer is None:
            call.early_start = (event, loop_time)  # being taken up: goes on once reserved
            return
        if call.start_micros is not None:
            return
        for key, held in list(self._held.items()):
            if held is call:
                del self._held[key]
        call.start_micros = event.at_micros
        call.started_seen_at = loop_time if seen_at is None else seen_at
        call.h_entry, call.h_id = event.h_entry, event.h_id
        call.dialer.answered(ago_seconds=loop_time - call.started_seen_at)
        if call.end_on_start:
            self._end_dialog(call, call.dialer.hangup_reason or "TERMINATED")
            return
        self._retime(call)

    def _on_end(self, event: End) -> None:
        call = self._calls.get(event.sip_call_id)
        if call is None or call.done or call.start_micros is None or call.dialer is None:
            return
        self._finish(call, talk_seconds(call.start_micros, event.at_micros))

    def _on_grant(self, handle: DialerCall, grant: Grant) -> None:
        call = self._by_call_id.get(handle.call_id)
        if call is not None and not call.done and call.start_micros is not None:
            self._retime(call)

    def _on_hangup(self, handle: DialerCall, reason: str) -> None:
        call = self._by_call_id.get(handle.call_id)
        if call is None or call.done or not ends_call_now(reason):
            return
        if call.start_micros is None:
            call.end_on_start = True
        else:
            self._end_dialog(call, reason)

    # -- enforcement ---------------------------------------------------------------

    def _talked_micros(self, call: _Call) -> int:
        """Talk time so far, never counted short: the adapter's clock since it heard of
        the answer, plus what the event may have taken to arrive."""
        seen = asyncio.get_running_loop().time() - call.started_seen_at
        return int(seen * 1_000_000) + EVENT_LATENCY_MARGIN_MICROS

    def _retime(self, call: _Call) -> None:
        """Make Kamailio's dialog timeout follow the call's grant."""
        assert call.dialer is not None and call.start_micros is not None
        allowed = call.dialer.grant.allowed_seconds
        if allowed != call.timed_allowed_seconds:
            timeout = dialog_timeout_seconds(allowed, self._talked_micros(call))
            if timeout < 1:
                self._end_dialog(call, "ALLOWED_SECONDS_REACHED")
                return
            if self._send(timeout_command(call.h_entry, call.h_id, timeout)):
                call.timed_allowed_seconds = allowed
                logger.info("call %s: dialog ends in %d s", call.token.call_id, timeout)
        # The look-up is due a grace after the grant runs out, however often grants come
        # (renewals that add nothing go on answering after it ran out): never pushed later.
        left = allowed - (asyncio.get_running_loop().time() - call.started_seen_at)
        self._watch(call, max(left + RECONCILE_GRACE_SECONDS, 0.0))

    def _end_dialog(self, call: _Call, reason: str) -> None:
        logger.info("call %s: ending its dialog (%s)", call.token.call_id, reason)
        self._send_end(call, reason)
        self._watch(call, RECONCILE_GRACE_SECONDS)

    def _send_end(self, call: _Call, reason: str) -> None:
        if not self._send(end_command(call.sip_call_id, call.h_entry, call.h_id, reason)):
            logger.warning("call %s: kamailio gone, dialog not ended", call.token.call_id)

    # -- ends, lost or not ---------------------------------------------------------

    def _watch(self, call: _Call, delay_seconds: float) -> None:
        """Look the call up in Kamailio after `delay_seconds` unless it ends first."""
        if call.watchdog is not None:
            call.watchdog.cancel()
        call.watchdog = asyncio.get_running_loop().call_later(
            delay_seconds, lambda: self._spawn(self._look_up(call))
        )

    async def _look_up(self, call: _Call) -> None:
        if call.done:
            return
        probe: Probe | None
        try:
            ended_at = await self._recorded_end(call.sip_call_id)
            found = await self._rpc.call("dlg.dlg_list", call.sip_call_id)
        except RpcError as err:
            call.failed_lookups += 1
            logger.warning("call %s: lookup failed: %s", call.token.call_id, err)
            probe = None
        else:
            call.failed_lookups = 0
            probe = Probe(ended_at, _dialog_open(found))
        if call.done:
            return
        allowed = call.dialer.grant.allowed_seconds if call.dialer is not None else 0
        talked = 0 if call.start_micros is None else self._talked_micros(call)
        decision = reconcile(call.start_micros, allowed, probe, call.failed_lookups, talked)
        if isinstance(decision, Recheck):
            self._watch(call, RECHECK_SECONDS)
        elif isinstance(decision, EndOverdue):
            logger.warning(
                "call %s: dialog still open %.1f s into a %d s grant; ending it",
                call.token.call_id,
                talked / 1_000_000,
                allowed,
            )
            self._end_dialog(call, "ALLOWED_SECONDS_REACHED")
        else:
            logger.warning(
                "call %s: end not heard; released with %d s",
                call.token.call_id,
                decision.used_seconds,
            )
            self._finish(call, decision.used_seconds)

    async def _recorded_end(self, sip_call_id: str) -> int | None:
        try:
            result = await self._rpc.call("htable.get", "ccend", sip_call_id)
        except RpcError as err:
            if "doesn't exist" in str(err):
                return None
            raise
        value = result.get("item", {}).get("value") if isinstance(result, dict) else None
        return parse_kamailio_time(value) if isinstance(value, str) else None

    def _finish(self, call: _Call, used_seconds: int) -> None:
        """The call is over: stop following it and release it with its talk time."""
        if call.done:
            return
        call.done = True
        if call.watchdog is not None:
            call.watchdog.cancel()
        self._untrack(call)
        if call.dialer is not None:
            self._spawn(self._release(call, call.dialer, used_seconds))

    async def _release(self, call: _Call, handle: DialerCall, used_seconds: int) -> None:
        try:
            try:
                result = await handle.release(used_seconds)
            except ValueError:
                # A renewal reported more than Kamailio measured (clocks a hair apart).
                result = await handle.release()
        except CallcreditError as err:
            logger.warning("call %s: release refused: %s", handle.call_id, err)
        else:
            logger.info(
                "call %s released: used %d s, charged %d, balance %d",
                handle.call_id,
                result.used_seconds,
                result.charged,
                result.balance,
            )
        await self._forget_kept(call.sip_call_id)

    async def _forget_kept(self, sip_call_id: str) -> None:
        """Delete what Kamailio keeps of a call."""
        for table in ("cccall", "ccend"):
            # Not there (never started), or Kamailio gone: the entry expires anyway.
            with contextlib.suppress(RpcError):
                await self._rpc.call("htable.delete", table, sip_call_id)

    def _track(self, call: _Call) -> None:
        self._calls[call.sip_call_id] = call
        self._by_call_id[call.token.call_id] = call

    def _untrack(self, call: _Call) -> None:
        if self._calls.get(call.sip_call_id) is call:
            del self._calls[call.sip_call_id]
        if self._by_call_id.get(call.token.call_id) is call:
            del self._by_call_id[call.token.call_id]
        for key, held in list(self._held.items()):
            if held is call:
                del self._held[key]

    # -- after a restart -----------------------------------------------------------

    async def _adopt(self) -> None:
        """Take up the calls Kamailio has started that this adapter does not follow
        (it was restarted, or was cut off from Kamailio): re-attach the live ones, release
        the ended ones. Kamailio keeps each started call's start event (htable cccall)
        until the adapter that released it deletes it."""
        try:
            dump = await self._rpc.call("htable.dump", "cccall")
        except RpcError as err:
            logger.warning("kamailio: cannot list started calls: %s", err)
            return
        adopted = 0
        for entry in dump if isinstance(dump, list) else []:
            for slot in entry.get("slot", []) if isinstance(entry, dict) else []:
                value = slot.get("value") if isinstance(slot, dict) else None
                if not isinstance(value, str):
                    continue
                event = parse_event(value.encode())
                if not isinstance(event, Start | Held | Pending):
                    continue
                if event.sip_call_id in self._calls:
                    continue
                adopted += 1
                if isinstance(event, Start):
                    self._spawn(self._reattach(event))
                elif isinstance(event, Held):
                    self._spawn(self._reattach_ringing(event))
                else:
                    self._spawn(self._release_pending(event))
        if adopted:
            logger.info("kamailio: taking up %d calls started before", adopted)

    async def _release_pending(self, event: Pending) -> None:
        """Release, with 0, a call whose Reserve a dead adapter sent and never answered
        (Kamailio answered its INVITE 503): the same Reserve again returns it if
        callcredit made it (or makes it, if the Reserve never arrived), and nothing
        stays held until its validity runs out."""
        token = event.token
        if token is None or event.sip_call_id in self._calls:
            return
        call = _Call(event.sip_call_id, token)
        self._track(call)
        try:
            call.dialer = await self._reserve(token)
        except CallcreditError as err:
            self._untrack(call)
            logger.info("call %s: nothing to release: %s", token.call_id, err.reason)
            await self._forget_kept(event.sip_call_id)
            return
        logger.info("call %s: reserved by an adapter that died; released free", token.call_id)
        self._finish(call, 0)

    async def _reattach_ringing(self, event: Held) -> None:
        """Take up a call let through but not answered when it was last seen: it may
        ring still, have failed, or have been answered since."""
        token = event.token
        if token is None or event.sip_call_id in self._calls:
            return
        call = _Call(event.sip_call_id, token)
        self._track(call)
        try:
            handle = await self._reserve(token)
        except CallcreditError as err:
            self._untrack(call)
            logger.warning("call %s: cannot take it up: %s", token.call_id, err.reason)
            return
        call.dialer = handle
        if call.early_start is not None:
            self._on_start(*call.early_start)  # answered while it was being reserved
            return
        try:
            kept = await self._rpc.call("htable.get", "cccall", event.sip_call_id)
        except RpcError:
            kept = None
        value = kept.get("item", {}).get("value") if isinstance(kept, dict) else None
        now_kept = parse_event(value.encode()) if isinstance(value, str) else None
        if isinstance(now_kept, Start) and call.start_micros is None:
            # Answered between the dump and now: take it up as a talking call.
            self._untrack(call)
            call.done = True
            self._spawn(self._reattach(now_kept, handle))
            return
        # Still ringing or failed: the lookup finds out (released with 0 once its
        # dialog is gone), and a start heard meanwhile takes it over.
        self._watch(call, 0.0)

    async def _reattach(self, event: Start, handle: DialerCall | None = None) -> None:
        token = event.token
        if token is None or event.sip_call_id in self._calls:
            return
        call = _Call(event.sip_call_id, token, h_entry=event.h_entry, h_id=event.h_id)
        self._track(call)
        try:
            # The same Reserve again returns the call's current grant while it is open.
            if handle is None:
                handle = await self._reserve(token)
        except CallcreditError as err:
            self._untrack(call)
            logger.warning("call %s: cannot take it up: %s", token.call_id, err.reason)
            if err.reason == "CALL_ALREADY_ENDED":
                # Released before (nothing more to do) or expired: then it is unpaid talk.
                self._send_end(call, err.reason)
            return
        call.dialer = handle
        call.start_micros = event.at_micros
        try:
            ended_at = await self._recorded_end(event.sip_call_id)
        except RpcError:
            ended_at = None
        if ended_at is not None:
            # Ended meanwhile: released with its talk time, before the library's talk
            # clock (started by answered()) could report more in a renewal.
            self._finish(call, talk_seconds(event.at_micros, ended_at))
            return
        talked_micros = max(time.time_ns() // 1_000 - event.at_micros, 0)
        call.started_seen_at = asyncio.get_running_loop().time() - talked_micros / 1_000_000
        handle.answered(ago_seconds=talked_micros / 1_000_000)
        logger.info("call %s: taken up after %d ms of talk", token.call_id, talked_micros // 1000)
        self._retime(call)


def _quick_ack(sock: socket.socket) -> None:
    """Acknowledge Kamailio's next event at once (Linux: TCP_QUICKACK, which the kernel
    clears again, so it is re-armed after every read). Kamailio's evapi socket does not
    disable Nagle: an event written while the one before it is unacknowledged waits for
    the ACK, and a delayed ACK (up to 40 ms) would hold up the INVITE behind it."""
    if hasattr(socket, "TCP_QUICKACK"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _dialog_open(found: Any) -> bool:
    """Whether dlg.dlg_list found the dialog, not yet terminated (state 5)."""
    dialogs = found if isinstance(found, list) else [found]
    return any(isinstance(d, dict) and d.get("state", 5) != 5 for d in dialogs)
