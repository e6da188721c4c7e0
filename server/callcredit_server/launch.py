"""Starting `callcredit-server` as a child process, and knowing when it serves.

The server says it serves by writing its ready file (`--ready-file PATH`): one JSON
object `{"port": N, "pid": P}`, written to a temporary file and renamed into place, so
a reader sees all of it or none of it. The "listening on port N" log line is for
operators; nothing parses it.

Every test and benchmark script starts its servers through `spawn` (or `serving`), the
one place that knows the command line, where the output goes and how to wait.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

SERVER_COMMAND = (sys.executable, "-m", "callcredit_server.cli")
START_TIMEOUT_SECONDS = 60.0  # recovery of a large journal included
STOP_TIMEOUT_SECONDS = 10.0
POLL_INTERVAL_SECONDS = 0.02
LOG_TAIL_CHARS = 3000  # of the log, in the error when a server does not start


def write_ready_file(path: Path, port: int) -> None:
    """Atomically publish {"port": port, "pid": this process} at `path`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps({"port": port, "pid": os.getpid()}), encoding="utf-8")
    temporary.replace(path)


def read_ready_file(path: Path, pid: int) -> int | None:
    """The port in the ready file written by process `pid`; None while there is none."""
    try:
        ready = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    if ready.get("pid") != pid:
        return None  # a file left by an earlier process
    port: int = ready["port"]
    return port


class ServerDidNotStart(Exception):
    """The child exited, or did not serve in time; the message ends with its log."""


class ServerProcess:
    """A started child: its process, its log file (stdout and stderr) and ready file."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, ready_file: Path) -> None:
        self.process = process
        self.log = log
        self.ready_file = ready_file
        self.port = 0  # known once it serves

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def poll_ready(self) -> bool:
        """Whether it serves (then `port` is set); never waits."""
        if not self.port:
            self.port = read_ready_file(self.ready_file, self.process.pid) or 0
        return self.port != 0

    def wait_ready(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> int:
        """Wait until it serves; its port. ServerDidNotStart if it exits or is late."""
        deadline = time.monotonic() + timeout_seconds
        while not self.poll_ready():
            code = self.process.poll()
            if code is not None:
                raise ServerDidNotStart(f"exited {code}:\n{self.log_text()[-LOG_TAIL_CHARS:]}")
            if time.monotonic() > deadline:
                raise ServerDidNotStart(
                    f"not serving after {timeout_seconds:.0f} s:\n"
                    f"{self.log_text()[-LOG_TAIL_CHARS:]}"
                )
            time.sleep(POLL_INTERVAL_SECONDS)
        return self.port

    def stop(self, *, kill: bool = False, timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> None:
        """SIGTERM (SIGKILL with `kill`, or when it outlives the timeout), then reap it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def spawn(
    args: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    command: Sequence[str] = SERVER_COMMAND,
) -> ServerProcess:
    """Start `command ARGS --ready-file LOG.ready` (callcredit-server by default) with
    stdout and stderr to the file `log` (a file, not a pipe: a chatty server never blocks
    on it); `env` is added to this process's environment. Does not wait."""
    ready_file = log.with_name(log.name + ".ready")
    ready_file.unlink(missing_ok=True)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, *args, "--ready-file", str(ready_file)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    return ServerProcess(process, log, ready_file)


@contextmanager
def serving(
    args: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    command: Sequence[str] = SERVER_COMMAND,
    kill: bool = False,
    start_timeout_seconds: float = START_TIMEOUT_SECONDS,
    stop_timeout_seconds: float = STOP_TIMEOUT_SECONDS,
) -> Iterator[ServerProcess]:
    """`spawn`, wait until it serves, yield it; on exit stop it (SIGTERM, or SIGKILL with
    `kill`) and wait for it, so its log is complete."""
    server = spawn(args, log, env=env, cwd=cwd, command=command)
    try:
        server.wait_ready(start_timeout_seconds)
        yield server
    finally:
        server.stop(kill=kill, timeout_seconds=stop_timeout_seconds)
