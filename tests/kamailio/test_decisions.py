"""The adapter's decisions, fed events and times directly: no sockets, no sleeps."""

from __future__ import annotations

import orjson
import pytest

from callcredit_server.core.validation import ID_PATTERN
from callcredit_server.kamailio.decisions import (
    MAX_EVENT_BYTES,
    MAX_FAILED_LOOKUPS,
    MAX_SIP_CALL_ID_LENGTH,
    PROCEED,
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
    Release,
    Reserve,
    SipAnswer,
    Start,
    Unheld,
    answer_command,
    answer_for_refusal,
    check_invite,
    derive_call_id,
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

S = 1_000_000  # microseconds per second


def reserve(**fields: object) -> Reserve:
    values: dict[str, object] = {
        "tindex": 1,
        "tlabel": 2,
        "sip_call_id": "a84b4c76e66710@pc33.example.com",
        "ruri_user": "84901234567",
        "account_headers": 1,
        "account": "acme",
    }
    values.update(fields)
    return Reserve(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        pytest.param("INSUFFICIENT_FUNDS", 402, id="funds"),
        pytest.param("ACCOUNT_SUSPENDED", 403, id="suspended"),
        pytest.param("ACCOUNT_CLOSED", 403, id="closed"),
        pytest.param("ACCOUNT_NOT_FOUND", 403, id="unknown-account"),
        pytest.param("NO_RATE_FOR_DESTINATION", 403, id="no-rate"),
        pytest.param("CONCURRENT_CALL_LIMIT", 486, id="busy"),
        pytest.param("INVALID_ARGUMENT", 400, id="invalid"),
        pytest.param("CALL_ALREADY_ENDED", 400, id="call-id-reused"),
        pytest.param("UNAVAILABLE", 503, id="unavailable"),
        pytest.param("DEADLINE_EXCEEDED", 503, id="slow"),
        pytest.param("SOMETHING_NEW", 503, id="unknown-reason-fails-closed"),
    ],
)
def test_refusals_become_sip_answers(reason: str, code: int) -> None:
    assert answer_for_refusal(reason).code == code


def test_fail_closed_says_when_to_retry() -> None:
    assert UNAVAILABLE.code == 503
    assert UNAVAILABLE.retry_after_seconds > 0


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        pytest.param({"account_headers": 0, "account": ""}, 400, id="missing-header"),
        pytest.param({"account_headers": 2}, 400, id="two-headers"),
        pytest.param({"account": "acme corp"}, 400, id="bad-account-id"),
        pytest.param({"account": "x" * 129}, 400, id="account-too-long"),
        pytest.param({"ruri_user": "alice"}, 400, id="destination-not-a-number"),
        pytest.param({"ruri_user": ""}, 400, id="no-destination"),
        pytest.param({"sip_call_id": "c" * (MAX_SIP_CALL_ID_LENGTH + 1)}, 400, id="call-id-long"),
    ],
)
def test_bad_invites_are_refused_before_callcredit_is_asked(
    fields: dict[str, object], expected: int
) -> None:
    checked = check_invite(reserve(**fields))
    assert isinstance(checked, SipAnswer)
    assert checked.code == expected


def test_a_good_invite_names_its_call_account_and_destination() -> None:
    checked = check_invite(reserve(account=" acme ", ruri_user="+84901234567"))
    assert checked == (derive_call_id("a84b4c76e66710@pc33.example.com"), "acme", "+84901234567")


@pytest.mark.parametrize(
    "sip_call_id",
    [
        pytest.param("a84b4c76e66710@pc33.example.com", id="plain"),
        pytest.param('"quoted" \\ {braces} <angle> ~!%*', id="every-word-character"),
        pytest.param("x" * MAX_SIP_CALL_ID_LENGTH, id="long"),
        pytest.param("é", id="not-ascii"),
    ],
)
def test_call_ids_are_stable_bounded_and_valid(sip_call_id: str) -> None:
    call_id = derive_call_id(sip_call_id)
    assert call_id == derive_call_id(sip_call_id)
    assert ID_PATTERN.fullmatch(call_id)
    assert len(call_id) <= 64


def test_call_ids_of_different_sip_call_ids_differ() -> None:
    ids = {derive_call_id(f"{n}-1234@127.0.0.1") for n in range(10_000)}
    assert len(ids) == 10_000


