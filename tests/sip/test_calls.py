"""Live SIP calls through Kamailio, limited by callcredit (issue 10, part 3).

Each test runs callcredit-server, callcredit-kamailio, Kamailio (integrations/kamailio/
kamailio.cfg) and SIPp (dialer and carrier) on loopback. Grants are 5 s, billing is one
unit per second in 1 s increments, so "one increment" is one second. Talk time is what
the SIPp dialer measured.
"""

from __future__ import annotations

import asyncio
import socket
import time

from callcredit.admin import AdminClient
from callcredit.v1 import admin_pb2
from callcredit_server.kamailio.decisions import (
    RECONCILE_GRACE_SECONDS,
    netstring,
    timeout_command,
)
from tests.sip.conftest import GRANT_SECONDS, Authority
from tests.sip.lab import (
    CarrierLeg,
    Lab,
    assert_billed,
    assert_billed_seconds,
    assert_ledger,
    call_id,
    calls_of,
    funded,
    rpc,
    settled,
    stop,
)

INCREMENT_MS = 1_000

TIMEOUT_ROUNDS = 4
TIMEOUT_CALLS = 40
"""Calls ending on their dialog timeout in the same tick, per round. Before kamailio.cfg
serialized the two BYEs, 40 lost at least one callee BYE by the second round in each of
three runs (1 to 6 of 40); 10 or 20 a round missed it one run in three."""


async def test_a_single_call_talks_its_credit_and_is_charged_exactly(
    lab: Lab, admin: AdminClient
) -> None:
    await funded(admin, "solo", 20)

    dial = lab.dial("solo", calls=1, talk_seconds=60).wait(timeout_seconds=40)

    [record] = dial.answered
    assert record.ended_by_proxy
    assert record.talk_ms <= 20_000 + INCREMENT_MS
    assert record.talk_ms >= 17_000  # the credit is used, not cut short by seconds
    account = await settled(admin, "solo")
    [(sip_call_id, _)] = dial.calls.items()
    calls = await calls_of(admin, "solo")
    assert_billed(calls[call_id(sip_call_id)], record)
    assert account.reserved == 0
    assert account.balance == 20 - calls[call_id(sip_call_id)].charged
    await assert_ledger(admin, account)


async def test_calls_starting_together_share_the_credit_and_the_rest_get_402(
    lab: Lab, admin: AdminClient
) -> None:
    await funded(admin, "crowd", 20)

    dial = lab.dial("crowd", calls=20, talk_seconds=30).wait(timeout_seconds=40)

    answered = dial.answered
    assert len(dial.calls) == 20
    assert len(answered) + len(dial.refused(402)) == 20
    assert len(dial.refused(402)) >= 1
    total_talk_ms = sum(record.talk_ms for record in answered)
    assert total_talk_ms <= 20_000 + INCREMENT_MS * len(answered)
    account = await settled(admin, "crowd")
    calls = await calls_of(admin, "crowd")
    assert len(calls) == len(answered)  # a refused INVITE left nothing behind
    for sip_call_id, record in dial.calls.items():
        if record.answered_ms is not None:
            assert_billed(calls[call_id(sip_call_id)], record)
    assert account.balance >= 0
    assert account.reserved == 0
    await assert_ledger(admin, account)


async def test_invites_callcredit_refuses_get_their_sip_answers(
    lab: Lab, admin: AdminClient
) -> None:
    await funded(admin, "single-line", 100, max_calls=1)

    busy = lab.dial("single-line", calls=2, talk_seconds=4)
    unknown = lab.dial("no-such-account", calls=1, talk_seconds=4)
    malformed = lab.dial("not an id", calls=1, talk_seconds=4)

    assert len(unknown.wait(timeout_seconds=20).refused(403)) == 1
    assert len(malformed.wait(timeout_seconds=20).refused(400)) == 1
    busy.wait(timeout_seconds=20)
    assert len(busy.answered) == 1
    assert len(busy.refused(486)) == 1
    account = await settled(admin, "single-line")
    assert len(await calls_of(admin, "single-line")) == 1
    await assert_ledger(admin, account)


