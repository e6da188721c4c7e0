"""What the Kamailio adapter decides, without I/O: no sockets, asyncio or clock.

Kamailio holds each initial INVITE and tells the adapter about it, then about the dialog's
start and end, as JSON events; the adapter answers with JSON commands (integrations/
kamailio/kamailio.cfg). Everything here is a function of those messages, the grants and
times given as arguments; the asyncio shell (adapter.py) only moves bytes and waits.

Time. Kamailio stamps a dialog's start and end with its own clock ("sec.usec", $TV(Sn));
talk time is the difference, so it is what a carrier on that dialog measures from the
200 OK to the BYE. Times are integer microseconds here.

Rounding. A started second is billed: talk time is rounded UP to whole seconds
(`talk_seconds`), which is what callcredit is told (used_seconds) and what its tariff's
increments then apply to; a carrier billing per started second and the same increments
charges the same. For that charge never to exceed the grant, the dialog's timeout is
rounded DOWN: Kamailio's dialog timer ticks once a second, so a timeout of T seconds ends
the call between T-1 and T+1 s after it is set; the timeout is therefore the whole
seconds left, less one (`dialog_timeout_seconds`), and the call ends within the grant.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TypeAlias

import orjson

from callcredit_server.core.validation import DESTINATION_PATTERN, is_id

__all__ = [
    "ACCOUNT_HEADER",
    "CALL_ID_PREFIX",
    "EVENT_LATENCY_MARGIN_MICROS",
    "MAX_EVENT_BYTES",
    "MAX_FAILED_LOOKUPS",
    "MAX_SIP_CALL_ID_LENGTH",
    "PROCEED",
    "RECHECK_SECONDS",
    "RECONCILE_GRACE_SECONDS",
    "RING_LIMIT_SECONDS",
    "TICK_SLACK_SECONDS",
    "UNAVAILABLE",
    "CallToken",
    "End",
    "EndOverdue",
    "Event",
    "Failed",
    "Held",
    "NetstringDecoder",
    "Pending",
    "Probe",
    "Recheck",
    "Release",
    "Reserve",
    "SipAnswer",
    "Start",
    "Unheld",
    "answer_command",
    "answer_for_refusal",
    "check_invite",
    "derive_call_id",
    "dialog_timeout_seconds",
    "end_command",
    "ends_call_now",
    "netstring",
    "parse_event",
    "parse_kamailio_time",
    "pending_command",
    "reconcile",
    "talk_seconds",
    "timeout_command",
]

ACCOUNT_HEADER = "X-Callcredit-Account"
"""The header that names the paying account (kamailio.cfg reads it; rename it there)."""

CALL_ID_PREFIX = "sip-"
"""callcredit call_ids made from SIP Call-IDs start with this."""

CALL_ID_HASH_HEX = 40
"""Hex digits of SHA-256 kept in a call_id: 160 bits, so two SIP Call-IDs that meet within
the idempotency window collide with probability ~n^2/2^161 (nil). A SIP Call-ID may be
longer than callcredit's 128-character ids and carry characters they refuse; its hash
never does, and the same Call-ID always gives the same call_id (a restart finds it)."""

MAX_SIP_CALL_ID_LENGTH = 1_024
"""Longer Call-IDs are refused (400); RFC 3261 sets no limit, real ones are < 100."""

MAX_EVENT_BYTES = 65_536
"""Most bytes in one event from Kamailio; a longer netstring breaks the connection."""

MAX_TOKEN_BYTES = 1_024
"""Most bytes in a call token (it rides in a dialog variable)."""

TICK_SLACK_SECONDS = 1
"""Kamailio's dialog timer ticks once a second: a timeout of T ends the call within
(T-1, T+1) s. One second less than what is left keeps the end inside the grant."""

EVENT_LATENCY_MARGIN_MICROS = 200_000
"""Talk time the adapter adds to what its own clock says has passed since it heard the
dialog start: the event took some time to arrive, and an elapsed time counted short
would set a timeout too long."""

RECONCILE_GRACE_SECONDS = 3.0
"""A call whose end was not heard this long after its grant ran out is looked up in
Kamailio (the dialog-end event is sometimes lost)."""

RECHECK_SECONDS = 2.0
"""Look again this long after a lookup found the dialog still there."""

RING_LIMIT_SECONDS = 90.0
"""A call not answered this long after its reserve is looked up in Kamailio (its INVITE
times out after 60 s: fr_inv_timer)."""

MAX_FAILED_LOOKUPS = 30
"""Lookups of one call that may fail (Kamailio unreachable) before it is released as if
its dialog were gone: RECHECK_SECONDS apart, a minute. Nothing is held forever."""

RETRY_AFTER_SECONDS = 5
"""Retry-After on a 503: the authority is unreachable or slow."""


@dataclass(frozen=True, slots=True)
class SipAnswer:
    """A final answer to a held INVITE; code 200 lets it through."""

    code: int
    reason: str
    retry_after_seconds: int = 0


UNAVAILABLE = SipAnswer(503, "Service Unavailable", RETRY_AFTER_SECONDS)
"""Fail closed: the authority did not answer within the bound."""

_BAD_ACCOUNT = SipAnswer(400, f"Missing or Bad {ACCOUNT_HEADER}")
_BAD_DESTINATION = SipAnswer(400, "Bad Destination")
_BAD_CALL_ID = SipAnswer(400, "Bad Call-ID")

PROCEED = SipAnswer(200, "OK")
"""The answer that lets an INVITE through."""

_REFUSALS = {
    "INSUFFICIENT_FUNDS": SipAnswer(402, "Payment Required"),
    "ACCOUNT_SUSPENDED": SipAnswer(403, "Forbidden"),
    "ACCOUNT_CLOSED": SipAnswer(403, "Forbidden"),
    "ACCOUNT_NOT_FOUND": SipAnswer(403, "Forbidden"),
    "NO_RATE_FOR_DESTINATION": SipAnswer(403, "Forbidden"),
    "PERMISSION_DENIED": SipAnswer(403, "Forbidden"),
    "CONCURRENT_CALL_LIMIT": SipAnswer(486, "Busy Here"),
    "INVALID_ARGUMENT": SipAnswer(400, "Bad Request"),
    # The same SIP Call-ID as a call already made (within callcredit's idempotency window).
    "CALL_ID_CONFLICT": SipAnswer(400, "Call-ID Reused"),
    "CALL_ALREADY_ENDED": SipAnswer(400, "Call-ID Reused"),
}


def answer_for_refusal(reason: str) -> SipAnswer:
    """The SIP answer to a refused Reserve. Anything not listed (UNAVAILABLE, a stream
    that failed, a reason newer than this adapter) fails closed with 503."""
    return _REFUSALS.get(reason, UNAVAILABLE)


_NOT_AFTER_HANGUP = frozenset(
    {
        # Talk time reached the grant: Kamailio's own dialog timeout ends the call on
        # time (it was set inside the grant); ending it from here would race it.
        "FINAL_GRANT_REACHED",
        "ALLOWED_SECONDS_REACHED",
        # The adapter released the call or is closing: nothing to end.
        "CALL_RELEASED",
        "CLIENT_CLOSED",
    }
)


def ends_call_now(hangup_reason: str) -> bool:
    """Whether a hang-up the dialer library orders ends the dialog at once: a pushed
    termination (ACCOUNT_SUSPENDED, ADMIN), a refused renewal (CALL_ALREADY_ENDED after
    an expiry) or a failed library do; the end of a grant is Kamailio's to enforce."""
    return hangup_reason not in _NOT_AFTER_HANGUP


