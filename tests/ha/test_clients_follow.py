"""Clients given every server of a hot standby setup follow the primary (issue 11): a
dialer holding calls rides out a SIGKILLed primary, the admin CLI finds the primary
behind a standby, and a changefeed stream resumes on the new primary from its cursor.
Real `callcredit-server --ha` processes on real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from callcredit.admin import AdminClient, RateSpec
from callcredit.dialer import DialerCall, DialerClient
from callcredit.v1 import admin_pb2
from tests.crash.harness import CampaignConfig
from tests.ha.cluster import HaCluster

pytestmark = pytest.mark.timeout(90)

LEASE_SECONDS = 2.0
SEED = 100_000  # đ
CALLS = 3
TALK_SECONDS = 4  # reported per call at release: 1 đ/s


@contextlib.contextmanager
def two_servers(
    pg_url: str, tmp_path: Path, tag: str, validity_seconds: int | None = None
) -> Iterator[tuple[HaCluster, int, list[str]]]:
    """A primary and a standby on one journal: (the cluster, the primary's slot, both
    targets with the standby first, so every client meets NOT_PRIMARY before the primary)."""
    config = CampaignConfig(database_url=pg_url, workdir=tmp_path, tag=tag)
    if validity_seconds is not None:
        config = dataclasses.replace(config, validity_seconds=validity_seconds)
    cluster = HaCluster(config, lease_seconds=LEASE_SECONDS, renew_seconds=LEASE_SECONDS / 4)
    try:
        cluster.start()
        old = cluster.primary
        assert old is not None
        yield cluster, old, [cluster.target_of(1 - old), cluster.target_of(old)]
    finally:
        cluster.stop()


async def test_a_dialer_with_both_targets_rides_out_the_primary_s_death(
    pg_url: str, tmp_path: Path
) -> None:
    with two_servers(pg_url, tmp_path, "f", validity_seconds=20) as (cluster, old, targets):
        async with AdminClient(targets) as admin:
            await admin.put_tariff("f.t", "VND", [RateSpec("", 60_000_000)])
            await admin.create_account("f.a", currency="VND", tariff_id="f.t")
            await admin.top_up("f.a", SEED, idempotency_key="f.seed")

        hangups: list[tuple[str, str]] = []

        def hung_up(call: DialerCall, reason: str) -> None:
            hangups.append((call.call_id, reason))

        async with DialerClient(targets) as dialer:
            calls = [
                await dialer.reserve(f"f.c{n}", "f.a", "+84901234567", on_hangup=hung_up)
                for n in range(CALLS)
            ]
            for call in calls:
                call.answered()
            await asyncio.to_thread(cluster.kill)
            # Sent while no server is primary: held, re-sent on the new primary.
            renewals = [asyncio.create_task(call.renew(used_seconds=2)) for call in calls]
            new = await asyncio.to_thread(cluster.wait_for_primary)
            assert new == 1 - old
            grants = await asyncio.wait_for(asyncio.gather(*renewals), timeout=20)
            assert all(grant.allowed_seconds >= 2 for grant in grants)
            results = [await call.release(used_seconds=TALK_SECONDS) for call in calls]
        assert hangups == []
        assert [r.charged for r in results] == [TALK_SECONDS] * CALLS

        async with AdminClient(targets) as admin:  # the dead one first now
            account = await admin.get_account("f.a")
            entries = await admin.list_entries("f.a")
            active = (await admin.list_calls("f.a", active_only=True)).calls
        assert account.balance == SEED - CALLS * TALK_SECONDS == results[-1].balance
        assert sum(entry.amount for entry in entries) == account.balance
        assert list(active) == []


def test_the_admin_cli_finds_the_primary_behind_a_standby(pg_url: str, tmp_path: Path) -> None:
    with two_servers(pg_url, tmp_path, "g") as (_, _, targets):
        env = {**os.environ, "CALLCREDIT_TARGET": ",".join(targets)}
        cli = [sys.executable, "-m", "callcredit.cli", "--json"]

        def run(*args: str) -> dict[str, object]:
            done = subprocess.run(
                [*cli, *args], capture_output=True, text=True, env=env, timeout=30
            )
            assert done.returncode == 0, done.stderr + done.stdout
            answer: dict[str, object] = json.loads(done.stdout)
            return answer

        run("tariff", "put", "g.t", "--currency", "VND", "--rate", "84:1200000")
        run("account", "create", "g.a", "--currency", "VND", "--tariff", "g.t")
        for _ in range(2):  # the same key twice: one top-up
            run("topup", "g.a", "500", "--idempotency-key", "g.k")
        assert int(str(run("account", "show", "g.a")["balance"])) == 500


async def test_watch_events_follows_the_primary_across_a_takeover_from_its_cursor(
    pg_url: str, tmp_path: Path
) -> None:
    with two_servers(pg_url, tmp_path, "w") as (cluster, old, targets):
        seen: list[admin_pb2.Event] = []
        keys = [f"w.k{n}" for n in range(20)]
        first_half = asyncio.Event()

        async def follow() -> None:
            async with AdminClient(targets) as watcher:
                async for response in watcher.watch_events(
                    account_ids=["w.a"], kinds=[admin_pb2.EVENT_KIND_BALANCE_CHANGED]
                ):
                    seen.extend(response.events)
                    if len(seen) >= len(keys) // 2:
                        first_half.set()
                    if len(seen) >= len(keys):
                        return

        async with AdminClient(targets) as admin:
            await admin.put_tariff("w.t", "VND", [RateSpec("", 60_000_000)])
            await admin.create_account("w.a", currency="VND", tariff_id="w.t")
            follower = asyncio.create_task(follow())
            for key in keys[:10]:
                await admin.top_up("w.a", 1, idempotency_key=key, reference=key)
            await asyncio.wait_for(first_half.wait(), 20)  # the stream is on the old primary
            await asyncio.to_thread(cluster.kill)
            for key in keys[10:]:  # on the new primary, once the client finds it
                await admin.top_up("w.a", 1, idempotency_key=key, reference=key)
            await asyncio.wait_for(follower, timeout=30)
        assert await asyncio.to_thread(cluster.wait_for_primary) == 1 - old
        assert [event.entry.reference for event in seen] == keys  # none missed, none twice
        assert len({event.event_id for event in seen}) == len(keys)
