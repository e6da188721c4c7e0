"""docs/architecture.md's module list is the tree: a module added, moved or removed fails here."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = (ROOT / "client" / "callcredit", ROOT / "server" / "callcredit_server")
GENERATED = ROOT / "client" / "callcredit" / "v1"


def _tree() -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in package.rglob("*.py")
        if GENERATED not in path.parents
    }


def _documented() -> set[str]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+\.py)` \|", section, flags=re.MULTILINE))


def test_the_module_list_matches_the_tree() -> None:
    tree, documented = _tree(), _documented()
    assert documented, "docs/architecture.md has no module table under '## Modules'"
    assert sorted(tree - documented) == [], "modules missing from docs/architecture.md"
    assert sorted(documented - tree) == [], "docs/architecture.md lists modules that do not exist"
