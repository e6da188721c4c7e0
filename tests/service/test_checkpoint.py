"""The journal's WAL is checkpointed off the writer's commit path (SQLite)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from callcredit_server import writer
from callcredit_server.app import Settings
from callcredit_server.journal import Journal
from tests.journal.test_journal import rows_in_the_file
from tests.service.conftest import FakeClock, open_harness


async def test_the_writer_checkpoints_the_wal_on_a_thread_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer, "CHECKPOINT_SECONDS", 0.0)  # after every commit
    threads: list[str] = []
    checkpoint = Journal.checkpoint

    def recorded(journal: Journal) -> None:
        threads.append(threading.current_thread().name)
        checkpoint(journal)

    monkeypatch.setattr(Journal, "checkpoint", recorded)
    path = tmp_path / "journal.db"
    settings = Settings(
        listen="127.0.0.1:0", database_url=f"sqlite:///{path}", snapshot_dir=str(tmp_path / "s")
    )
    h = await open_harness(settings, FakeClock())
    try:
        await h.funded_account("acme", 1_000)
        for _ in range(100):  # the checkpoint runs beside the answers, not before them
            if rows_in_the_file(path):
                break
            await asyncio.sleep(0.05)
        assert rows_in_the_file(path) > 0
        assert threads and all(name.startswith("checkpoint") for name in threads)
    finally:
        await h.channel.close()
        await h.running.stop(grace_seconds=0.5)
