"""`callcredit-server` as a real process with any flags, its log kept in a file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def server_process(
    log: Path, args: Sequence[str], env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Start `callcredit-server ARGS` (give --listen 127.0.0.1:0); yield it and its port.

    Stderr goes to `log` (a file, not a pipe: a chatty DEBUG server never blocks on it).
    On exit the server gets SIGTERM and is waited for, so the log is complete.
    """
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "callcredit_server.cli", *args],
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    try:
        deadline = time.monotonic() + 30
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
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
