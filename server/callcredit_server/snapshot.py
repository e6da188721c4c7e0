"""Snapshots: the whole state at one journal seq, so a start replays only what follows.

A snapshot is a file `snapshot-<seq>.json.gz` in the snapshot directory: a header
line (format, seq, creation time, sha256 of the state) and the state image
(`StateMachine.image()`, versioned itself: core/image.py), gzip-compressed. It is
written to a temporary name, fsynced, and renamed, so a crash leaves either the whole
file or none.

The writer takes a snapshot without stalling: it forks. The child holds a
copy-on-write view of the state at that instant, serialises it and exits; the
parent's only pause is the fork() itself. The child touches nothing but the
state and its file (no gRPC, no database, no logging locks), dies with its
parent (PR_SET_PDEATHSIG), and leaves via os._exit.

A snapshot at seq S may include records that were applied but not yet
committed when it was taken. So the child leaves it under its temporary name, and
the writer publishes it (`publish_snapshot`: the rename) only once the journal
holds S: a snapshot of a timeline a crash cut short is never published, even if
another server (a hot standby taking over) writes other records under the same
seqs. On start, snapshots beyond the journal's end are deleted too.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import gzip
import hashlib
import json
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from callcredit_server.core import StateMachine

SNAPSHOT_FORMAT = 1
KEEP_SNAPSHOTS = 2  # the newest ones; older files are deleted once a new one is done
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


def write_snapshot(
    directory: Path, seq: int, image: dict[str, Any], created_at_ms: int, *, publish: bool = True
) -> Path:
    """Write the image durably as the snapshot at `seq` (left under its temporary name,
    for `publish_snapshot`, unless `publish`)."""
    state = orjson.dumps(image)
    header = {
        "format": SNAPSHOT_FORMAT,
        "seq": seq,
        "created_at_ms": created_at_ms,
        "sha256": hashlib.sha256(state).hexdigest(),
    }
    directory.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(directory, seq, os.getpid())
    with open(temporary, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as packed:
            packed.write(json.dumps(header).encode() + b"\n")
            packed.write(state)
        raw.flush()
        os.fsync(raw.fileno())
    return publish_snapshot(directory, seq, os.getpid()) if publish else temporary


def publish_snapshot(directory: Path, seq: int, pid: int) -> Path:
    """Give the snapshot at `seq` that process `pid` wrote its final name, durably."""
    final = snapshot_path(directory, seq)
    os.replace(_temporary_path(directory, seq, pid), final)
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return final


def read_snapshot(path: Path) -> tuple[int, dict[str, Any]]:
    """(seq, state image) of a snapshot file; SnapshotError if it is damaged."""
    try:
        with gzip.open(path, "rb") as packed:
            header = json.loads(packed.readline())
            state = packed.read()
    except (OSError, EOFError, ValueError) as exc:
        raise SnapshotError(f"snapshot {path} cannot be read: {exc}") from exc
    if not isinstance(header, dict):
        raise SnapshotError(f"snapshot {path}: no header")
    if header.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(
            f"snapshot {path}: unsupported snapshot file format {header.get('format')!r} "
            f"(this server reads {SNAPSHOT_FORMAT})"
        )
    if hashlib.sha256(state).hexdigest() != header.get("sha256"):
        raise SnapshotError(f"snapshot {path}: the state does not match its checksum")
    seq = header.get("seq")
    if not isinstance(seq, int) or snapshot_path(path.parent, seq).name != path.name:
        raise SnapshotError(f"snapshot {path}: its header names seq {seq!r}")
    image: dict[str, Any] = orjson.loads(state)
    return seq, image


def discard_beyond(directory: Path, last_seq: int) -> list[Path]:
    """Delete snapshots of records the journal does not hold (a crash lost them)."""
    gone = []
    for found in list_snapshots(directory):
        if found.seq > last_seq:
            found.path.unlink()
            gone.append(found.path)
    return gone


def discard_older(directory: Path, keep: int = KEEP_SNAPSHOTS) -> None:
    for found in list_snapshots(directory)[keep:]:
        found.path.unlink(missing_ok=True)
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
        gc.disable()  # touching every object would copy every page
        write_snapshot(directory, seq, machine.image(), created_at_ms, publish=False)
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
