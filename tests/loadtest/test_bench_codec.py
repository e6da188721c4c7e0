"""A short run of scripts/bench_codec.py: each command encoded and decoded, a figure
printed for each. No timing assertions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_codec.py"


def run(*flags: str) -> str:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--commands", "400", "--repeat", "2", *flags],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_a_tiny_run_times_both_directions() -> None:
    out = run()
    for what in ("encode", "decode"):
        assert re.search(rf"^{what}: 400 commands, best \d+\.\d\d µs CPU per command of 2 runs$",
                         out, re.MULTILINE), out  # fmt: skip


def test_none_only_prepares() -> None:
    assert run("--only", "none") == ""
