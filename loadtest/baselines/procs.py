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

from callcredit_server.launch import ServerProcess, serving

REPO = Path(__file__).resolve().parent.parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _env() -> dict[str, str]:
    # The caller's PYTHONPATH first: a run can put another version of the server in
    # front of this checkout (docs/benchmarks.md compares against one).
    return {"PYTHONPATH": os.pathsep.join(filter(None, (os.environ.get("PYTHONPATH"), str(REPO))))}


def callcredit_server(
    database_url: str, snapshot_dir: Path, cwd: Path
) -> AbstractContextManager[ServerProcess]:
    """`callcredit-server` on a free port, default durability, warnings only; its log is
    cwd/server.log."""
    args = ["--listen", "127.0.0.1:0", "--database-url", database_url,
            "--snapshot-dir", str(snapshot_dir), "--log-level", "WARNING"]  # fmt: skip
    return serving(args, cwd / "server.log", env=_env(), cwd=cwd)


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
