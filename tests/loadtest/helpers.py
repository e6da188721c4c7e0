"""What the load test comparisons share: the Redis they compare against, and a short
run of a benchmark script."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

REDIS = ("127.0.0.1", 6379)
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run_script(name: str, *flags: str) -> str:
    """scripts/`name` with `flags`: its stdout, once it exited 0 within two minutes."""
    out = subprocess.run(
        [sys.executable, str(SCRIPTS / name), *flags], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def redis_answers() -> bool:
    """Whether a Redis answers PING on REDIS."""
    try:
        with socket.create_connection(REDIS, timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
