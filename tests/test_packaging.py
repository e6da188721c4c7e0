"""The generated code is fresh, and `pip install .` ships everything a server needs."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = REPO / "client" / "callcredit" / "v1"


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_protos.py"), str(tmp_path)], check=True
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "callcredit" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir() if p.is_file()}
    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    assert not stale, f"run `python scripts/gen_protos.py`: stale generated files {stale}"


def test_wheel_holds_the_contract_the_server_and_the_entry_points(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("callcredit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "callcredit/v1/admin_pb2.py",
        "callcredit/v1/credit_control_pb2_grpc.py",
        "callcredit/py.typed",
        "callcredit/dialer.py",
        "callcredit_server/core/machine.py",
        "callcredit_server/journal.py",
        "callcredit_server/py.typed",
    ):
        assert needed in names, needed
    (entry_points,) = (n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("callcredit-server", "callcredit-admin", "callcredit-example-dialer"):
        assert script in text
