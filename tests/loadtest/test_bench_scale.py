"""A short run of scripts/bench_scale.py with tiny numbers: both states are built, served,
opened, renewed at their steady rate and released, and every check passes (every call
released, no call open, the charges and the sampled ledgers add up, `callcredit-server
verify` on both journals). No timing assertions."""

from __future__ import annotations

from pathlib import Path

from tests.loadtest.helpers import run_script


def test_a_tiny_scale_run_completes_and_its_checks_pass(tmp_path: Path) -> None:
    report = run_script(
        "bench_scale.py", "--accounts", "2000", "--calls", "200",
        "--small-accounts", "200", "--small-calls", "20", "--seconds", "2",
        "--grant-seconds", "10", "--check-accounts", "50", "--verify",
        "--scrape-seconds", "0.5", "--workdir", str(tmp_path),
    )  # fmt: skip
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in report.splitlines()
        if line.startswith("| ")
    }
    assert rows["checks"] == ["ok", "ok"], report
    assert [cell.startswith("ok") for cell in rows["callcredit-server verify"]] == [True, True]
    # the same rate for both states: 200 calls / (10 - 5) s, for 2 s
    assert [cell.split()[0] for cell in rows["renewals (per s)"]] == ["80", "80"], report
    assert "renew p99 big / small" in report
    # scraped as Prometheus would, within the 2 s of each state's steady phase
    assert [int(cell) >= 2 for cell in rows["/metrics scrapes during steady"]] == [True, True]
