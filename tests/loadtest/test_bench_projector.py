"""A short run of scripts/bench_projector.py: the journal is built, projected to its end,
and a figure printed. No timing assertions."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_projector.py"


def test_a_tiny_projector_run_projects_the_whole_journal() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--accounts", "50", "--calls", "700", "--renews", "1",
         "--row", "64", "--repeat", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    assert "2,100 records:" in out.stdout, report  # 700 calls: reserve, renew, release
    assert re.search(r"best \d+\.\d, median \d+\.\d µs per record", out.stdout), report


def test_build_only_projects_nothing() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--accounts", "20", "--calls", "100", "--repeat", "1",
         "--build-only"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == "", out.stdout
