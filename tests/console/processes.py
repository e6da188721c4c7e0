"""The console as a real process, and the CLI as an operator runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from callcredit_server.launch import serving

CONSOLE_COMMAND = (sys.executable, "-m", "callcredit_server.console")


@contextmanager
def console_process(
    log: Path, target: str, listen: str = "127.0.0.1:0", args: Sequence[str] = (), **env: str
) -> Iterator[str]:
    """`callcredit-console --target TARGET --listen LISTEN ARGS`, started by the launcher
    of every test server; yields its base URL (http://host:port). Stopped with SIGTERM
    on exit, as an operator stops it."""
    with serving(
        ["--target", target, "--listen", listen, *args], log, env=env, command=CONSOLE_COMMAND
    ) as console:
        yield f"http://{listen.rpartition(':')[0]}:{console.port}"


def admin_cli(target: str, *args: str) -> Any:
    """Run `callcredit-admin --target TARGET --json ARGS`; its JSON answer."""
    done = subprocess.run(
        [sys.executable, "-m", "callcredit.cli", "--target", target, "--json", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"callcredit-admin {' '.join(args)}: {done.stderr}")
    return json.loads(done.stdout) if done.stdout.strip() else None
