"""A short run of scripts/bench_projector.py: the journal is built, projected to its end,
and a figure printed. No timing assertions."""

from __future__ import annotations

import re

from tests.loadtest.helpers import run_script


def test_a_tiny_projector_run_projects_the_whole_journal() -> None:
    out = run_script("bench_projector.py", "--accounts", "50", "--calls", "700", "--renews", "1",
                     "--row", "64", "--repeat", "1")  # fmt: skip
    assert "2,100 records:" in out, out  # 700 calls: reserve, renew, release
    assert re.search(r"best \d+\.\d, median \d+\.\d µs per record", out), out


def test_build_only_projects_nothing() -> None:
    out = run_script("bench_projector.py", "--accounts", "20", "--calls", "100", "--repeat", "1",
                     "--build-only")  # fmt: skip
    assert out == "", out
