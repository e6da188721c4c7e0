"""callcredit-notify as a real process, between a real server and a real HTTP receiver."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from callcredit.admin import AdminClient, RateSpec
from callcredit_server.notify.delivery import verify
from tests.service.processes import server_process

SECRET = "whsec_test-secret-0123456789"
DEADLINE_S = 30.0
REPO = Path(__file__).resolve().parents[2]


def admin(target: str, action: Callable[[AdminClient], Coroutine[Any, Any, object]]) -> None:
    async def run() -> None:
        async with AdminClient(target) as client:
            await action(client)

    asyncio.run(run())


def seed(target: str) -> None:
    async def action(client: AdminClient) -> None:
        await client.put_tariff("t", "VND", [RateSpec("", 60_000_000, 1, 1)])
        await client.create_account("acme", currency="VND", tariff_id="t", low_balance_threshold=5)
        await client.create_account("other", currency="VND", tariff_id="t")

    admin(target, action)


def top_ups(target: str, account_id: str, keys: range) -> None:
    async def action(client: AdminClient) -> None:
        for i in keys:
            await client.top_up(account_id, 1, idempotency_key=f"k{i}")

    admin(target, action)


@contextmanager
def receiver(tmp_path: Path, *flags: str) -> Iterator[tuple[str, Path]]:
    log = tmp_path / "received.jsonl"
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.notify.receiver", str(log), *flags],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}", log
    finally:
        process.kill()
        process.wait()


def write_config(tmp_path: Path, target: str, url: str, max_attempts: int = 5) -> Path:
    config = tmp_path / "notify.toml"
    config.write_text(
        f"""
target = "{target}"
state = "notify.db"

[delivery]
max_attempts = {max_attempts}
first_retry_seconds = 0.1
max_retry_seconds = 0.5
timeout_seconds = 0.5

[[endpoints]]
name = "everything"
url = "{url}/all"
secret = "{SECRET}"
account_prefix = "acme"

[[endpoints]]
name = "alerts"
url = "{url}/alerts"
secret = "{SECRET}"
kinds = ["LOW_BALANCE", "BALANCE_RESTORED"]
"""
    )
    return config


@contextmanager
def notifier(config: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(config.parent / "notify.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "callcredit_server.notify.cli", "--config", str(config), "run"],
            stderr=log,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def received(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    # The receiver may be writing its last line: only whole lines (ending in \n) count.
    *whole, _partial = log.read_text().split("\n")
    return [json.loads(line) for line in whole]


def wait_until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def delivered(log: Path, path: str) -> set[str]:
    return {r["event_id"] for r in received(log) if r["path"] == path and r["status"] == 200}


def test_signed_deliveries_survive_500s_and_timeouts(tmp_path: Path) -> None:
    url_db = f"sqlite:///{tmp_path / 'journal.db'}"
    with (
        server_process(url_db) as (_, target),
        receiver(tmp_path, "--hang-first", "1", "--fail-first", "1", "--hang-seconds", "1") as (
            url,
            log,
        ),
    ):
        seed(target)
        config = write_config(tmp_path, target, url)
        with notifier(config):
            top_ups(target, "acme", range(6))  # the 5th restores acme above 5
            top_ups(target, "other", range(100, 102))
            # acme: created, LOW, 6 top-ups, RESTORED -> 9 events; "other" goes nowhere.
            wait_until(lambda: len(delivered(log, "/all")) == 9, "9 deliveries to /all")
            wait_until(lambda: len(delivered(log, "/alerts")) == 2, "2 deliveries to /alerts")
    records = received(log)
    for record in records:
        assert verify(SECRET, record["signature"], record["body"].encode(), int(time.time()))
        assert json.loads(record["body"])["event_id"] == record["event_id"]
    final = [r for r in records if r["status"] == 200]
    assert {r["attempt"] for r in final} == {3}  # a timeout, a 500, then delivered
    # Deliveries are not ordered (retries, concurrency): the event's place orders them.
    bodies = sorted(
        (json.loads(r["body"]) for r in final if r["path"] == "/alerts"),
        key=lambda b: (int(b["seq"]), b.get("index", 0)),
    )
    assert [b["kind"] for b in bodies] == ["EVENT_KIND_LOW_BALANCE", "EVENT_KIND_BALANCE_RESTORED"]
    assert {json.loads(r["body"])["account_id"] for r in final} == {"acme"}


def test_a_delivery_that_keeps_failing_is_dead_lettered_and_listed(tmp_path: Path) -> None:
    with (
        server_process(f"sqlite:///{tmp_path / 'journal.db'}") as (_, target),
        receiver(tmp_path, "--status", "503") as (url, log),
    ):
        seed(target)
        config = write_config(tmp_path, target, url, max_attempts=3)
        with notifier(config):

            def listed() -> list[dict[str, Any]]:
                out = subprocess.run(
                    [sys.executable, "-m", "callcredit_server.notify.cli", "--config",
                     str(config), "dead-letters", "--json"],
                    capture_output=True, check=True, text=True,
                ).stdout  # fmt: skip
                return [json.loads(line) for line in out.splitlines()]

            # acme: created and LOW, each to /all; LOW to /alerts too.
            wait_until(lambda: len(listed()) == 3, "3 dead letters")
    dead = listed()
    assert {(d["endpoint"], d["attempts"]) for d in dead} == {("everything", 3), ("alerts", 3)}
    assert all(d["last_error"] == "HTTP 503 (attempt 3 of 3)" for d in dead)
    attempts = [r for r in received(log) if r["event_id"] == dead[0]["event_id"]]
    assert len([r for r in attempts if r["path"] == "/all"]) == 3
    requeue = subprocess.run(
        [sys.executable, "-m", "callcredit_server.notify.cli", "--config", str(config),
         "requeue", dead[0]["event_id"], dead[0]["endpoint"]],
        check=False,
    )  # fmt: skip
    assert requeue.returncode == 0
    assert len(listed()) == 2


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_notifier_killed_with_sigkill_resumes_where_it_stopped(tmp_path: Path) -> None:
    with (
        server_process(f"sqlite:///{tmp_path / 'journal.db'}") as (_, target),
        receiver(tmp_path) as (url, log),
    ):
        seed(target)
        config = write_config(tmp_path, target, url)
        with notifier(config) as process:
            top_ups(target, "acme", range(40))
            wait_until(lambda: len(delivered(log, "/all")) >= 10, "the first deliveries")
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        top_ups(target, "acme", range(40, 80))  # while no notifier runs
        with notifier(config):
            # created, LOW, 80 top-ups, RESTORED
            wait_until(lambda: len(delivered(log, "/all")) == 83, "all 83 events")
    ids = [r["event_id"] for r in received(log) if r["path"] == "/all" and r["status"] == 200]
    assert len(set(ids)) == 83
    # At least once: a delivery in flight at the kill may come twice, never more.
    assert len(ids) - len(set(ids)) <= 8  # at most `concurrency` were in flight