async def test_calls_ending_together_are_each_charged_once(lab: Lab, admin: AdminClient) -> None:
    await funded(admin, "batch", 1_000)

    dial = lab.dial("batch", calls=20, talk_seconds=4).wait(timeout_seconds=20)

    assert len(dial.answered) == 20
    assert not any(record.ended_by_proxy for record in dial.answered)
    account = await settled(admin, "batch")
    calls = await calls_of(admin, "batch")
    assert len(calls) == 20
    for sip_call_id, record in dial.calls.items():
        assert_billed(calls[call_id(sip_call_id)], record)
    entries = await assert_ledger(admin, account)
    charges = [e.call_id for e in entries if e.kind == admin_pb2.ENTRY_KIND_CALL_CHARGE]
    assert sorted(charges) == sorted(calls)  # one charge per call, no expiry, no refund
    assert len(entries) == 1 + 20  # the top-up and the charges
    assert account.balance == 1_000 - sum(call.charged for call in calls.values())


async def test_a_top_up_extends_a_live_call_past_its_first_grant(
    lab: Lab, admin: AdminClient
) -> None:
    await funded(admin, "topped", 6)

    dial = lab.dial("topped", calls=1, talk_seconds=12)
    await asyncio.sleep(3.5)  # answered, renewed once: its grant is final at 6 s
    await admin.top_up("topped", 100, idempotency_key="mid-call")
    dial.wait(timeout_seconds=30)

    [record] = dial.answered
    assert not record.ended_by_proxy  # it hung up itself, at the 12 s it wanted
    assert record.talk_ms >= 11_500
    await settled(admin, "topped")
    [(sip_call_id, _)] = dial.calls.items()
    assert_billed((await calls_of(admin, "topped"))[call_id(sip_call_id)], record)


async def test_a_suspension_ends_live_calls_within_a_second(lab: Lab, admin: AdminClient) -> None:
    await funded(admin, "naughty", 1_000)

    dial = lab.dial("naughty", calls=3, talk_seconds=30)
    await asyncio.sleep(3.0)
    suspended_at = time.monotonic()
    await admin.update_account("naughty", status=admin_pb2.ACCOUNT_STATUS_SUSPENDED)
    dial.wait(timeout_seconds=30)

    assert len(dial.answered) == 3
    for record in dial.answered:
        assert record.ended_by_proxy
        assert record.ended_ms is not None
        ended_at = dial.started_at + record.ended_ms / 1000
        assert ended_at - suspended_at <= 1.0
    await settled(admin, "naughty")
    calls = await calls_of(admin, "naughty")
    for sip_call_id, record in dial.calls.items():
        assert_billed(calls[call_id(sip_call_id)], record)


async def test_calls_end_at_their_grant_when_the_adapter_is_killed(
    lab: Lab, admin: AdminClient
) -> None:
    await funded(admin, "orphans", 1_000)

    dial = lab.dial("orphans", calls=2, talk_seconds=20)
    await asyncio.sleep(1.5)  # answered, first grant (5 s) not yet renewed
    lab.kill_adapter()
    unserved = lab.dial("orphans", calls=1, talk_seconds=5).wait(timeout_seconds=20)
    dial.wait(timeout_seconds=30)

    # With no adapter, Kamailio itself answers 503 after CC_WAIT_MS (3 s).
    [not_held] = unserved.refused(503)
    assert not_held.refused_ms is not None
    assert not_held.refused_ms <= 3_500
    assert len(dial.answered) == 2
    for record in dial.answered:
        assert record.ended_by_proxy
        assert record.talk_ms <= GRANT_SECONDS * 1000 + INCREMENT_MS
    # Nobody released them: they are open at callcredit until an adapter comes back.
    assert (await admin.get_account("orphans")).active_calls == 2
    lab.start_adapter()
    account = await settled(admin, "orphans")
    assert account.active_calls == 0
    calls = await calls_of(admin, "orphans")
    for sip_call_id, record in dial.calls.items():
        assert_billed(calls[call_id(sip_call_id)], record)
    entries = await assert_ledger(admin, account)
    charges = [e.call_id for e in entries if e.kind == admin_pb2.ENTRY_KIND_CALL_CHARGE]
    assert sorted(charges) == sorted(calls)  # charged once each, never expired
    assert lab.dialogs() == []


