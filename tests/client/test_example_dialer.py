"""callcredit-example-dialer as a user runs it: a real server process, the console script.

On a small balance it must use what is available (waiting while money is only held by
calls in progress) and account for every call it did not place; with no server it
must exit 3 and say why.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from callcredit.admin import AdminClient, RateSpec
from callcredit.example_dialer import Campaign, Next, Tally, after_refusal, summary
from tests.service.processes import server_process

SCRIPT = str(Path(sys.executable).with_name("callcredit-example-dialer"))


def dial(target: str, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, "--target", target, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_on_a_small_balance_it_uses_what_is_available_and_reports_the_rest(
    tmp_path: Path,
) -> None:
    with server_process(f"sqlite:///{tmp_path / 'journal.db'}") as (_, target):
        async with AdminClient(target) as admin:
            # 1 ₫ a second, billed per second: 12 ₫ is 12 s of talk for 20 calls of 1-2 s.
            await admin.put_tariff("t", "VND", [RateSpec("", 60_000_000)])
            await admin.create_account("small", currency="VND", tariff_id="t")
            await admin.top_up("small", 12, idempotency_key="seed")
            args = ["--account", "small", "--calls", "20", "--concurrency", "4"]
            args += ["--requested-seconds", "10", "--talk-seconds", "1:2", "--answer-ratio", "1"]
            result = dial(target, *args, "--seed", "7")
            account = await admin.get_account("small")

    assert result.returncode == 0, result.stderr
    assert account.available == 0  # every đồng it could use, it used
    assert account.reserved == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "small: balance ₫12, reserved ₫0, available ₫12, active calls 0"
    found = re.search(
        r"^20 calls: (\d+) placed \((\d+) answered\), (\d+) refused \((\d+) "
        r"INSUFFICIENT_FUNDS\), (\d+) not tried; charged ₫12$",
        result.stdout,
        re.MULTILINE,
    )
    assert found, result.stdout
    placed, _, refused, funds, not_tried = (int(n) for n in found.groups())
    assert placed + refused + not_tried == 20
    # Refused only once nothing in progress could free money: at most one call per line.
    assert refused == funds
    assert 1 <= refused <= 4
    assert placed > 4  # more than the first wave: lines waited for holds to be freed
    assert "stopped placing calls: INSUFFICIENT_FUNDS" in result.stdout
    # Aligned: every call line has its outcome in the same column.
    call_lines = [line for line in lines if line.startswith("example-")]
    assert len({len(re.match(r"\S+\s+", line)[0]) for line in call_lines}) == 1  # type: ignore[index]
    assert len({line.index(" used ") for line in call_lines if " used " in line}) == 1
    assert lines[-1].startswith("small: balance ₫0")


def test_an_unreachable_server_is_exit_3_with_the_cause() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    target = f"127.0.0.1:{port}"

    result = dial(target, "--account", "a", "--connect-timeout", "1", timeout=30)

    assert result.returncode == 3
    assert result.stdout == ""
    assert result.stderr == (
        f"error: UNAVAILABLE: cannot reach {target}: connection refused "
        "(is the server running, on this port?)\n"
    )


@pytest.mark.parametrize(
    ("reason", "in_progress", "next_"),
    [
        ("INSUFFICIENT_FUNDS", 2, Next.RETRY_WHEN_A_CALL_ENDS),
        ("CONCURRENT_CALL_LIMIT", 1, Next.RETRY_WHEN_A_CALL_ENDS),
        ("INSUFFICIENT_FUNDS", 0, Next.STOP),  # nothing in progress can free money
        ("ACCOUNT_SUSPENDED", 3, Next.STOP),  # every call would get it
        ("NO_RATE_FOR_DESTINATION", 3, Next.STOP),
    ],
)
def test_after_refusal(reason: str, in_progress: int, next_: Next) -> None:
    assert after_refusal(reason, in_progress) is next_


def test_the_summary_counts_every_call() -> None:
    campaign = Campaign("t", "a", 10, 2, "84", 1.0, 2.0, 0, 1.0, None)
    tally = Tally(placed=6, answered=5, charged=1_250, waits=3)
    tally.refused["INSUFFICIENT_FUNDS"] = 1

    assert summary(campaign, tally, "USD", "INSUFFICIENT_FUNDS") == [
        "stopped placing calls: INSUFFICIENT_FUNDS, and no call in progress could free any money",
        "10 calls: 6 placed (5 answered), 1 refused (1 INSUFFICIENT_FUNDS), 3 not tried; "
        "charged $12.50",
        "3 times a call waited for money held by calls in progress, then went on",
    ]
