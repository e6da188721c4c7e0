"""Live SIP calls through Kamailio, limited by callcredit (issue 10, part 3).

Each test runs callcredit-server, callcredit-kamailio, Kamailio (integrations/kamailio/
kamailio.cfg) and SIPp (dialer and carrier) on loopback. Grants are 5 s, billing is one
unit per second in 1 s increments, so "one increment" is one second. Talk time is what
the SIPp dialer measured.
"""

from __future__ import annotations

from callcredit.admin import AdminClient
from tests.sip.lab import (
    Lab,
    assert_billed,
    assert_ledger,
    call_id,
    calls_of,
    funded,
    settled,
)

INCREMENT_MS = 1_000


async def test_a_single_call_talks_its_credit_and_is_charged_exactly(
    lab: Lab, admin: AdminClient
) -> None:
    await funded(admin, "solo", 20)

    dial = lab.dial("solo", calls=1, talk_s=60).wait(timeout_s=40)

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