async def test_a_restarted_adapter_takes_up_a_live_call(lab: Lab, admin: AdminClient) -> None:
    await funded(admin, "resumed", 1_000)

    dial = lab.dial("resumed", calls=1, talk_seconds=10)
    await asyncio.sleep(1.5)
    lab.kill_adapter()
    lab.start_adapter()  # within the first grant: the call is still talking
    dial.wait(timeout_seconds=30)

    [record] = dial.answered
    assert not record.ended_by_proxy  # renewed by the new adapter, up to the 10 s it wanted
    assert record.talk_ms >= 9_500
    account = await settled(admin, "resumed")
    [(sip_call_id, _)] = dial.calls.items()
    assert_billed((await calls_of(admin, "resumed"))[call_id(sip_call_id)], record)
    await assert_ledger(admin, account)


async def test_a_call_that_failed_while_the_adapter_was_down_is_released_free(
    lab: Lab, admin: AdminClient
) -> None:
    await funded(admin, "unlucky", 1_000)
    assert lab.carrier is not None
    stop(lab.carrier)  # the carrier never answers: the INVITE times out (408) in 5 s

    dial = lab.dial("unlucky", calls=1, talk_seconds=8)
    await asyncio.sleep(1.0)  # let through, ringing
    lab.kill_adapter()
    dial.wait(timeout_seconds=20)
    [record] = dial.calls.values()
    assert record.refused == 408
    assert (await admin.get_account("unlucky")).active_calls == 1  # nobody released it
    lab.start_adapter()

    account = await settled(admin, "unlucky")
    assert account.active_calls == 0
    [call] = (await calls_of(admin, "unlucky")).values()
    assert call.state == admin_pb2.CALL_STATE_RELEASED
    assert call.charged == 0
    assert account.balance == 1_000


async def test_a_reserve_in_flight_when_the_adapter_dies_is_released_free(
    lab: Lab, admin: AdminClient, authority: Authority
) -> None:
    await funded(admin, "midair", 1_000)

    authority.pause()  # the Reserve goes out and waits there, unanswered
    try:
        dial = lab.dial("midair", calls=1, talk_seconds=5)
        await asyncio.sleep(0.7)  # within the adapter's --reserve-timeout (1.5 s)
        lab.kill_adapter()
    finally:
        authority.resume()
    dial.wait(timeout_seconds=20)
    [record] = dial.calls.values()
    assert record.refused == 503  # Kamailio's own answer, after CC_WAIT_MS
    lab.start_adapter()

    account = await settled(admin, "midair")
    assert account.active_calls == 0
    # Made by the dead adapter's Reserve, or by the new one's: released, with nothing
    # talked and nothing charged, not left to expire on its allowance.
    [call] = (await calls_of(admin, "midair")).values()
    assert call.call_id == call_id(next(iter(dial.calls)))
    assert call.state == admin_pb2.CALL_STATE_RELEASED
    assert call.charged == 0
    assert account.balance == 1_000
    await assert_ledger(admin, account)


async def test_with_callcredit_down_invites_get_503_and_calls_end_at_their_grant(
    lab: Lab, admin: AdminClient, authority: Authority
) -> None:
    await funded(admin, "stranded", 1_000)

    talking = lab.dial("stranded", calls=2, talk_seconds=20)
    await asyncio.sleep(1.5)
    authority.kill()
    refused = lab.dial("stranded", calls=3, talk_seconds=5).wait(timeout_seconds=20)
    talking.wait(timeout_seconds=30)

    assert len(refused.refused(503)) == 3
    for record in refused.calls.values():
        assert record.refused_ms is not None
        assert record.refused_ms <= (lab.reserve_timeout_seconds + 0.5) * 1000
    assert len(talking.answered) == 2
    for record in talking.answered:
        assert record.ended_by_proxy
        assert record.talk_ms <= GRANT_SECONDS * 1000 + INCREMENT_MS
    authority.start()  # the adapter's releases, queued meanwhile, go through
    async with AdminClient(authority.target) as back:
        account = await settled(back, "stranded")
        assert account.active_calls == 0
        calls = await calls_of(back, "stranded")
        for sip_call_id in refused.calls:
            # The INVITE was answered 503, but its Reserve may have reached callcredit
            # once it was back: then it was released at once, free.
            lost = calls.pop(call_id(sip_call_id), None)
            assert lost is None or lost.charged == 0
        assert len(calls) == 2
        for sip_call_id, record in talking.calls.items():
            call = calls[call_id(sip_call_id)]
            # Released, or expired meanwhile and re-rated by the late release.
            assert call.charged == call.used_seconds
            assert_billed_seconds(call.used_seconds, record.talk_ms)
        await assert_ledger(back, account)


