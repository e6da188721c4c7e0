"""The server's wheel carries the console whole: its templates and the vendored htmx."""

from __future__ import annotations

from pathlib import Path

from tests.test_packaging import REPO, build_wheel

CONSOLE = REPO / "server" / "callcredit_server" / "console"


def test_the_server_wheel_holds_the_consoles_templates_and_static_files(tmp_path: Path) -> None:
    names = set(build_wheel(REPO, tmp_path).namelist())
    for folder in ("templates", "static"):
        files = sorted((CONSOLE / folder).iterdir())
        assert files, folder
        for path in files:
            assert f"callcredit_server/console/{folder}/{path.name}" in names