def derive_call_id(sip_call_id: str) -> str:
    """The callcredit call_id of a SIP dialog: stable, bounded, a valid id (validation.is_id)."""
    digest = hashlib.sha256(sip_call_id.encode("utf-8", "surrogatepass")).hexdigest()
    return CALL_ID_PREFIX + digest[:CALL_ID_HASH_HEX]


@dataclass(frozen=True, slots=True)
class CallToken:
    """What a restarted adapter needs to take a call up again: the Reserve's fields.
    Kamailio keeps it in the dialog (dialog variable cc_call) and hands it back."""

    call_id: str
    account_id: str
    destination: str
    requested_seconds: int

    def encode(self) -> str:
        return orjson.dumps(
            [self.call_id, self.account_id, self.destination, self.requested_seconds]
        ).decode()

    @classmethod
    def decode(cls, text: str) -> CallToken | None:
        """The token, or None when it is not one this adapter made."""
        if len(text) > MAX_TOKEN_BYTES:
            return None
        try:
            fields = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        if not (isinstance(fields, list) and len(fields) == 4):
            return None
        call_id, account_id, destination, requested = fields
        if not (
            isinstance(call_id, str)
            and isinstance(account_id, str)
            and isinstance(destination, str)
            and type(requested) is int
            and call_id.startswith(CALL_ID_PREFIX)
            and is_id(call_id)
            and is_id(account_id)
            and DESTINATION_PATTERN.fullmatch(destination)
            and 0 <= requested <= 86_400
        ):
            return None
        return cls(call_id, account_id, destination, requested)


