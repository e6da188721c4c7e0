"""Snapshots: the whole state at one journal seq, so a start replays only what follows.

A snapshot is a file `snapshot-<seq>.json.gz` in the snapshot directory, gzip-compressed
JSON lines (format 2): a header line (format, seq, creation time); the state image
(`StateMachine.image()`, versioned itself: core/image.py) without its rows; the rows as
lines of `[section, [row, ...]]`, at most ROWS_PER_LINE each, accounts then calls then
keys; and a last line with the sha256 of the lines between. A start reads it as a
stream (`load_snapshot`): each line is built into objects as it is parsed, so the
decoded image and the state never exist together (with 1M accounts, format 1's one
JSON document took ~2.1 GiB at its peak, of which ~0.8 was the parser's own). Format 1
(one header line, then the whole image as one document) is still read. A file is
written to a temporary name, fsynced, and renamed, so a crash leaves either the whole
file or none.

The projector takes the snapshots (projector.py), not the writer: its state is the
journal's committed records re-applied, so a snapshot never holds a record a crash could
take back, and no server ever pauses for one. The projector forks: the child holds a
copy-on-write view of the projector's state at that instant, serialises it, renames it
into place and exits; the projector's only pause is the fork() itself. The child runs at
the lowest priority (NICENESS), touches nothing but the state and its file (no
database, no logging locks), dies with its parent (PR_SET_PDEATHSIG), and leaves via
os._exit; a child killed mid-write leaves its temporary file, which `discard_older`
deletes. Snapshots beyond the journal's end (a database restored from an older backup
than its snapshot folder) are deleted on start.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import gzip
import hashlib
import itertools
import json
import os
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from callcredit_server.core import StateMachine

SNAPSHOT_FORMAT = 2
READABLE_FORMATS = (1, 2)
# The image's row lists, in the order StateMachine.from_image reads them.
SECTIONS = ("accounts", "calls", "keys")
ROWS_PER_LINE = 10_000  # bounds what a reader holds decoded beyond the state it builds
# The newest ones, and the newest at or before the projection's watermark (discard_older);
# older files are deleted once a new one is done.
KEEP_SNAPSHOTS = 2
# The child yields the cores to the writer (and to its clients on a shared machine): with
# 1M accounts it works for seconds, and at full priority it took a core from a server
# that had two. A later snapshot only means a longer replay at the next start.
NICENESS = 19
_NAME = re.compile(r"snapshot-(\d{20})\.json\.gz")
_PR_SET_PDEATHSIG = 1


class SnapshotError(Exception):
    """A snapshot file could not be written or does not hold what it claims."""


@dataclass(frozen=True, slots=True)
class SnapshotFile:
    seq: int
    path: Path


def snapshot_path(directory: Path, seq: int) -> Path:
    return directory / f"snapshot-{seq:020d}.json.gz"


def list_snapshots(directory: Path) -> list[SnapshotFile]:
    """Snapshot files in `directory`, newest (highest seq) first."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.fullmatch(path.name)
        if match:
            found.append(SnapshotFile(int(match.group(1)), path))
    return sorted(found, key=lambda f: f.seq, reverse=True)


def _temporary_path(directory: Path, seq: int, pid: int) -> Path:
    return directory / f".{snapshot_path(directory, seq).name}.{pid}.tmp"


