"""Which build of the state machine runs, and a refusal to run a stale compiled one.

`make compiled` (scripts/build_compiled.py) compiles core/*.py, and the journal's
command codec (codec.py) that every record goes through, with mypyc into extension
modules beside them, which Python imports before the .py files. A source edited after
that build would silently not run: the build records the digest of the sources it
compiled (core/.compiled-sources), and importing callcredit_server refuses a compiled
core whose sources have changed since, saying what to run.
"""

from __future__ import annotations

import hashlib
from importlib.util import find_spec
from pathlib import Path

CORE = Path(__file__).resolve().parent / "core"
DIGEST_FILE = ".compiled-sources"  # in core/, written by scripts/build_compiled.py
CODEC = "codec.py"  # beside core/: compiled with it


def compiled_sources(core: Path = CORE) -> list[Path]:
    """What the build compiles: the core's .py files, in name order, then the codec."""
    return [*sorted(core.glob("*.py")), core.parent / CODEC]


def sources_digest(core: Path = CORE) -> str:
    """sha256 over the compiled sources, names (from the package) and contents."""
    digest = hashlib.sha256()
    for path in compiled_sources(core):
        name = path.relative_to(core.parent).as_posix()
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def stale_reason(compiled: bool, core: Path = CORE) -> str | None:
    """Why a compiled core must not run (its sources changed since the build), or None."""
    if not compiled:
        return None
    recorded = core / DIGEST_FILE
    if not recorded.exists():
        return f"the compiled core has no {DIGEST_FILE}: it predates this check"
    if recorded.read_text(encoding="ascii").strip() != sources_digest(core):
        return "the core's sources changed since it was compiled"
    return None


def mixed_reason(core_compiled: bool, codec_compiled: bool) -> str | None:
    """Why the codec must not run beside this core, or None. A compiled codec builds
    and recognises the compiled core's classes only: beside the pure core it would
    refuse every command (a compiled core with the codec pure works, if slower)."""
    if codec_compiled and not core_compiled:
        return "the codec is compiled but the core is not (its compiled files were removed)"
    return None


def check_core_build() -> None:
    """Raise ImportError if the compiled core is stale, or the codec compiled without
    it (run at package import)."""
    from callcredit_server.core import COMPILED

    codec = find_spec(f"{__package__}.{CODEC.removesuffix('.py')}")
    codec_compiled = codec is not None and not str(codec.origin).endswith(".py")
    reason = stale_reason(COMPILED) or mixed_reason(COMPILED, codec_compiled)
    if reason is not None:
        raise ImportError(f"{reason}: run `make compiled` to rebuild it, or `make pure`")
