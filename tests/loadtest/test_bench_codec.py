"""A short run of scripts/bench_codec.py: each command encoded and decoded, a figure
printed for each. No timing assertions."""

from __future__ import annotations

import re

from tests.loadtest.helpers import run_script


def run(*flags: str) -> str:
    return run_script("bench_codec.py", "--commands", "400", "--repeat", "2", *flags)


def test_a_tiny_run_times_both_directions() -> None:
    out = run()
    for what in ("encode", "decode"):
        assert re.search(rf"^{what}: 400 commands, best \d+\.\d\d µs CPU per command of 2 runs$",
                         out, re.MULTILINE), out  # fmt: skip


def test_none_only_prepares() -> None:
    assert run("--only", "none") == ""
