"""An in-process server with its Prometheus exporter on an ephemeral port."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from callcredit_server.app import Settings
from tests.service.conftest import FakeClock, Harness, open_harness

SCRAPE_TIMEOUT_SECONDS = 5.0


@pytest.fixture
async def harness(database_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    settings = Settings(
        listen="127.0.0.1:0",
        database_url=database_url,
        snapshot_dir=str(tmp_path / "snapshots"),
        # No test here lets time pass (the clock is fake), so ticks are rare: one every 20 ms
        # would now and then sit queued at a scrape (the queued-submissions gauge read 1).
        tick_interval_ms=60_000,
        metrics_listen="127.0.0.1:0",
    )
    h = await open_harness(settings, FakeClock())
    try:
        yield h
    finally:
        await h.channel.close()
        await h.running.stop(grace_seconds=0.5)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_SECONDS) as response:
        body: bytes = response.read()
    return body.decode()


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics over HTTP: every sample as {(name, sorted labels): value}."""
    text = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples
