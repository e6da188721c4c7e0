"""Compile the state machine (server/callcredit_server/core/) with mypyc, in place, and
the journal's command codec (codec.py), which every record goes through: the writer
encodes each command it journals, and the projector and every start decode them.

    python scripts/build_compiled.py           # build: a .so beside each module
    python scripts/build_compiled.py --clean   # remove them: back to pure Python

The source stays the same Python; mypyc compiles it as mypy --strict reads it. Python
imports an extension module before the .py of the same name, so after a build the
editable install (`make dev`) runs the compiled core, and after --clean the pure one.
Nothing else changes: `pip install` never compiles, and a machine without a C compiler
(or without mypy, a dev tool) runs the pure-Python core. The server logs which one it
runs at start (`callcredit_server.core.build()`), and `make compiled` rebuilds only
when a core source is newer than its build.

Exit status 0 when built (or cleaned), 1 when it could not build: the pure-Python core
is then what runs, and the message says why.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

SERVER = Path(__file__).resolve().parent.parent / "server"
CORE = SERVER / "callcredit_server" / "core"
# The runtime mypyc shares between the compiled modules, built beside the core
# (callcredit_server/core__mypyc.*.so), not at the top of sys.path. Not inside
# core/: importing it would first import core/__init__, which needs it.
GROUP = "callcredit_server.core"
# corebuild.py by its path: importing the package would run its check on the old build.
_spec = importlib.util.spec_from_file_location("corebuild", CORE.parent / "corebuild.py")
if _spec is None or _spec.loader is None:
    raise ImportError(f"cannot load {CORE.parent / 'corebuild.py'}")
corebuild = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(corebuild)


def compiled_files() -> list[Path]:
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    shared = CORE.parent / f"core__mypyc{suffix}"
    codec = CORE.parent / (corebuild.CODEC.removesuffix(".py") + suffix)
    return sorted(p for p in CORE.iterdir() if p.name.endswith(suffix)) + [
        p for p in (codec, shared) if p.exists()
    ]


def clean() -> None:
    for path in compiled_files():
        path.unlink()
        print(f"removed {path.relative_to(SERVER)}")
    (CORE / corebuild.DIGEST_FILE).unlink(missing_ok=True)


def build() -> int:
    try:
        from mypyc.build import mypycify
        from setuptools import setup  # type: ignore[import-untyped]
    except ImportError as exc:
        print(f"cannot compile ({exc}): the core stays pure Python", file=sys.stderr)
        return 1
    if shutil.which((sysconfig.get_config_var("CC") or "cc").split()[0]) is None:
        print("no C compiler: the core stays pure Python", file=sys.stderr)
        return 1
    clean()
    # What is compiled: an edit made during the build leaves the build stale.
    digest = corebuild.sources_digest(CORE)
    names = [str(p.relative_to(SERVER)) for p in corebuild.compiled_sources(CORE)]
    with tempfile.TemporaryDirectory(prefix="callcredit-mypyc-") as work:
        here = Path.cwd()
        os.chdir(SERVER)  # mypyc names modules by their path from here
        try:
            extensions = mypycify(names, group_name=GROUP, target_dir=f"{work}/c")
            setup(
                name="callcredit-server-core",
                ext_modules=extensions,
                script_args=["-q", "build_ext", "--inplace", "--build-temp", f"{work}/o"],
            )
        except (SystemExit, Exception) as exc:  # a compiler error exits setup()
            clean()
            print(f"compiling failed ({exc}): the core stays pure Python", file=sys.stderr)
            return 1
        finally:
            os.chdir(here)
    (CORE / corebuild.DIGEST_FILE).write_text(digest + "\n", encoding="ascii")
    for path in compiled_files():
        print(f"built {path.relative_to(SERVER)}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules")
    args = parser.parse_args()
    if args.clean:
        clean()
        return 0
    return build()


if __name__ == "__main__":
    sys.exit(main())
