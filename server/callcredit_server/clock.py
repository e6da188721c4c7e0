"""The wall clock in Unix milliseconds: where the server, the console and the notifier
read it. The core never does: time is its argument."""

from __future__ import annotations

import time


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000