async def test_calls_ending_by_timeout_together_send_a_bye_to_both_legs(
    lab: Lab, admin: AdminClient
) -> None:
    """Kamailio 5.6 sends the caller's BYE first and, if the caller's 200 OK to it is
    handled before it sends the callee's, never sends the callee's (dlg_bye_all): the
    carrier's leg stays up. Many calls ending in the same tick make that likely."""
    for round_ in range(TIMEOUT_ROUNDS):
        account = f"tick-{round_}"
        # One grant each (5 s), and nothing to renew with: every call ends on its
        # dialog timeout, all within the same second or two.
        await funded(admin, account, GRANT_SECONDS * TIMEOUT_CALLS)
        dial = lab.dial(account, calls=TIMEOUT_CALLS, talk_seconds=30).wait(timeout_seconds=30)

        assert len(dial.answered) == TIMEOUT_CALLS
        assert all(record.ended_by_proxy for record in dial.answered)
        deadline = time.monotonic() + 3.0
        while True:
            legs = lab.carrier_ends()
            unended = [sip for sip in dial.calls if legs.get(sip, CarrierLeg()).ended_ms is None]
            if not unended or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert unended == [], f"round {round_}: the carrier got no BYE for {unended}"
        settled_account = await settled(admin, account)
        assert settled_account.active_calls == 0
        calls = await calls_of(admin, account)
        for sip_call_id, record in dial.calls.items():
            assert_billed(calls[call_id(sip_call_id)], record)
        await assert_ledger(admin, settled_account)


async def test_a_dialog_whose_timeout_does_not_fire_is_ended_by_the_adapter(
    lab: Lab, admin: AdminClient
) -> None:
    """Kamailio's dialog timeout is the first line; the adapter is the second. Here the
    dialog's timer is pushed an hour out (a second evapi client sends Kamailio the
    adapter's own `timeout` command), as if it were lost: the adapter's look-up after the
    grant finds the dialog open and ends it, instead of letting it talk on unpaid."""
    await funded(admin, "unbounded", GRANT_SECONDS)  # one grant, nothing to renew with

    dial = lab.dial("unbounded", calls=1, talk_seconds=40)
    [dialog] = await confirmed_dialogs(lab, 1)
    _, writer = await asyncio.open_connection("127.0.0.1", lab.events_port)
    writer.write(netstring(timeout_command(dialog["h_entry"], dialog["h_id"], 3_600)))
    await writer.drain()
    dial.wait(timeout_seconds=30)
    writer.close()

    [record] = dial.answered
    assert record.ended_by_proxy
    # Without the adapter's look-up the call talks its 40 s; with it, it ends once
    # RECONCILE_GRACE_SECONDS have passed after the grant ran out.
    assert record.talk_ms <= (GRANT_SECONDS + RECONCILE_GRACE_SECONDS) * 1000 + 2 * INCREMENT_MS
    account = await settled(admin, "unbounded")
    assert account.active_calls == 0
    assert account.balance >= 0
    await assert_ledger(admin, account)
    assert lab.dialogs() == []


async def confirmed_dialogs(lab: Lab, count: int) -> list[dict[str, int]]:
    """Kamailio's dialogs once `count` of them are confirmed (answered and ACKed)."""
    deadline = time.monotonic() + 10.0
    while True:
        found = [d for d in lab.dialogs() if isinstance(d, dict) and d.get("state") == 4]
        if len(found) == count:
            return found
        assert time.monotonic() < deadline, f"dialogs: {lab.dialogs()}"
        await asyncio.sleep(0.1)


