"""`callcredit-server` as a real process, for tests and benchmark scripts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


@contextmanager
def configured_server_process(
    log: Path, args: Sequence[str], env: dict[str, str] | None = None, *, kill: bool = False
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start `callcredit-server ARGS` (give --listen 127.0.0.1:0); yield it and its port.

    Stderr goes to `log` (a file, not a pipe: a chatty DEBUG server never blocks on it).
    On exit the server gets SIGTERM (SIGKILL with `kill`) and is waited for, so the log
    is complete.
    """
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "callcredit_server.cli", *args],
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            found = re.search(r"listening on port (\d+)", log.read_text(errors="replace"))
            if found:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {log.read_text()}")
            time.sleep(0.05)
        yield process, int(found.group(1))
    finally:
        if process.poll() is None:
            if kill:
                process.kill()
            else:
                process.terminate()
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def server_process(database_url: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`callcredit-server` on a free port and `database_url`; yields the process and its
    target. Killed (SIGKILL) on exit."""
    args = ["--listen", "127.0.0.1:0", "--database-url", database_url, "--log-level", "WARNING"]
    with (
        tempfile.TemporaryDirectory() as folder,
        configured_server_process(Path(folder) / "server.log", args, kill=True) as (process, port),
    ):
        yield process, f"127.0.0.1:{port}"
