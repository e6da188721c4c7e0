"""Server processes the benchmark starts, and the CPU time it reads from /proc."""

from __future__ import annotations

import collections
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
STDERR_LINES_KEPT = 50
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """A child process serving on a port it prints as `listening on port N`.

    Its stderr is read to the end by a thread (keeping the last lines for errors), so a
    chatty server can never block on a full pipe while the benchmark runs."""

    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process = process
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)

    @property
    def pid(self) -> int:
        return self.process.pid

    def drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.tail.append(line.rstrip())


@contextmanager
def listening_process(
    argv: Sequence[str], *, cwd: Path, pattern: str = r"listening on port (\d+)"
) -> Iterator[ServerProcess]:
    """Start argv, wait for it to print its port on stderr, yield it; kill it after."""
    process = subprocess.Popen(
        list(argv),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # The caller's PYTHONPATH first: a run can put another version of the server
        # in front of this checkout (docs/benchmarks.md compares against one).
        env={
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(REPO)))),
        },
    )
    try:
        assert process.stderr is not None
        early: list[str] = []
        port = 0
        for line in process.stderr:
            early.append(line.rstrip())
            found = re.search(pattern, line)
            if found:
                port = int(found.group(1))
                break
        if not port:
            raise RuntimeError(
                f"{argv[0]} did not start (exit {process.wait()}): " + " | ".join(early[-10:])
            )
        server = ServerProcess(process, port)
        server.tail.extend(early)
        threading.Thread(target=server.drain, daemon=True).start()
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()


def callcredit_server(
    database_url: str, snapshot_dir: Path, cwd: Path
) -> AbstractContextManager[ServerProcess]:
    """`callcredit-server` on a free port, default durability, warnings only."""
    return listening_process(
        [sys.executable, "-m", "callcredit_server.cli", "--listen", "127.0.0.1:0",
         "--database-url", database_url, "--snapshot-dir", str(snapshot_dir),
         "--log-level", "WARNING"],
        cwd=cwd,
    )  # fmt: skip


def echo_server(cwd: Path) -> AbstractContextManager[ServerProcess]:
    """The echo server (loadtest/baselines/echo_server.py) on a free port."""
    return listening_process(
        [sys.executable, "-m", "loadtest.baselines.echo_server", "--listen", "127.0.0.1:0"],
        cwd=cwd,
    )


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


def process_cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of these processes (all their threads); gone ones count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS


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
