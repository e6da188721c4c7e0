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


def test_phases_split_each_record_s_cpu_within_its_total() -> None:
    """Every phase is reached through the real Projector.step, and they add up to no
    more than the record's whole CPU (the step's own work is the rest)."""
    out = run_script("bench_projector.py", "--accounts", "50", "--calls", "700", "--renews", "1",
                     "--row", "64", "--repeat", "1", "--phases")  # fmt: skip
    total = re.search(r"2,100 records: (\d+\.\d) µs CPU per record", out)
    phases = re.search(r"read (\S+), apply (\S+), rows (\S+), store (\S+) µs", out)
    assert total and phases, out
    spent = [float(n) for n in phases.groups()]
    assert min(spent) > 0, out
    assert sum(spent) <= float(total[1]) + 0.1, out  # the total is printed to 0.1 µs
