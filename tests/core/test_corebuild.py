"""A compiled core built from other sources than the tree's is refused (corebuild.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import callcredit_server
from callcredit_server.core import COMPILED
from callcredit_server.corebuild import DIGEST_FILE, mixed_reason, sources_digest, stale_reason


def _core(folder: Path) -> Path:
    """A package folder's core/, with the codec beside it (both are compiled)."""
    core = folder / "core"
    core.mkdir()
    (core / "machine.py").write_text("X = 1\n")
    (core / "model.py").write_text("Y = 2\n")
    (folder / "codec.py").write_text("W = 0\n")
    return core


def test_a_pure_core_is_never_stale(tmp_path: Path) -> None:
    assert stale_reason(False, _core(tmp_path)) is None


def test_a_compiled_core_runs_while_its_sources_are_those_it_was_built_from(
    tmp_path: Path,
) -> None:
    core = _core(tmp_path)
    (core / DIGEST_FILE).write_text(sources_digest(core) + "\n")
    assert stale_reason(True, core) is None


def test_an_edit_after_the_build_makes_it_stale(tmp_path: Path) -> None:
    core = _core(tmp_path)
    (core / DIGEST_FILE).write_text(sources_digest(core) + "\n")
    (core / "model.py").write_text("Y = 3\n")
    assert stale_reason(True, core) == "the core's sources changed since it was compiled"


def test_an_edit_to_the_codec_makes_it_stale(tmp_path: Path) -> None:
    core = _core(tmp_path)
    (core / DIGEST_FILE).write_text(sources_digest(core) + "\n")
    (tmp_path / "codec.py").write_text("W = 1\n")
    assert stale_reason(True, core) == "the core's sources changed since it was compiled"


def test_a_new_source_file_makes_it_stale(tmp_path: Path) -> None:
    core = _core(tmp_path)
    (core / DIGEST_FILE).write_text(sources_digest(core) + "\n")
    (core / "rating.py").write_text("Z = 4\n")
    assert stale_reason(True, core) is not None


def test_a_build_without_a_recorded_digest_is_refused(tmp_path: Path) -> None:
    reason = stale_reason(True, _core(tmp_path))
    assert reason is not None and "predates" in reason


@pytest.mark.parametrize(
    ("core_compiled", "codec_compiled", "refused"),
    [(False, False, False), (True, True, False), (True, False, False), (False, True, True)],
)
def test_only_a_compiled_codec_beside_a_pure_core_is_refused(
    core_compiled: bool, codec_compiled: bool, refused: bool
) -> None:
    assert (mixed_reason(core_compiled, codec_compiled) is not None) == refused


@pytest.mark.skipif(not COMPILED, reason="needs the compiled build (make compiled)")
def test_a_package_whose_core_lost_its_compiled_files_is_refused_at_import(
    tmp_path: Path,
) -> None:
    """The build as `make compiled` leaves it, but for the core's own compiled files:
    the codec, still compiled, would refuse every command the pure core builds."""
    package = tmp_path / "callcredit_server"
    shutil.copytree(
        Path(callcredit_server.__file__).parent,
        package,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for built in (package / "core").glob("*.so"):
        built.unlink()
    out = subprocess.run(
        [sys.executable, "-c", "import callcredit_server"],
        capture_output=True, text=True, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert out.returncode != 0
    assert "the codec is compiled but the core is not" in out.stderr, out.stderr
