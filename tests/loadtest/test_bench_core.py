"""A short run of scripts/bench_core.py, as the writer runs the machine and as the
projector does, and its instruction-counting pair. No timing assertions."""

from __future__ import annotations

import json
import re

from tests.loadtest.helpers import run_script


def run(*flags: str) -> str:
    return run_script("bench_core.py", "--calls", "200", "--in-flight", "50", *flags)


def test_the_writer_and_the_projector_machines_each_print_a_rate() -> None:
    for flags in (["--writer"], []):
        out = run("--mix", "calls-hot", "--repeat", "1", *flags)
        assert re.search(r"^calls-hot +new +best +[\d,]+ +median +[\d,]+$", out, re.MULTILINE), out


def test_one_run_in_process_and_its_build_only_twin() -> None:
    applied = json.loads(run("--one", "calls-hot", "--writer"))["ops_per_second"]
    assert applied > 0
    assert json.loads(run("--one", "calls-hot", "--writer", "--build-only")) == {
        "ops_per_second": 0.0
    }
