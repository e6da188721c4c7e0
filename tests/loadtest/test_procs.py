"""The benchmarks' CPU readings count a server's child processes (its projector)."""

from __future__ import annotations

import subprocess
import sys
import time

from loadtest.baselines.procs import _descendants, process_cpu_seconds, tree_cpu_seconds

# A parent that starts a child burning ~0.4 s of CPU (then a zombie until waited for),
# and waits for it without working.
_PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
sys.stdout.write("started\\n"); sys.stdout.flush()
sys.stdin.readline()  # the test reads the tree while the child is alive, then says go on
child.wait()
sys.stdout.write("reaped\\n"); sys.stdout.flush()
sys.stdin.readline()
"""
_CHILD = """
import time
end = time.process_time() + 0.4
while time.process_time() < end:
    pass
"""


def test_a_childs_cpu_counts_while_it_runs_and_after_it_is_reaped() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, _CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdin is not None and parent.stdout is not None
    try:
        assert parent.stdout.readline() == "started\n"
        deadline = time.monotonic() + 10
        own, below = tree_cpu_seconds([parent.pid])
        while below < 0.3 and time.monotonic() < deadline:  # the child is burning its CPU
            time.sleep(0.05)
            own, below = tree_cpu_seconds([parent.pid])
        assert below >= 0.3, f"the child's CPU was not counted: {below:.2f} s"
        assert own < 0.3, f"the parent only waits, yet {own:.2f} s"
        # Named with its parent, the child counts once, as one of those given.
        (child,) = _descendants([parent.pid])
        both_own, both_below = tree_cpu_seconds([parent.pid, child])
        assert both_own >= 0.3 and both_below < 0.3, (both_own, both_below)
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert parent.stdout.readline() == "reaped\n"
        # Gone, the child's time is its parent's (cutime): the total does not drop.
        assert process_cpu_seconds([parent.pid]) >= 0.3
        parent.stdin.write("\n")
        parent.stdin.flush()
        assert parent.wait(timeout=10) == 0
    finally:
        parent.kill()
        parent.wait()