# -- events from Kamailio ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reserve:
    """An initial INVITE held until the adapter answers (tindex, tlabel: its transaction)."""

    tindex: int
    tlabel: int
    sip_call_id: str
    ruri_user: str
    account_headers: int
    account: str


@dataclass(frozen=True, slots=True)
class Start:
    """The dialog was answered (200 OK) at `at_micros` (Kamailio's clock)."""

    sip_call_id: str
    at_micros: int
    h_entry: int
    h_id: int
    token: CallToken | None


@dataclass(frozen=True, slots=True)
class Held:
    """An INVITE let through and not yet answered: what Kamailio keeps of it (htable
    cccall) until its start replaces it. Read after a restart, never sent as an event."""

    sip_call_id: str
    token: CallToken | None


@dataclass(frozen=True, slots=True)
class Pending:
    """A Reserve the adapter sent for an INVITE it had not answered yet: what Kamailio
    keeps of it (htable cccall) until the answer replaces it (held) or removes it (a
    refusal). Left there, the adapter died in between. Read after a restart."""

    sip_call_id: str
    token: CallToken | None


@dataclass(frozen=True, slots=True)
class End:
    """A BYE (either side, or Kamailio's own on the timeout) ended the dialog at
    `at_micros`, the first end Kamailio saw (later signals repeat it)."""

    sip_call_id: str
    at_micros: int


@dataclass(frozen=True, slots=True)
class Failed:
    """The INVITE failed downstream (busy, not answered, cancelled): nothing was talked."""

    sip_call_id: str


@dataclass(frozen=True, slots=True)
class Unheld:
    """An answer came too late: the INVITE (tindex, tlabel) was no longer held."""

    tindex: int
    tlabel: int


Event: TypeAlias = Reserve | Start | Held | Pending | End | Failed | Unheld


def parse_kamailio_time(text: str) -> int | None:
    """Kamailio's "sec.usec" ($TV(Sn)) in integer microseconds, or None."""
    seconds, dot, micros = text.partition(".")
    if not (seconds.isdigit() and len(seconds) <= 12 and dot):
        return None
    if not (micros.isdigit() and len(micros) <= 6):
        return None
    return int(seconds) * 1_000_000 + int(micros.ljust(6, "0"))


def parse_event(data: bytes) -> Event | str:
    """An event from Kamailio, or why it is not one (logged, then ignored)."""
    try:
        message = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "not JSON"
    if not isinstance(message, dict):
        return "not a JSON object"
    kind = message.get("event")
    if kind == "unheld":
        tindex, tlabel = message.get("tindex"), message.get("tlabel")
        if type(tindex) is not int or type(tlabel) is not int:
            return "unheld event without tindex or tlabel"
        return Unheld(tindex, tlabel)
    sip_call_id = message.get("sip_call_id")
    if not (isinstance(sip_call_id, str) and sip_call_id):
        return f"{kind} event without a sip_call_id"
    if kind == "reserve":
        tindex, tlabel = message.get("tindex"), message.get("tlabel")
        accounts = message.get("accounts")
        if not (type(tindex) is int and type(tlabel) is int and type(accounts) is int):
            return "reserve event without tindex, tlabel or accounts"
        account = message.get("account", "")
        ruri_user = message.get("ruri_user", "")
        return Reserve(
            tindex,
            tlabel,
            sip_call_id,
            ruri_user if isinstance(ruri_user, str) else "",
            accounts,
            account if isinstance(account, str) else "",
        )
    if kind == "start":
        at = message.get("at")
        at_micros = parse_kamailio_time(at) if isinstance(at, str) else None
        h_entry, h_id = message.get("h_entry"), message.get("h_id")
        if at_micros is None or type(h_entry) is not int or type(h_id) is not int:
            return "start event without at, h_entry or h_id"
        token = message.get("call")
        return Start(
            sip_call_id,
            at_micros,
            h_entry,
            h_id,
            CallToken.decode(token) if isinstance(token, str) else None,
        )
    if kind == "end":
        at = message.get("at")
        at_micros = parse_kamailio_time(at) if isinstance(at, str) else None
        if at_micros is None:
            return "end event without at"
        return End(sip_call_id, at_micros)
    if kind == "failed":
        return Failed(sip_call_id)
    if kind in ("held", "pending"):
        token = message.get("call")
        decoded = CallToken.decode(token) if isinstance(token, str) else None
        return Held(sip_call_id, decoded) if kind == "held" else Pending(sip_call_id, decoded)
    return f"unknown event {kind!r}"