@pytest.mark.parametrize(
    ("allowed", "talked_micros", "timeout"),
    [
        pytest.param(20, 0, 19, id="at-answer"),
        pytest.param(20, 1, 18, id="a-microsecond-in-rounds-down"),
        pytest.param(20, 5 * S, 14, id="whole-seconds-in"),
        pytest.param(20, 5 * S + 999_999, 13, id="never-rounds-up"),
        pytest.param(2, 0, 1, id="two-seconds"),
        pytest.param(1, 0, 0, id="one-second-cannot-be-timed"),
        pytest.param(20, 19 * S, 0, id="a-second-left-ends-now"),
        pytest.param(20, 25 * S, 0, id="past-the-grant"),
    ],
)
def test_dialog_timeouts_end_calls_inside_their_grant(
    allowed: int, talked_micros: int, timeout: int
) -> None:
    assert dialog_timeout_seconds(allowed, talked_micros) == timeout
    if timeout >= 1:
        # The timer ends the call up to a tick after the timeout: still inside the grant.
        assert talked_micros + (timeout + 1) * S <= allowed * S


@pytest.mark.parametrize(
    ("start", "end", "seconds"),
    [
        pytest.param(0, 0, 0, id="nothing"),
        pytest.param(5, 0, 0, id="clock-step-back"),
        pytest.param(0, 1, 1, id="a-microsecond-is-a-started-second"),
        pytest.param(0, 19 * S, 19, id="whole"),
        pytest.param(0, 19 * S + 1, 20, id="just-over"),
    ],
)
def test_talk_time_counts_every_started_second(start: int, end: int, seconds: int) -> None:
    assert talk_seconds(start, end) == seconds


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        pytest.param("1796573940.308998", 1_796_573_940_308_998, id="usual"),
        pytest.param("1796573940.3", 1_796_573_940_300_000, id="short-fraction"),
        pytest.param("1796573940", None, id="no-fraction"),
        pytest.param("17965x3940.1", None, id="not-digits"),
        pytest.param("1.1234567", None, id="too-precise"),
        pytest.param("-1.5", None, id="negative"),
    ],
)
def test_kamailio_times(text: str, micros: int | None) -> None:
    assert parse_kamailio_time(text) == micros


@pytest.mark.parametrize(
    "reason",
    ["ACCOUNT_SUSPENDED", "ADMIN", "CALL_ALREADY_ENDED", "CALL_NOT_FOUND", "STREAM_FAILED"],
)
def test_terminations_end_the_dialog_at_once(reason: str) -> None:
    assert ends_call_now(reason)


@pytest.mark.parametrize(
    "reason", ["FINAL_GRANT_REACHED", "ALLOWED_SECONDS_REACHED", "CALL_RELEASED", "CLIENT_CLOSED"]
)
def test_grant_ends_are_left_to_kamailio(reason: str) -> None:
    assert not ends_call_now(reason)


def test_events_parse() -> None:
    token = CallToken("sip-1", "acme", "849", 0)
    assert parse_event(
        orjson.dumps(
            {
                "event": "reserve",
                "tindex": 1,
                "tlabel": 2,
                "sip_call_id": "c1",
                "ruri_user": "849",
                "accounts": 1,
                "account": "acme",
            }
        )
    ) == Reserve(1, 2, "c1", "849", 1, "acme")
    start = {
        "event": "start",
        "sip_call_id": "c1",
        "at": "10.5",
        "h_entry": 3,
        "h_id": 4,
        "call": token.encode(),
    }
    assert parse_event(orjson.dumps(start)) == Start("c1", 10_500_000, 3, 4, token)
    assert parse_event(b'{"event":"end","sip_call_id":"c1","at":"11.0"}') == End("c1", 11 * S)
    assert parse_event(b'{"event":"failed","sip_call_id":"c1"}') == Failed("c1")
    held = {"event": "held", "sip_call_id": "c1", "call": token.encode()}
    assert parse_event(orjson.dumps(held)) == Held("c1", token)
    pending = {"event": "pending", "sip_call_id": "c1", "call": token.encode()}
    assert parse_event(orjson.dumps(pending)) == Pending("c1", token)
    assert parse_event(b'{"event":"unheld","tindex":1,"tlabel":2}') == Unheld(1, 2)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[1]", id="not-an-object"),
        pytest.param(b'{"event":"start","sip_call_id":"c"}', id="start-without-fields"),
        pytest.param(b'{"event":"end","sip_call_id":"c","at":"x"}', id="bad-time"),
        pytest.param(b'{"event":"end","at":"1.0"}', id="no-call-id"),
        pytest.param(b'{"event":"reserve","sip_call_id":"c","tindex":"1"}', id="bad-reserve"),
        pytest.param(b'{"event":"unheld","tindex":1}', id="bad-unheld"),
        pytest.param(b'{"event":"party","sip_call_id":"c"}', id="unknown"),
    ],
)
def test_bad_events_are_named_not_raised(data: bytes) -> None:
    assert isinstance(parse_event(data), str)