def write_snapshot(directory: Path, seq: int, image: dict[str, Any], created_at_ms: int) -> Path:
    """Write the image durably as the snapshot at `seq`: to a temporary name, fsynced,
    then renamed, the folder fsynced."""
    header = {"format": SNAPSHOT_FORMAT, "seq": seq, "created_at_ms": created_at_ms}
    directory.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(directory, seq, os.getpid())
    digest = hashlib.sha256()
    with open(temporary, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as packed:
            packed.write(json.dumps(header).encode() + b"\n")
            for line in _lines(image):  # orjson writes no newline inside a value
                digest.update(line)
                packed.write(line + b"\n")
            packed.write(orjson.dumps({"sha256": digest.hexdigest()}) + b"\n")
        raw.flush()
        os.fsync(raw.fileno())
    final = snapshot_path(directory, seq)
    os.replace(temporary, final)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return final


def _lines(image: dict[str, Any]) -> Iterator[bytes]:
    yield orjson.dumps({k: v for k, v in image.items() if k not in SECTIONS})
    for section in SECTIONS:
        rows = image[section]
        for start in range(0, len(rows), ROWS_PER_LINE):
            yield orjson.dumps([section, rows[start : start + ROWS_PER_LINE]])


def read_snapshot(path: Path) -> tuple[int, dict[str, Any]]:
    """(seq, state image) of a snapshot file, the whole image decoded; SnapshotError if
    it is damaged. A start builds the state with `load_snapshot` instead."""
    with _open(path) as (seq, reader):
        image = reader.head()
        for section in SECTIONS:
            image[section] = list(reader.rows(section))
        reader.finish()
    return seq, image


def load_snapshot(path: Path) -> tuple[int, StateMachine]:
    """(seq, the state) of a snapshot file, built as its lines are read; SnapshotError
    if it is damaged, InvariantViolation if the state it holds is broken.

    The state it returns is frozen out of the cyclic garbage collector (`gc.freeze`),
    with whatever else was alive when it was built (collected just before): it lives
    as long as the process and holds no reference cycles (from_image builds none), so
    no collection would ever free any of it. Built with the collector off, its millions
    of objects sat in the youngest generation, and the first allocation after ran a
    collection over all of them, then the next generation's another (1.3 s each at 1M
    accounts): a start paid for collections that could find nothing."""
    collecting = gc.isenabled()
    gc.collect()  # what is garbage now is not frozen with the state
    gc.disable()
    try:
        with _open(path) as (seq, reader):
            image = reader.head()
            for section in SECTIONS:  # from_image reads each in turn, as the file holds them
                image[section] = reader.rows(section)
            machine = StateMachine.from_image(image)
            reader.finish()
        gc.freeze()
    finally:
        if collecting:
            gc.enable()
    return seq, machine


@contextlib.contextmanager
def _open(path: Path) -> Iterator[tuple[int, _Reader]]:
    try:
        with gzip.open(path, "rb") as packed:
            header = json.loads(packed.readline())
            if not isinstance(header, dict):
                raise SnapshotError(f"snapshot {path}: no header")
            if header.get("format") not in READABLE_FORMATS:
                raise SnapshotError(
                    f"snapshot {path}: unsupported snapshot file format "
                    f"{header.get('format')!r} (this server reads "
                    f"{', '.join(map(str, READABLE_FORMATS))})"
                )
            seq = header.get("seq")
            if not isinstance(seq, int) or snapshot_path(path.parent, seq).name != path.name:
                raise SnapshotError(f"snapshot {path}: its header names seq {seq!r}")
            yield seq, _Reader(path, packed, header)
    except (OSError, EOFError, ValueError) as exc:
        raise SnapshotError(f"snapshot {path} cannot be read: {exc}") from exc


_END: list[Any] = ["", []]  # after the last line: no section is named ""


class _Reader:
    """A snapshot's image, line by line: its head, then the rows of each section in
    order, hashed as they are read; `finish` checks the hash and that nothing is left.

    Format 1 holds the whole image in one document: it is decoded at once, and served
    through the same calls."""

    def __init__(self, path: Path, packed: gzip.GzipFile, header: dict[str, Any]) -> None:
        self._path = path
        self._packed = packed
        self._digest = hashlib.sha256()
        self._pending: list[Any] | None = None
        self._whole: dict[str, Any] | None = None
        if header["format"] == 1:
            state = packed.read()
            if hashlib.sha256(state).hexdigest() != header.get("sha256"):
                raise SnapshotError(f"snapshot {path}: the state does not match its checksum")
            self._whole = orjson.loads(state)

    def head(self) -> dict[str, Any]:
        if self._whole is not None:
            return {k: v for k, v in self._whole.items() if k not in SECTIONS}
        head = self._line()
        if not isinstance(head, dict):
            raise SnapshotError(f"snapshot {self._path}: no image")
        return head

    def rows(self, section: str) -> Iterator[Any]:
        if self._whole is not None:
            return iter(self._whole[section])
        # chained in C: a generator resumed per row cost ~0.4 s of a start at 1M accounts
        return itertools.chain.from_iterable(self._lines_of(section))

    def _lines_of(self, section: str) -> Iterator[list[Any]]:
        """The rows of each line of `section`, a line at a time."""
        while True:
            if self._pending is None:
                self._pending = self._section_line()
            if self._pending[0] != section:
                return
            rows = self._pending[1]
            self._pending = None
            yield rows

    def finish(self) -> None:
        if self._whole is None and (self._pending or self._section_line()) is not _END:
            raise SnapshotError(f"snapshot {self._path}: rows out of order")

    def _section_line(self) -> list[Any]:
        line = self._packed.readline()
        if not line:
            raise SnapshotError(f"snapshot {self._path}: truncated (no checksum line)")
        value = orjson.loads(line)
        if isinstance(value, dict):  # the last line
            if value.get("sha256") != self._digest.hexdigest():
                raise SnapshotError(f"snapshot {self._path}: the state does not match its checksum")
            if self._packed.readline():
                raise SnapshotError(f"snapshot {self._path}: lines after its checksum")
            return _END
        if not (isinstance(value, list) and len(value) == 2 and value[0] in SECTIONS):
            raise SnapshotError(f"snapshot {self._path}: a line of rows is malformed")
        self._digest.update(line.rstrip(b"\n"))
        return value

    def _line(self) -> Any:
        line = self._packed.readline()
        self._digest.update(line.rstrip(b"\n"))
        return orjson.loads(line)


def discard_beyond(directory: Path, last_seq: int) -> list[Path]:
    """Delete snapshots of records the journal does not hold (a crash lost them)."""
    gone = []
    for found in list_snapshots(directory):
        if found.seq > last_seq:
            found.path.unlink()
            gone.append(found.path)
    return gone


def discard_older(directory: Path, projected_through: int, keep: int = KEEP_SNAPSHOTS) -> None:
    """Delete all but the newest `keep` snapshots and the newest one at or before
    `projected_through`, the projection's watermark: a restarted projector rebuilds its
    state from that one (projector.open_projector), and once the journal is pruned no
    other snapshot can stand in for it while the projection is behind the newest ones."""
    found = list_snapshots(directory)  # newest first
    projectors = next((f for f in found if f.seq <= projected_through), None)
    for older in found[keep:]:
        if older is not projectors:
            older.path.unlink(missing_ok=True)
    for stale in directory.glob(".snapshot-*.tmp"):  # a child killed mid-write
        with contextlib.suppress(OSError):
            if not _pid_alive(int(stale.name.rsplit(".", 2)[-2])):
                stale.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fork_snapshot(machine: StateMachine, seq: int, directory: Path, created_at_ms: int) -> int:
    """Start a child process that writes the snapshot of `machine` at `seq`; its pid."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1  # the child: never return into the parent's code
    try:
        _die_with(parent)
        os.nice(NICENESS)
        gc.disable()  # touching every object would copy every page
        write_snapshot(directory, seq, machine.image(), created_at_ms)
        code = 0
    except BaseException as exc:  # the parent learns from the exit code; say why on stderr
        with contextlib.suppress(Exception):
            os.write(2, f"snapshot at seq {seq} failed: {exc!r}\n".encode())
    finally:
        os._exit(code)


def _die_with(parent: int) -> None:
    """Linux: the kernel kills this child if the parent dies first."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
