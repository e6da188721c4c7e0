"""What the load test comparisons share: the Redis they compare against."""

from __future__ import annotations

import socket

REDIS = ("127.0.0.1", 6379)


def redis_answers() -> bool:
    """Whether a Redis answers PING on REDIS."""
    try:
        with socket.create_connection(REDIS, timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
