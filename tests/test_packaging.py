"""The generated code is fresh, and the two distributions ship what they should.

`callcredit` (client/) is what a dialer installs: the contract, the dialer and admin
libraries and the CLI, and none of the server's dependencies. `callcredit-server` (the
root) is the server, and requires exactly the `callcredit` of the same checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import pytest

REPO = Path(__file__).resolve().parent.parent
CLIENT = REPO / "client"
GENERATED = CLIENT / "callcredit" / "v1"
# Modules a client-only install must not be able to import: the server and what only it uses.
SERVER_ONLY = (
    "callcredit_server",
    "sqlalchemy",
    "psycopg",
    "uvloop",
    "prometheus_client",
    "orjson",
)


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


def copy_of_client(tmp_path: Path) -> Path:
    """A copy of client/ as a fresh clone has it, to build in.

    pip builds in the source tree: a build in client/ itself would leave client/build/
    behind, a second copy of the package.
    """
    copy = tmp_path / "client"
    shutil.copytree(
        CLIENT, copy, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    return copy


def build_wheel(source: Path, out: Path) -> zipfile.ZipFile:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=True,
    )  # fmt: skip
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def read_dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = (n for n in wheel.namelist() if n.endswith(f".dist-info/{name}"))
    return wheel.read(path).decode()


def test_the_client_wheel_holds_the_contract_the_libraries_and_the_cli(tmp_path: Path) -> None:
    wheel = build_wheel(copy_of_client(tmp_path), tmp_path / "wheel")
    names = set(wheel.namelist())
    for needed in (
        "callcredit/v1/admin_pb2.py",
        "callcredit/v1/admin_pb2.pyi",
        "callcredit/v1/credit_control_pb2_grpc.py",
        "callcredit/py.typed",
        "callcredit/dialer.py",
        "callcredit/admin.py",
        "callcredit/cli.py",
        "callcredit/example_dialer.py",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith("callcredit_server/")]
    entry_points = read_dist_info(wheel, "entry_points.txt")
    assert "callcredit-admin" in entry_points
    assert "callcredit-example-dialer" in entry_points
    assert "callcredit-server" not in entry_points
    requires = HeaderParser().parsestr(read_dist_info(wheel, "METADATA")).get_all("Requires-Dist")
    assert requires is not None
    for server_only in ("sqlalchemy", "psycopg", "uvloop", "prometheus-client", "orjson"):
        assert not [r for r in requires if r.lower().startswith(server_only)], server_only


def test_the_server_wheel_holds_the_server_and_requires_this_client(tmp_path: Path) -> None:
    wheel = build_wheel(REPO, tmp_path)
    names = set(wheel.namelist())
    for needed in (
        "callcredit_server/core/machine.py",
        "callcredit_server/journal.py",
        "callcredit_server/py.typed",
    ):
        assert needed in names, needed
    assert not [n for n in names if n.startswith("callcredit/")]
    assert "callcredit-server" in read_dist_info(wheel, "entry_points.txt")
    requires = HeaderParser().parsestr(read_dist_info(wheel, "METADATA")).get_all("Requires-Dist")
    # Lock step: exactly the client version of this checkout, so that a server never runs
    # against another version of the contract.
    version = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["version"]
    assert requires is not None
    assert f"callcredit=={version}" in requires


def test_the_environment_runs_the_client_of_this_checkout() -> None:
    """`make test` installs callcredit from ./client, not from an index."""
    direct_url = metadata.distribution("callcredit").read_text("direct_url.json")
    assert direct_url is not None, "callcredit was not installed from a local directory"
    url = urlparse(json.loads(direct_url)["url"])
    assert url.scheme == "file"
    assert Path(url2pathname(url.path)).resolve() == CLIENT


@pytest.mark.install
@pytest.mark.timeout(180)
def test_a_client_only_install_runs_without_the_server_dependencies(tmp_path: Path) -> None:
    """What a dialer's host does: a fresh venv and `pip install ./client`, nothing else.

    Needs PyPI or a pip cache for grpcio and the rest (about 15 s); never skipped.
    """
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(copy_of_client(tmp_path))],
        check=True,
        env=env,
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, capture_output=True, text=True, env=env, check=False)

    imported = run(str(python), "-c", "from callcredit.dialer import DialerClient; print('ok')")
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == "ok\n"
    admin = run(str(venv / "bin" / "callcredit-admin"), "--help")
    assert admin.returncode == 0, admin.stderr
    assert "topup" in admin.stdout
    assert (venv / "bin" / "callcredit-example-dialer").exists()
    sqlalchemy = run(str(python), "-c", "import sqlalchemy")
    assert sqlalchemy.returncode != 0
    assert "No module named 'sqlalchemy'" in sqlalchemy.stderr
    find = "import importlib.util as u, sys; print([m for m in sys.argv[1:] if u.find_spec(m)])"
    importable = run(str(python), "-c", find, *SERVER_ONLY)
    assert importable.returncode == 0, importable.stderr
    assert importable.stdout == "[]\n"
