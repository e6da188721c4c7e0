"""A compiled core built from other sources than the tree's is refused (corebuild.py)."""

from __future__ import annotations

from pathlib import Path

from callcredit_server.corebuild import DIGEST_FILE, sources_digest, stale_reason


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
