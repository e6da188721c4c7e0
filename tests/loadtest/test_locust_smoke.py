"""A short headless locust run of loadtest/locustfile.py against a real server process.

The campaign is tight on money on purpose (small opening balances, frequent top-ups,
a call cap), so refusals, final grants and pushed grant updates all happen; none of
them is a failure. Afterwards the server must hold no open call, and the money must add
up three independent ways: ledger entries against balances, the ledger's top-ups against
what locust says it topped up, and the ledger's charges against both the calls' charges
and the sum of the `charged` every release answered to the dialers.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from callcredit.v1 import admin_pb2, admin_pb2_grpc
from tests.service.processes import server_process

# Not pytest.importorskip: importing locust monkey-patches the whole test process
# for gevent (threads become greenlets), which hangs every test after it.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed", allow_module_level=True)

LOCUSTFILE = Path(__file__).resolve().parents[2] / "loadtest" / "locustfile.py"
ACCOUNTS = 5
PREFIX = "smoke"
INITIAL_BALANCE = 3_000
TOPUP_AMOUNT = 20_000
RUN_SECONDS = 8


def _all_entries(
    admin: admin_pb2_grpc.AdminServiceStub, account_id: str
) -> Iterator[admin_pb2.LedgerEntry]:
    after = 0
    while True:
        request = admin_pb2.ListEntriesRequest(
            account_id=account_id, after_entry_id=after, limit=1000
        )
        entries = admin.ListEntries(request, timeout=10).entries
        if not entries:
            return
        yield from entries
        after = entries[-1].entry_id


def _all_calls(admin: admin_pb2_grpc.AdminServiceStub, account_id: str) -> Iterator[admin_pb2.Call]:
    token = ""
    while True:
        request = admin_pb2.ListCallsRequest(account_id=account_id, limit=1000, page_token=token)
        response = admin.ListCalls(request, timeout=10)
        yield from response.calls
        token = response.next_page_token
        if not token:
            return


def _stats(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open(newline="") as file:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(file)}


def _count(stats: dict[tuple[str, str], dict[str, str]], kind: str, name: str) -> int:
    row = stats.get((kind, name))
    return int(row["Request Count"]) if row else 0


def test_locust_campaign_leaves_no_open_call_and_conserves_money(tmp_path: Path) -> None:
    started = time.monotonic()
    with server_process(f"sqlite:///{tmp_path / 'journal.db'}") as (_, target):
        run = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
             "-u", "10", "-r", "10", "-t", f"{RUN_SECONDS}s", "--host", target,
             "--csv", str(tmp_path / "run"), "--only-summary",
             "--setup", "--accounts", str(ACCOUNTS), "--account-prefix", PREFIX,
             "--initial-balance", str(INITIAL_BALANCE), "--max-concurrent-calls", "8",
             "--call-rate", "2", "--answer-ratio", "0.7", "--talk-mean", "40",
             "--time-scale", "20", "--grant-seconds", "20",
             "--topup-interval", "0.5", "--topup-amount", str(TOPUP_AMOUNT),
             "--summary-json", str(tmp_path / "summary.json")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        output = run.stdout + run.stderr
        assert run.returncode == 0, output
        assert "Traceback" not in output, output

        stats = _stats(tmp_path / "run_stats.csv")
        for kind in ("reserve", "renew", "release"):
            assert _count(stats, kind, "Control") > 0, (kind, output)
        assert int(stats[("", "Aggregated")]["Failure Count"]) == 0, output
        with (tmp_path / "run_failures.csv").open(newline="") as file:
            assert list(csv.DictReader(file)) == [], output
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["calls reserved"] == _count(stats, "reserve", "Control"), summary
        assert summary["calls released"] == _count(stats, "release", "Control"), summary

        with grpc.insecure_channel(target) as channel:
            admin = admin_pb2_grpc.AdminServiceStub(channel)
            balances = topped_up = charges = refunds = adjustments = 0
            calls = charged_on_calls = 0
            for n in range(ACCOUNTS):
                account_id = f"{PREFIX}-{n:04d}"
                request = admin_pb2.GetAccountRequest(account_id=account_id)
                account = admin.GetAccount(request, timeout=10).account
                assert account.active_calls == 0, account
                assert account.reserved == 0, account
                assert account.available >= 0, account
                running = 0
                for entry in _all_entries(admin, account_id):
                    running += entry.amount
                    assert entry.balance_after == running, entry
                    if entry.kind == admin_pb2.ENTRY_KIND_TOP_UP:
                        topped_up += entry.amount
                    elif entry.kind in (
                        admin_pb2.ENTRY_KIND_CALL_CHARGE,
                        admin_pb2.ENTRY_KIND_EXPIRY_CHARGE,
                    ):
                        charges -= entry.amount
                    elif entry.kind == admin_pb2.ENTRY_KIND_REFUND:
                        refunds += entry.amount
                    else:
                        adjustments += entry.amount
                assert running == account.balance, account
                balances += account.balance
                for call in _all_calls(admin, account_id):
                    # A dialer that renews on time never lets a call expire.
                    assert call.state == admin_pb2.CALL_STATE_RELEASED, call
                    calls += 1
                    charged_on_calls += call.charged

    topups = _count(stats, "topup", "AdminService.TopUp")
    assert topups > 0, output
    assert topped_up == ACCOUNTS * INITIAL_BALANCE + topups * TOPUP_AMOUNT
    assert balances == topped_up + adjustments - charges + refunds
    assert calls == summary["calls reserved"]
    assert charged_on_calls == charges - refunds == summary["charged (minor units)"]
    assert time.monotonic() - started < 40