def check_invite(event: Reserve) -> tuple[str, str, str] | SipAnswer:
    """(call_id, account_id, destination) of a held INVITE, or the answer that refuses
    it before callcredit is asked: one account header naming a valid account id, a
    Request-URI user that is a number (E.164 digits, optional +), a bounded Call-ID."""
    if len(event.sip_call_id) > MAX_SIP_CALL_ID_LENGTH:
        return _BAD_CALL_ID
    account = event.account.strip()
    if event.account_headers != 1 or not is_id(account):
        return _BAD_ACCOUNT
    if not DESTINATION_PATTERN.fullmatch(event.ruri_user):
        return _BAD_DESTINATION
    return derive_call_id(event.sip_call_id), account, event.ruri_user


# -- commands to Kamailio ------------------------------------------------------------


def answer_command(
    event: Reserve, answer: SipAnswer, timeout_seconds: int = 0, token: CallToken | None = None
) -> bytes:
    """Release a held INVITE: with `answer` 200 it goes on, its dialog ending itself
    after `timeout_seconds` from the 200 OK; otherwise it gets `answer`."""
    command: dict[str, object] = {
        "cmd": "answer",
        "tindex": event.tindex,
        "tlabel": event.tlabel,
        "code": answer.code,
        "reason": answer.reason,
    }
    if answer.retry_after_seconds:
        command["retry_after"] = answer.retry_after_seconds
    if answer.code == 200:
        if timeout_seconds < 1 or token is None:
            raise ValueError("a call let through needs a timeout and its token")
        command["timeout"] = timeout_seconds
        command["call"] = token.encode()
    return orjson.dumps(command)


def pending_command(sip_call_id: str, token: CallToken) -> bytes:
    """Have Kamailio keep the call's Reserve fields before the Reserve is sent, until
    the INVITE is answered: a restarted adapter releases what a dead one reserved."""
    return orjson.dumps({"cmd": "pending", "sip_call_id": sip_call_id, "call": token.encode()})


def timeout_command(h_entry: int, h_id: int, timeout_seconds: int) -> bytes:
    """Move a live dialog's end to `timeout_seconds` from now."""
    if timeout_seconds < 1:
        raise ValueError("a dialog timeout is at least 1 s; end the dialog instead")
    return orjson.dumps(
        {"cmd": "timeout", "h_entry": h_entry, "h_id": h_id, "seconds": timeout_seconds}
    )


def end_command(sip_call_id: str, h_entry: int, h_id: int, reason: str) -> bytes:
    """End a live dialog now, BYE both ways, each with `X-Callcredit-Reason: reason`.
    Kamailio runs the dlg.end_dlg request inside under the Call-ID's lock (kamailio.cfg,
    route CC_END_DIALOG), so that both BYEs go out (a JSON-RPC from here would not)."""
    rpc = {
        "jsonrpc": "2.0",
        "method": "dlg.end_dlg",
        "params": [h_entry, h_id, f"X-Callcredit-Reason: {reason}\r\n"],
        "id": 1,
    }
    return orjson.dumps(
        {"cmd": "end", "sip_call_id": sip_call_id, "rpc": orjson.dumps(rpc).decode()}
    )


# -- time ----------------------------------------------------------------------------


