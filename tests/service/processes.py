"""`callcredit-server` as a real process, for tests and benchmark scripts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def server_process(database_url: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`callcredit-server` on a free port; yields the process and its target."""
    process = subprocess.Popen(
        [sys.executable, "-m", "callcredit_server.cli", "--listen", "127.0.0.1:0",
         "--database-url", database_url, "--log-level", "WARNING"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert process.stderr is not None
        for line in process.stderr:
            found = re.search(r"listening on port (\d+)", line)
            if found:
                yield process, f"127.0.0.1:{found.group(1)}"
                break
        else:
            raise AssertionError(f"server did not start (exit {process.wait()})")
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
