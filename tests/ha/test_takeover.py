"""A primary killed with SIGKILL under load: a standby takes over and nothing
acknowledged is lost or doubled (the crash campaign, tests/crash, against HaCluster).

Clients are separate processes that retry every unanswered operation with the same ids
across all the servers (tests/crash/client.py); afterwards the final state read from
the new primary is checked against every client's log, a quiet kill must change
nothing, and `callcredit-server verify` replays the whole journal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.crash.test_kill9 import _seed
from tests.ha.cluster import run_ha_campaign, takeover_line

pytestmark = pytest.mark.timeout(240)

MIN_ACKED_OPS = 100


def test_sigkill_of_the_primary_under_load_loses_and_doubles_nothing(
    pg_url: str, tmp_path: Path
) -> None:
    report, cluster = run_ha_campaign(pg_url, tmp_path, kills=3, lease_seconds=2.0, seed=_seed())
    print(report.summary())
    print(takeover_line(cluster, 2.0))
    assert not report.violations, report.summary()
    assert report.kills >= 3
    assert report.count("ack") >= MIN_ACKED_OPS, report.summary()
    assert report.client_stats["retried"] > 0, "no operation was in flight at any kill"
    assert len(cluster.takeover_seconds) == report.kills
    assert max(cluster.takeover_seconds) < 2.0 + 2.0


def test_twenty_takeovers_in_a_row_under_load_with_no_mismatch(pg_url: str, tmp_path: Path) -> None:
    """The CI variant of scripts/ha_takeover_loop.py (--takeovers 200). A 2 s lease: the
    machine CI shares with other jobs must not depose a new primary in its first second."""
    report, cluster = run_ha_campaign(pg_url, tmp_path, kills=20, lease_seconds=2.0, seed=_seed())
    print(report.summary())
    print(takeover_line(cluster, 2.0))
    assert not report.violations, report.summary()
    assert report.kills >= 20
    assert len(cluster.takeover_seconds) == report.kills
    assert report.count("ack") >= MIN_ACKED_OPS, report.summary()