def talk_seconds(start_micros: int, end_micros: int) -> int:
    """Talk time to report: from answer to end, every started second counted."""
    talked = end_micros - start_micros
    if talked <= 0:
        return 0
    return -(-talked // 1_000_000)


def dialog_timeout_seconds(allowed_seconds: int, talked_micros: int) -> int:
    """The dialog timeout that ends a call within its grant, counted from now, when
    `talked_micros` have been talked (never counted short: the caller adds what it
    cannot see, such as event latency). The seconds left, rounded down, less the timer's
    tick. Below 1 the call must end now."""
    left_micros = allowed_seconds * 1_000_000 - talked_micros
    if left_micros <= 0:
        return 0
    return left_micros // 1_000_000 - TICK_SLACK_SECONDS


# -- reconciliation ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Probe:
    """What Kamailio says of a call whose end the adapter has not heard."""

    ended_at_micros: int | None
    """The end Kamailio recorded (htable ccend), if any."""
    dialog_open: bool
    """The dialog is still listed and not terminated (dlg.dlg_list)."""


@dataclass(frozen=True, slots=True)
class Release:
    """Release the call with this talk time."""

    used_seconds: int


@dataclass(frozen=True, slots=True)
class Recheck:
    """The call is still going: look again later."""


@dataclass(frozen=True, slots=True)
class EndOverdue:
    """The dialog is still open with its grant used up (Kamailio's timeout did not end
    it): end it now, then look again."""


def reconcile(
    start_micros: int | None,
    allowed_seconds: int,
    probe: Probe | None,
    failed_lookups: int,
    talked_micros: int,
) -> Release | Recheck | EndOverdue:
    """Decide on a call whose end was not heard, from what Kamailio says of it (`probe`,
    None when the lookup failed, for the `failed_lookups`-th time in a row) and the
    talk time so far by the adapter's clock (`talked_micros`, counted never short).

    An end Kamailio recorded wins. An open dialog goes on while its grant lasts (its
    timeout is set); one open past its grant is ended (its timeout never fired, or its
    BYE went nowhere: the adapter does not let it talk on unpaid). A dialog that is gone
    without a recorded end cannot happen through kamailio.cfg (every BYE is recorded);
    it is released at its grant, the longest it can have lasted, rather than left to
    expire (charged the same, but held until its validity ran out). So is a call
    Kamailio could not be asked about for MAX_FAILED_LOOKUPS lookups."""
    if probe is None:
        if failed_lookups < MAX_FAILED_LOOKUPS:
            return Recheck()
        probe = Probe(None, dialog_open=False)
    if probe.ended_at_micros is not None:
        if start_micros is None:
            return Release(0)
        return Release(talk_seconds(start_micros, probe.ended_at_micros))
    if probe.dialog_open:
        if start_micros is not None and talked_micros >= allowed_seconds * 1_000_000:
            return EndOverdue()
        return Recheck()
    return Release(0 if start_micros is None else allowed_seconds)


# -- framing -------------------------------------------------------------------------


def netstring(payload: bytes) -> bytes:
    """One evapi message: `<length>:<payload>,`."""
    return b"%d:%s," % (len(payload), payload)


class NetstringDecoder:
    """Split evapi's byte stream into messages. `broken` says why the stream cannot be
    read any further (the connection must be dropped); messages are bounded by
    MAX_EVENT_BYTES."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.broken: str | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self.broken is not None:
            return []
        buffer = self._buffer
        buffer += data
        messages: list[bytes] = []
        while buffer:
            colon = buffer.find(b":", 0, 8)
            if colon < 0:
                if len(buffer) >= 8 or not buffer.isdigit():
                    self.broken = "bad netstring length"
                break
            length_text = bytes(buffer[:colon])
            if not length_text.isdigit():
                self.broken = "bad netstring length"
                break
            length = int(length_text)
            if length > MAX_EVENT_BYTES:
                self.broken = f"netstring of {length} bytes (limit {MAX_EVENT_BYTES})"
                break
            end = colon + 1 + length
            if len(buffer) < end + 1:
                break
            if buffer[end] != ord(","):
                self.broken = "netstring without its trailing comma"
                break
            messages.append(bytes(buffer[colon + 1 : end]))
            del buffer[: end + 1]
        return messages
