"""The README and docs/, walked as written.

Every fenced code block with a language in README.md and docs/*.md carries a marker on
the line before it: ``<!-- test: NAME -->`` when a test runs it (NAME below, or
tests/ops/test_deploy.py for the operations blocks), ``<!-- not run: WHY -->`` when it
is not meant to be run here (a benchmark, a placeholder, a root-only step). The README's
walk-through runs in sh against a fresh server, then its Python dialer snippet.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.service.processes import server_process

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUN_HERE = {"walk-through", "python"}
RUN_ELSEWHERE = {"openssl", "systemd-unit", "webhook-verify"}  # tests/ops/test_deploy.py,
# tests/notify/test_delivery.py

_BLOCK = re.compile(r"^```(\w+)\n", re.MULTILINE)
_MARKER = re.compile(r"<!-- (?:test: ([\w-]+)|not run: [^>]+) -->")


def marked_block(document: Path, name: str) -> str:
    """The fenced code block right after ``<!-- test: NAME -->`` in ``document``."""
    text = document.read_text(encoding="utf-8")
    found = re.search(rf"<!-- test: {name} -->\n```\w*\n(.*?)```\n", text, re.DOTALL)
    assert found, f"no block marked {name!r} in {document}"
    return found.group(1)


def test_every_code_block_says_whether_it_is_run() -> None:
    names: list[str] = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for block in _BLOCK.finditer(text):
            before = text[: block.start()].rstrip("\n").rsplit("\n", 1)[-1]
            marker = _MARKER.fullmatch(before)
            line = text[: block.start()].count("\n") + 1
            assert marker, f"{document.name}:{line}: a ```{block.group(1)} block without a marker"
            if marker.group(1):
                names.append(marker.group(1))
    assert sorted(names) == sorted(RUN_HERE | RUN_ELSEWHERE)


def test_the_readme_walk_through_and_dialer_snippet_run_as_written(tmp_path: Path) -> None:
    readme = REPO / "README.md"
    with server_process(f"sqlite:///{tmp_path / 'journal.db'}") as (_, target):
        env = {
            **os.environ,
            "CALLCREDIT_TARGET": target,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "COLUMNS": "80",
        }
        walk = subprocess.run(
            ["sh", "-e"],
            input=marked_block(readme, "walk-through"),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert walk.returncode == 0, walk.stdout + walk.stderr
        snippet = tmp_path / "dial.py"
        snippet.write_text(marked_block(readme, "python"))
        dial = subprocess.run(
            [sys.executable, str(snippet)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    out = walk.stdout
    for shown in (
        "₫19.66/s (₫1,179.6/min)",  # the tariff as put, in đồng
        "vn-std",
        "₫20,000",  # the top-up
        "20 calls: 20 placed",  # the campaign placed every call
        "Calls of acme",
        "Ledger of acme",
        "TOP_UP",
    ):
        assert shown in out, out
    assert "…" not in out
    # The admin tables fit 80 columns (the example dialer's lines are its own).
    tables = [line for line in out.splitlines() if not line.startswith("example-")]
    assert max(len(line) for line in tables) <= 80, out
    assert dial.returncode == 0, dial.stderr
    # Talked 5 s, billed one 6 s increment at 19.66 ₫/s: 117.96, rounded up to 118.
    assert dial.stdout.startswith("talked 5 s, billed 6 s,\ncharged 118, balance "), dial.stdout
