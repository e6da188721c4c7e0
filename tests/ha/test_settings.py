"""--ha settings: refused at start with one line when they cannot work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from callcredit_server.app import Settings


def test_a_sqlite_journal_with_ha_is_refused_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "callcredit_server.cli", "--ha",
         "--database-url", "sqlite:///./data/x.db"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --ha needs a PostgreSQL --database-url: the lease and the fencing live in "
        "the journal's database, which every server must reach"
    ]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"lease_seconds": 0.5}, "--lease-seconds must be between 1 and 60"),
        ({"lease_renew_seconds": 3.0}, "--lease-renew-seconds must be above 0"),
        ({"advertise": "nowhere"}, "--advertise must be HOST:PORT"),
    ],
)
def test_unusable_lease_settings_are_refused(changes: dict[str, object], problem: str) -> None:
    settings = Settings(ha=True, database_url="postgresql://db/cc", **changes)  # type: ignore[arg-type]
    assert problem in "; ".join(settings.problems())


def test_without_ha_the_lease_settings_are_not_looked_at() -> None:
    assert Settings(lease_seconds=0.1).problems() == []
