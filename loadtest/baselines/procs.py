"""Server processes the benchmark starts, and the CPU time it reads from /proc."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from callcredit_server.launch import (
    LOG_TAIL_CHARS,
    POLL_INTERVAL_SECONDS,
    SERVER_COMMAND,
    START_TIMEOUT_SECONDS,
    ServerDidNotStart,
    ServerProcess,
    serving,
)

REPO = Path(__file__).resolve().parent.parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _env(first: str = "") -> dict[str, str]:
    # The caller's PYTHONPATH first (after `first`): a run can put another version of
    # the server in front of this checkout (docs/benchmarks.md compares against one).
    path = (first, os.environ.get("PYTHONPATH"), str(REPO))
    return {"PYTHONPATH": os.pathsep.join(filter(None, path))}


def callcredit_server(
    database_url: str, snapshot_dir: Path, cwd: Path, server_path: str = ""
) -> AbstractContextManager[ServerProcess]:
    """`callcredit-server` on a free port, default durability, warnings only; its log is
    cwd/server.log. `server_path`: a directory holding another `callcredit_server`
    package, run instead of this checkout's (see `legacy_callcredit_server`)."""
    args = ["--listen", "127.0.0.1:0", "--database-url", database_url,
            "--snapshot-dir", str(snapshot_dir), "--log-level", "WARNING"]  # fmt: skip
    return serving(args, cwd / "server.log", env=_env(server_path), cwd=cwd)


@contextmanager
def legacy_callcredit_server(
    database_url: str, snapshot_dir: Path, cwd: Path, server_path: str
) -> Iterator[ServerProcess]:
    """A server from before the ready file (such as 8852747, the baseline of issue 12),
    from the `callcredit_server` package in `server_path`: told its port, and serving
    once its log says `listening on port`."""
    port = free_port()
    args = ["--listen", f"127.0.0.1:{port}", "--database-url", database_url,
            "--snapshot-dir", str(snapshot_dir), "--log-level", "WARNING"]  # fmt: skip
    command = [*SERVER_COMMAND, *args]
    log = cwd / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **_env(server_path)},
        )
    server = ServerProcess(process, log, cwd / "unused.ready")
    try:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while "listening on port" not in server.log_text():
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServerDidNotStart(server.log_text()[-LOG_TAIL_CHARS:])
            time.sleep(POLL_INTERVAL_SECONDS)
        server.port = port
        yield server
    finally:
        server.stop()


@contextmanager
def echo_server(cwd: Path) -> Iterator[ServerProcess]:
    """The echo server (loadtest/baselines/echo_server.py) on a free port."""
    with (
        tempfile.TemporaryDirectory(prefix="echo-server-") as folder,
        serving(
            ["--listen", "127.0.0.1:0"],
            Path(folder) / "echo.log",
            env=_env(),
            cwd=cwd,
            command=(sys.executable, "-m", "loadtest.baselines.echo_server"),
        ) as server,
    ):
        yield server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def private_redis(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A redis-server of our own that fsyncs its append-only file before it answers
    (appendfsync always), with no RDB snapshots: durable per operation, like the others."""
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "yes", "--appendfsync", "always", "--dir", str(workdir),
         "--daemonize", "no", "--loglevel", "warning"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (exit {process.poll()})")
            time.sleep(0.05)
        yield process, port
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()


def _stat(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (field 3 on), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def _descendants(pids: Sequence[int]) -> list[int]:
    """Every live process below these ones (children, their children, ...), but those
    given: a child named with its parent counts once."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))  # ppid (field 4)
    given = set(pids)
    found: list[int] = []
    todo = list(pids)
    while todo:
        below = children.get(todo.pop(), [])
        found += [pid for pid in below if pid not in given]
        todo += below
    return found


def _ticks(pid: int) -> int:
    """utime + stime + cutime + cstime (fields 14-17) of a process; 0 once it is gone."""
    fields = _stat(pid)
    return 0 if fields is None else sum(int(field) for field in fields[11:15])


def tree_cpu_seconds(pids: Sequence[int]) -> tuple[float, float]:
    """User + system CPU seconds (all threads) of these processes, and of every process
    below them: the server and its projector child. Each counts its children that ended
    and were waited for, so a child that exits between two readings keeps its time; gone
    processes count 0."""
    own = sum(_ticks(pid) for pid in pids)
    below = sum(_ticks(pid) for pid in _descendants(pids))
    return own / CLOCK_TICKS, below / CLOCK_TICKS


def process_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds of these processes and every process below them (tree_cpu_seconds)."""
    return sum(tree_cpu_seconds(pids))


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over cores."""
    with open("/proc/stat", "rb") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def self_cpu_seconds() -> float:
    """CPU seconds of this (the load generator's) process, every thread."""
    times = os.times()
    return times.user + times.system