def test_a_start_with_a_foreign_token_has_none() -> None:
    start = {"event": "start", "sip_call_id": "c1", "at": "1.0", "h_entry": 1, "h_id": 2}
    for call in ["x", "[1,2,3,4]", '["not-sip","acme","849",0]', "[" * 2_000]:
        parsed = parse_event(orjson.dumps({**start, "call": call}))
        assert isinstance(parsed, Start)
        assert parsed.token is None


def test_commands() -> None:
    token = CallToken("sip-1", "acme", "849", 0)
    proceed = orjson.loads(answer_command(reserve(), PROCEED, 19, token))
    assert proceed == {
        "cmd": "answer",
        "tindex": 1,
        "tlabel": 2,
        "code": 200,
        "reason": "OK",
        "timeout": 19,
        "call": token.encode(),
    }
    refuse = orjson.loads(answer_command(reserve(), UNAVAILABLE))
    assert refuse["code"] == 503
    assert refuse["retry_after"] == UNAVAILABLE.retry_after_seconds
    assert "timeout" not in refuse
    assert orjson.loads(timeout_command(3, 4, 7)) == {
        "cmd": "timeout",
        "h_entry": 3,
        "h_id": 4,
        "seconds": 7,
    }
    assert orjson.loads(pending_command("c1", token)) == {
        "cmd": "pending",
        "sip_call_id": "c1",
        "call": token.encode(),
    }
    end = orjson.loads(end_command('a"b@host', 3, 4, "ACCOUNT_SUSPENDED"))
    assert end["cmd"] == "end"
    assert end["sip_call_id"] == 'a"b@host'
    assert orjson.loads(end["rpc"]) == {
        "jsonrpc": "2.0",
        "method": "dlg.end_dlg",
        "params": [3, 4, "X-Callcredit-Reason: ACCOUNT_SUSPENDED\r\n"],
        "id": 1,
    }


def test_commands_refuse_timeouts_the_timer_cannot_keep() -> None:
    with pytest.raises(ValueError):
        answer_command(reserve(), PROCEED, 0, CallToken("sip-1", "acme", "849", 0))
    with pytest.raises(ValueError):
        timeout_command(1, 2, 0)


@pytest.mark.parametrize(
    ("start", "probe", "failed", "talked", "decision"),
    [
        pytest.param(0, Probe(7 * S + 1, False), 0, 9 * S, Release(8), id="recorded-end-wins"),
        pytest.param(
            0, Probe(7 * S, True), 0, 30 * S, Release(7), id="recorded-end-over-open-dialog"
        ),
        pytest.param(0, Probe(None, True), 0, 20 * S - 1, Recheck(), id="still-talking"),
        pytest.param(0, Probe(None, True), 0, 20 * S, EndOverdue(), id="open-past-its-grant"),
        pytest.param(0, Probe(None, False), 0, 25 * S, Release(20), id="gone-unheard-at-grant"),
        pytest.param(None, Probe(None, False), 0, 0, Release(0), id="never-answered"),
        pytest.param(None, Probe(None, True), 0, 0, Recheck(), id="still-ringing"),
        pytest.param(0, None, 1, 25 * S, Recheck(), id="lookup-failed"),
        pytest.param(0, None, MAX_FAILED_LOOKUPS, 25 * S, Release(20), id="lookups-keep-failing"),
    ],
)
def test_reconciliation(
    start: int | None,
    probe: Probe | None,
    failed: int,
    talked: int,
    decision: Release | Recheck | EndOverdue,
) -> None:
    """A grant of 20 s."""
    assert reconcile(start, 20, probe, failed, talked) == decision


def test_netstrings_split_across_reads_and_joined_in_one() -> None:
    stream = netstring(b'{"a":1}') + netstring(b"") + netstring(b"x" * 1000)
    decoder = NetstringDecoder()
    messages: list[bytes] = []
    for n in range(0, len(stream), 7):
        messages += decoder.feed(stream[n : n + 7])
    assert messages == [b'{"a":1}', b"", b"x" * 1000]
    assert decoder.broken is None


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"abc:x,", id="bad-length"),
        pytest.param(b"3:abcX", id="no-comma"),
        pytest.param(b"%d:" % (MAX_EVENT_BYTES + 1), id="too-long"),
        pytest.param(b"123456789", id="length-without-end"),
    ],
)
def test_broken_netstrings_stop_the_stream(stream: bytes) -> None:
    decoder = NetstringDecoder()
    assert decoder.feed(stream) == []
    assert decoder.broken is not None
    assert decoder.feed(netstring(b"{}")) == []
