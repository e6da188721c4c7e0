"""Fuzz fixtures: a seeded server per test, and the Hypothesis budget.

CI runs each property CALLCREDIT_FUZZ_EXAMPLES times (100 by default);
scripts/fuzz.py raises it for long runs outside CI.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from callcredit_server.app import Settings
from tests.fuzz.server import ServerThread
from tests.service.conftest import FakeClock, Harness, open_harness

EXAMPLES = int(os.environ.get("CALLCREDIT_FUZZ_EXAMPLES", "100"))

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a round trip to a real server is not a unit of pure computation
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,  # one server per test, shared by its examples
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
    print_blob=True,
)
# Scenarios that cost more per example (many RPCs each) get a fraction.
FUZZ_SCENARIOS = settings(FUZZ, max_examples=max(10, EXAMPLES // 3))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    running = ServerThread(tmp_path)
    try:
        running.seed()
        yield running
    finally:
        running.stop()


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """The service tests' Harness (server in this test's event loop), on SQLite."""
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'journal.db'}",
        snapshot_dir=str(tmp_path / "snapshots"),
        tick_interval_ms=20,
    )
    h = await open_harness(settings, FakeClock())
    try:
        yield h
    finally:
        await h.channel.close()
        await h.running.stop(grace_seconds=0.5)