def sip_request(request_line: str, port: int, headers: dict[str, str]) -> bytes:
    """A SIP request with no body, sent over UDP from 127.0.0.1:`port`: `headers` in order
    after its Via and Max-Forwards."""
    lines = [request_line, f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-test"]
    lines += ["Max-Forwards: 70", *(f"{name}: {value}" for name, value in headers.items())]
    return "\r\n".join([*lines, "Content-Length: 0", "", ""]).encode("latin-1")


async def made_up_bye(lab: Lab, sip_call_id: str) -> object:
    """Send Kamailio a BYE routed through it for `sip_call_id`, with tags of no dialog;
    what its `ccend` table holds for that Call-ID a second later."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        headers = {
            "Route": f"<sip:127.0.0.1:{lab.sip_port};lr>",
            "From": "<sip:a@x>;tag=made-up-1",
            "To": "<sip:b@y>;tag=made-up-2",
            "Call-ID": sip_call_id,
            "CSeq": "2 BYE",
        }
        bye = f"BYE sip:x@127.0.0.1:{lab.carrier_port} SIP/2.0"
        sock.sendto(sip_request(bye, sock.getsockname()[1], headers), ("127.0.0.1", lab.sip_port))
        await asyncio.sleep(1.0)
    return rpc(lab.rpc_port, "htable.get", "ccend", sip_call_id)


def stamped(found: object) -> bool:
    return isinstance(found, dict) and bool(found.get("item"))


async def test_a_bye_of_no_dialog_is_not_a_call_s_end(lab: Lab) -> None:
    """A BYE with a Route to Kamailio but no dialog behind it (a Call-ID not seen yet)
    must not stamp that Call-ID's end: a call placed under it later would be released
    at that earlier time, its talk unpaid."""
    found = await made_up_bye(lab, "not-yet-placed@elsewhere")
    assert not stamped(found), found


async def test_a_bye_with_other_tags_does_not_end_a_live_call(lab: Lab, admin: AdminClient) -> None:
    """A BYE with a live call's Call-ID but tags of no dialog is not that call's end:
    the call talks on to its own end and is charged for all of it."""
    await funded(admin, "tagged", 20)
    dial = lab.dial("tagged", calls=1, talk_seconds=4)
    [dialog] = await confirmed_dialogs(lab, 1)
    sip_call_id = str(dialog["call-id"])
    found = await made_up_bye(lab, sip_call_id)
    assert not stamped(found), found
    dial.wait(timeout_seconds=30)
    [record] = dial.answered
    assert not record.ended_by_proxy  # the dialer hung up after its 4 s
    calls = await calls_of(admin, "tagged")
    assert_billed(calls[call_id(sip_call_id)], record)


async def test_an_invite_whose_event_would_be_too_large_is_refused_by_kamailio(
    lab: Lab, admin: AdminClient
) -> None:
    """JSON escapes a control character in six bytes: an INVITE with a 12,000-character
    Call-ID of them makes a 72 KB event, over the adapter's 64 KiB frame bound, and was
    left unanswered until Kamailio gave up on the adapter. Kamailio now refuses such
    INVITEs itself (as it does an account header over 128 characters, and a destination
    over 64), and the adapter stays connected."""
    await funded(admin, "after", 20)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(1.0)
        port = sock.getsockname()[1]
        headers = {
            "From": "<sip:a@x>;tag=large-1",
            "To": "<sip:84901234567@y>",
            "Call-ID": "\x01" * 12_000,
            "X-Callcredit-Account": "after",
            "CSeq": "1 INVITE",
            "Contact": f"<sip:a@127.0.0.1:{port}>",
        }
        invite = f"INVITE sip:84901234567@127.0.0.1:{lab.sip_port} SIP/2.0"
        sock.sendto(sip_request(invite, port, headers), ("127.0.0.1", lab.sip_port))
        statuses: list[str] = []
        while not statuses or statuses[-1].startswith("SIP/2.0 1"):
            statuses.append(sock.recv(65_535).decode("latin-1").split("\r\n", 1)[0])
    assert statuses[-1] == "SIP/2.0 400 Bad Call-ID"
    adapter_log = (lab.folder / f"adapter-{lab.adapter_starts}.log").read_text()
    assert "connection lost" not in adapter_log  # it never had to reconnect
    dial = lab.dial("after", calls=1, talk_seconds=2).wait(timeout_seconds=30)
    assert len(dial.answered) == 1
