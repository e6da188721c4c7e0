"""`callcredit-server` as a real process on a journal, for tests and benchmark scripts
(started by callcredit_server.launch, like every other)."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from callcredit_server.launch import serving


@contextmanager
def server_process(database_url: str, *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`callcredit-server` on a free port and `database_url`, with `flags` added; yields
    the process and its target. Killed (SIGKILL) on exit."""
    args = [
        "--listen", "127.0.0.1:0", "--database-url", database_url, "--log-level", "WARNING",
        *flags,
    ]  # fmt: skip
    with (
        tempfile.TemporaryDirectory() as folder,
        serving(args, Path(folder) / "server.log", kill=True) as server,
    ):
        yield server.process, server.target
